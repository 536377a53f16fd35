"""The work one benchmark point does: a preset's task, model and training settings with overrides,
for M models (``Workload``, ``make_workload``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import ConfigError, ModelConfig, TrainConfig, preset as get_preset
from ..data import Task


@dataclass
class Workload:
    """The work one benchmark point does: a task, a model config, a train config, M models."""

    label: str
    task: Task
    model: ModelConfig
    train: TrainConfig
    M: int = 1

    def describe(self) -> dict:
        m, t = self.model, self.train
        return {"label": self.label, "task": self.task.spec(), "n_train": len(self.task.train),
                "n_test": len(self.task.test), "batch": self.batch_size(),
                "model": {"n_layers": m.n_layers, "d_model": m.d_model, "n_heads": m.n_heads,
                          "d_head": m.d_head, "d_mlp": m.d_mlp, "act": m.act, "layernorm": m.layernorm,
                          "n_ctx": m.n_ctx, "d_vocab": m.d_vocab, "d_vocab_out": m.d_vocab_out},
                "n_params": m.n_params(), "grokfast": t.grokfast, "M": self.M}

    def batch_size(self) -> int:
        n = len(self.task.train)
        return n if self.train.batch_size is None else min(n, self.train.batch_size)


def make_workload(preset: str, device, *, p: int | None = None, frac: float | None = None,
                  d_model: int | None = None, M: int = 1, full_batch: bool = True, label: str | None = None,
                  **train_overrides) -> Workload:
    """The preset's task, model and training settings with overrides. d_model keeps n_heads and sets
    d_head = d_model / n_heads. full_batch drops the preset's minibatch size (the step benchmark times
    full-batch steps). Data seed and model seed 0."""
    pre = get_preset(preset)
    spec = pre.task
    task = Task(spec.op, spec.p if p is None else p, spec.frac if frac is None else frac, 0, spec.layout,
                device=device)
    mcfg = pre.model
    if d_model is not None:
        if d_model % mcfg.n_heads:
            raise ConfigError(f"d_model {d_model} is not a multiple of n_heads {mcfg.n_heads}")
        mcfg = dataclasses.replace(mcfg, d_model=d_model, d_head=d_model // mcfg.n_heads)
    mcfg = mcfg.for_task(task)
    tcfg = pre.train
    if full_batch:
        tcfg = dataclasses.replace(tcfg, batch_size=None)
    if train_overrides:
        tcfg = dataclasses.replace(tcfg, **train_overrides)
    if M < 1:
        raise ConfigError(f"the model batch M must be >= 1, got {M}")
    return Workload(label or preset, task, mcfg, tcfg, M)
