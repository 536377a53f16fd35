"""Backends: who computes the training step. ``reference`` is the PyTorch model with autograd and the
reference optimizer; ``fused`` is the Triton kernels in grokfast.kernels. Both read and write the same
named parameters and optimizer state, so checkpoints and run directories do not depend on the backend.
"""
from __future__ import annotations

import math

import torch

from .batches import BATCH_SEED_OFFSET, draw_indices
from .config import ConfigError, ModelConfig, TrainConfig
from .model import Transformer, loss_and_grads_reference, loss_fn
from .optim import GrokfastFilter, make_optimizer

BACKENDS = ("auto", "fused", "reference")


def interpreter_on() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors under its interpreter (slow; for tests)."""
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fused_status(cfg: ModelConfig, device, allow_interpreter: bool = False) -> tuple[bool, str]:
    """(usable, reason) for the fused backend with this config on this device. With allow_interpreter,
    a CPU device is usable when TRITON_INTERPRET=1 (only an explicit --backend fused asks for it)."""
    try:
        from grokfast import kernels  # noqa: F401
        make = getattr(kernels, "make_stepper", None)
    except Exception as e:  # triton missing or broken: say so rather than fail
        return False, f"grokfast.kernels cannot be imported ({type(e).__name__}: {e})"
    if make is None:
        return False, "the fused training step is not built yet (grokfast.kernels has no make_stepper)"
    on_cpu_interpreted = False
    if torch.device(device).type != "cuda":
        if not (allow_interpreter and interpreter_on()):
            return False, ("the fused kernels need a CUDA GPU (this run is on the CPU; with TRITON_INTERPRET=1 "
                           "--backend fused runs them slowly under the Triton interpreter)")
        on_cpu_interpreted = True
    check = getattr(kernels, "unsupported_reason", None)
    if check is not None:
        why = check(cfg)
        if why:
            return False, why
    if on_cpu_interpreted:
        return True, "Triton interpreter on the CPU (TRITON_INTERPRET=1): correct but slow, for tests"
    return True, "CUDA GPU with Triton, config within the kernels' limits"


def fused_training_gap(tcfg: TrainConfig | None) -> str | None:
    """None when the fused optimizer computes this TrainConfig's update, else one line saying why not
    (grokfast.kernels.optimizer.unsupported_training: AdamW with the linear warm-up only). None when the
    kernels cannot be imported: fused_status says why."""
    if tcfg is None:
        return None
    try:
        from grokfast.kernels.optimizer import unsupported_training
    except Exception:
        return None
    return unsupported_training(tcfg)


def resolve_backend(name: str, cfg: ModelConfig, device, tcfg: TrainConfig | None = None) -> tuple[str, str]:
    """(backend, reason). ``auto`` picks fused where it can run, reference otherwise. With ``tcfg``, a
    training setting the fused optimizer lacks (optimizer adam, the lambdalr warm-up) counts too."""
    if name not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "reference":
        return "reference", "asked for"
    gap = fused_training_gap(tcfg)
    if gap:
        if name == "fused":
            raise ConfigError(f"--backend fused cannot run this: {gap}; use --backend reference or auto")
        return "reference", f"fused unavailable: {gap}"
    ok, why = fused_status(cfg, device, allow_interpreter=(name == "fused"))
    if name == "fused":
        if not ok:
            raise ConfigError(f"--backend fused cannot run here: {why}; use --backend reference or auto")
        return "fused", f"asked for; {why}"
    return ("fused", why) if ok else ("reference", f"fused unavailable: {why}")


class ReferenceStepper:
    """One optimizer step of the reference backend: forward, float64 loss (cross-entropy or StableMax,
    TrainConfig.loss), autograd backward, Grokfast filter, orthograd (when asked for), AdamW (or Adam with
    coupled L2, or Muon: TrainConfig.optimizer). ``step(tokens, labels)`` returns the loss (a device
    tensor, no sync)."""

    name = "reference"
    mode = "eager"          # (the fused stepper's is "cuda-graph" once its step is captured)

    def __init__(self, model: Transformer, tcfg: TrainConfig):
        self.model, self.tcfg = model, tcfg
        self.params = dict(model.named_parameters())
        self.filter = GrokfastFilter.from_config(tcfg)
        self.opt = make_optimizer({n: p.data for n, p in self.params.items()}, tcfg)
        self.loss_fn = loss_fn(tcfg.loss)
        self.correct = None
        # the first step (1-based) whose loss was NaN or inf, -1 while none (a device tensor: no sync per step)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=next(iter(self.params.values())).device)
        self._bound = None
        self._epochs = None

    def step(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model(tokens)
        loss = self.loss_fn(logits, labels)
        self.correct = (logits.detach().argmax(-1) == labels).sum()   # before the update (eval_train False)
        grads = torch.autograd.grad(loss, list(self.params.values()))
        grads = self.filter.apply(dict(zip(self.params, grads)))
        self.opt.step(grads)
        loss = loss.detach()
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, self.opt.t), self.first_bad)
        return loss

    def bind(self, tokens: torch.Tensor, labels: torch.Tensor, epochs=None) -> None:
        """The training split that ``train_step`` trains on: all of it (full batch); with batch_size and
        minibatches "draw" the batch grokfast.batches.draw_indices gives for the step (as the fused stepper
        draws it on the device); with minibatches "epoch" batch k of epoch e of the orders ``epochs`` gives
        ((first, count) -> [count, n]: grokfast.batches.epoch_orders; the fused stepper gathers the same)."""
        if self.tcfg.batch_size is not None and self.tcfg.minibatches == "epoch" and epochs is None:
            raise ConfigError("minibatches \"epoch\": bind needs the epochs' orders (epochs=, grokfast.batches.epoch_orders)")
        self._bound = (tokens, labels)
        self._epochs = epochs if self.tcfg.batch_size is not None and self.tcfg.minibatches == "epoch" else None
        self._epoch = (None, None)   # (epoch, its order on the device)

    def train_step(self, step: int) -> torch.Tensor:
        """One step on the bound split; ``step``: steps done before it (the batch's number). Returns the loss."""
        tokens, labels = self._bound
        bs = self.tcfg.batch_size
        if self._epochs is not None:
            epoch, k = divmod(step, math.ceil(labels.shape[0] / bs))
            if self._epoch[0] != epoch:
                self._epoch = (epoch, self._epochs(epoch, 1)[0].to(labels.device))
            idx = self._epoch[1][k * bs:(k + 1) * bs]
            tokens, labels = tokens[idx], labels[idx]
        elif bs is not None:
            idx = draw_indices(labels.shape[0], bs, self.tcfg.seed + BATCH_SEED_OFFSET, step, device=labels.device)
            tokens, labels = tokens[idx], labels[idx]
        return self.step(tokens, labels)

    def state_dict(self) -> dict[str, torch.Tensor]:
        s = {f"model.{n}": p.data for n, p in self.params.items()}
        s.update(self.opt.state_dict())
        s.update(self.filter.state_dict())
        return s

    def load_state_dict(self, s: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(s[f"model.{n}"])
        self.opt.load_state_dict(s)
        self.filter.load_state_dict(s, device=next(iter(self.params.values())).device)


def make_stepper(backend: str, model: Transformer, tcfg: TrainConfig):
    if backend == "reference":
        return ReferenceStepper(model, tcfg)
    from grokfast import kernels
    gap = fused_training_gap(tcfg) or kernels.unsupported_reason(model.cfg)
    if gap:
        raise ConfigError(f"the fused backend cannot run this: {gap}; use --backend reference")
    return kernels.make_stepper(model, tcfg)


def loss_and_grads(model: Transformer, tokens: torch.Tensor, labels: torch.Tensor, backend: str = "reference",
                   loss: str = "ce"):
    """(mean float64 loss, {param name: gradient}) -- the unit `grokfast check` compares across backends.
    loss: "ce" (cross-entropy) or "stablemax" (StableMax cross-entropy), as TrainConfig.loss."""
    if loss not in ("ce", "stablemax"):
        raise ConfigError(f"loss must be ce or stablemax, got {loss!r}")
    if backend == "reference":
        return loss_and_grads_reference(model, tokens, labels, loss=loss)
    if backend == "fused":
        from grokfast import kernels
        fn = getattr(kernels, "loss_and_grads", None)
        if fn is None:
            raise ConfigError("the fused backend is not built yet: use backend='reference'")
        return fn(model, tokens, labels, loss=loss)
    raise ConfigError(f"backend must be 'reference' or 'fused', got {backend!r}")
