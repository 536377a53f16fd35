"""BatchedStepper: M models trained in one launch on the fused kernels (the sweep's batched executor).

The M models share one ModelConfig and the *shape* of one TrainConfig (beta1, beta2, eps, warmup,
grokfast filter and window, orthograd, the loss: one loss launch serves all; full batch) and differ in
everything else: their seed (the init), their hyperparameters lr, wd, alpha, lamb ([M] tensors on the
device) and their training split. Their parameters live in one flat [M, N] buffer (kernels/layout.py) and one step is

    loss[m], grad[m, :] = loss_and_grads_flat(cfg, flat, tokens [M, B, n_ctx], labels [M, B])
    flat <- FusedOptimizer.step(flat, grad)                  (Grokfast filter [+ orthograd] + AdamW, per-model settings)
    first_bad[m] <- t  where loss[m] is NaN/inf for the first time (t = optimizer steps done)

with no host synchronisation; on a CUDA device the step is captured as a CUDA graph after
WARMUP_STEPS eager steps and replayed. ``evaluate()`` runs eval_flat on every model's own train and
test split and returns device tensors (no copy of logits to the host); the caller reads them to the
host only when it wants the numbers (the sweep: every eval_every steps).

``compact(keep)`` drops the models not in ``keep`` (e.g. those that have grokked): every per-model
row (parameters, AdamW moments, filter state with the MA window sum, hyperparameters, data) is
gathered with index_select into buffers of M' rows, so later steps cost M' models, not M. ``ids``
maps the current rows to the caller's model numbers (0..M-1 at construction), so results stay
attached to the original runs.

All M models share the optimizer's step counters (t, filter count c): they are always at the same
step. Checkpoints are per model, with exactly the keys of the single-run steppers ("model.<name>",
"opt.m.<name>", "opt.v.<name>", "opt.t", "filter.ema.<name>" / "filter.ring.<name>",
"filter.count"), so a model trained here resumes alone with `grokfast train --resume` and the
other way round (``load_state_dict(row, s)``; every loaded model must be at the same step).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import forward_backward as fb
from .errors import KernelConfigError
from .layout import ParamLayout
from .optimizer import FusedOptimizer
from .stepper import WARMUP_STEPS, _graphs_wanted, _require, capture_graph

SHARED_TRAIN_FIELDS = ("beta1", "beta2", "eps", "warmup", "grokfast", "window", "orthograd", "batch_size", "precision",
                       "loss")


def _stack_split(name: str, split, M: int, device):
    """(tokens [M, B, T], labels [M, B]) contiguous int64 from one (tokens, labels) pair, either already
    stacked per model or a sequence of M pairs of equal size."""
    tokens, labels = split
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() == 2:   # one split shared by all models
            tokens, labels = tokens.expand(M, *tokens.shape), labels.expand(M, *labels.shape)
    else:
        sizes = {int(t.shape[0]) for t in tokens}
        if len(tokens) != M or len(labels) != M:
            raise KernelConfigError(f"{name}: need one split per model ({M}), got {len(tokens)}")
        if len(sizes) != 1:
            raise KernelConfigError(f"{name}: models trained in one launch need splits of equal size, got sizes "
                                f"{sorted(sizes)}; use the same p and frac")
        tokens, labels = torch.stack(list(tokens)), torch.stack(list(labels))
    if tokens.dim() != 3 or tokens.shape[0] != M or labels.shape != tokens.shape[:2]:
        raise KernelConfigError(f"{name}: expected tokens [M={M}, B, n_ctx] and labels [M, B], got "
                            f"{list(tokens.shape)} and {list(labels.shape)}")
    return (tokens.to(device=device, dtype=torch.int64).contiguous(),
            labels.to(device=device, dtype=torch.int64).contiguous())


class BatchedStepper:
    """M models of one ModelConfig stepped together; see the module docstring.

    models: M grokfast.Transformer (same cfg, float32, same device; their initial weights are copied in,
    the modules are not used afterwards). tcfgs: M TrainConfigs (equal in SHARED_TRAIN_FIELDS, full
    batch). train, test: (tokens, labels) as [M, B, n_ctx] / [M, B] tensors, or sequences of M
    per-model tensors of equal size, or one [B, n_ctx] / [B] split shared by all.
    """

    name = "fused-batched"

    def __init__(self, models: Sequence, tcfgs: Sequence, train, test, cuda_graph: bool | None = None):
        M = len(models)
        if M < 1 or len(tcfgs) != M:
            raise KernelConfigError(f"need one TrainConfig per model: got {M} models and {len(tcfgs)} configs")
        cfg = models[0].cfg
        for mdl in models[1:]:
            if mdl.cfg != cfg:
                raise KernelConfigError("models trained in one launch must share one ModelConfig "
                                    "(same architecture and task shape)")
        _require(cfg)
        for k in SHARED_TRAIN_FIELDS:
            vals = {getattr(c, k, "ce" if k == "loss" else None) for c in tcfgs}
            if len(vals) > 1:
                raise KernelConfigError(f"models trained in one launch must share {k}: got {sorted(map(repr, vals))}")
        if tcfgs[0].batch_size is not None:
            raise KernelConfigError("the batched stepper trains full batch only: leave batch_size unset")
        self.cfg, self.tcfgs = cfg, list(tcfgs)
        self.layout = lay = ParamLayout(cfg)
        params = [dict(m.named_parameters()) for m in models]
        if any(set(p) != set(lay.shapes) for p in params):
            raise KernelConfigError("a model's parameters do not match its config: build it with grokfast.Transformer(cfg)")
        if any(t.dtype != torch.float32 for p in params for t in p.values()):
            raise KernelConfigError("the fused kernels train float32 parameters: build the models in float32")
        self.device = next(iter(params[0].values())).device
        with torch.no_grad():
            self.flat = torch.cat([lay.flatten({n: t.detach() for n, t in p.items()}) for p in params]).contiguous()
        self.train_data = _stack_split("train", train, M, self.device)
        self.test_data = _stack_split("test", test, M, self.device)
        for tok, lab in (self.train_data, self.test_data):
            fb.check_token_range(cfg, tok, lab)
        self.ids = torch.arange(M)                      # caller's model number of each row (host)
        self.opt = FusedOptimizer.from_configs(self.tcfgs, lay.numel, device=self.device, segments=lay.sizes())
        self._alloc()
        self._use_graph = _graphs_wanted(self.device, cuda_graph)
        self._eager_steps = 0
        self._graph = None
        self._keep_ws = None
        self.steps_done = 0                             # host mirror of opt.counters[0]

    @property
    def _loss(self) -> str:
        """The models' shared loss ("ce" or "stablemax")."""
        return getattr(self.tcfgs[0], "loss", "ce")

    @property
    def M(self) -> int:
        return self.flat.shape[0]

    def _alloc(self):
        M = self.M
        self.grad = torch.zeros_like(self.flat)
        self.loss = torch.zeros(M, dtype=torch.float32, device=self.device)
        self.first_bad = torch.full((M,), -1, dtype=torch.int64, device=self.device)

    # -- the step -----------------------------------------------------------------------------------

    def _run(self):
        tok, lab = self.train_data
        fb.loss_and_grads_flat(self.cfg, self.flat, tok, lab, grad_out=self.grad, loss_out=self.loss,
                               precision=self.tcfgs[0].precision, flush_tasks=(self.opt.scalars_task(),),
                               loss=self._loss)
        # its scalars ran in the pass's last launch; its first program per model records a NaN/inf loss
        self.opt.step(self.flat, self.grad, scalars=False, track=(self.loss, self.first_bad))

    def step(self) -> torch.Tensor:
        """One optimizer step of every model; returns loss [M] (float32, on the device, before the update;
        a fresh tensor, no sync)."""
        if self._use_graph and self._eager_steps >= WARMUP_STEPS and self._capture():
            self._graph.replay()
        else:
            self._run()
            self._eager_steps += 1
        self.steps_done += 1
        return self.loss.clone()

    def _capture(self) -> bool:
        """Capture the step once (GraphCaptureError if that fails); True from then on."""
        if self._graph is not None:
            return True
        tok, lab = self.train_data
        # The graph bakes in the addresses of the kernels' workspace for this (M, B), its split buffers and
        # descriptor table: hold them, so that no cache eviction frees memory the graph uses.
        ws = fb._workspace(self.cfg, self.M, tok.shape[1], self.device, True)
        index = fb.token_index(self.cfg, tok)           # built here (or by the eager steps), not inside the capture
        self._graph = capture_graph(self._run, self.device)
        self._keep_ws = (ws, ws.deferred.held(), index)
        return True

    @property
    def mode(self) -> str:
        """"cuda-graph" once the step is captured and replayed, else "eager"."""
        return "cuda-graph" if self._graph is not None else "eager"

    @torch.no_grad()
    def evaluate(self):
        """(train_loss [M] float32, train_acc [M] float64, test_loss, test_acc), each on the device: every
        model on its own splits (eval_flat; accuracy = correct argmax / examples); the loss is the one the
        models train on (TrainConfig.loss)."""
        out = []
        for tok, lab in (self.train_data, self.test_data):
            loss, correct = fb.eval_flat(self.cfg, self.flat, tok, lab, precision=self.tcfgs[0].precision,
                                         loss=self._loss)
            out += [loss, correct.double() / lab.shape[1]]
        return tuple(out)

    # -- retiring models ------------------------------------------------------------------------------

    @torch.no_grad()
    def compact(self, keep: Sequence[int]) -> None:
        """Keep only the rows ``keep`` (row numbers of the current batch, in the order given); every
        per-model buffer is gathered into new [M', ...] buffers and a captured graph is dropped (the next
        steps run eagerly until it is captured again at M')."""
        keep = [int(i) for i in keep]
        if not keep or len(set(keep)) != len(keep) or not all(0 <= i < self.M for i in keep):
            raise ValueError(f"keep must list distinct rows in [0, {self.M}), got {keep}")
        if keep == list(range(self.M)):
            return
        idx = torch.tensor(keep, dtype=torch.int64, device=self.device)
        opt = self.opt
        self.tcfgs = [self.tcfgs[i] for i in keep]
        new = FusedOptimizer.from_configs(self.tcfgs, self.layout.numel, device=self.device,
                                         segments=self.layout.sizes())
        for name in ("mom", "vel", "ema", "ring", "ma_sum"):
            old = getattr(opt, name)
            if old is not None:
                setattr(new, name, old.index_select(0, idx).contiguous())
        new.counters.copy_(opt.counters)
        self.opt = new
        self.flat = self.flat.index_select(0, idx).contiguous()
        old_bad = self.first_bad.index_select(0, idx)
        self.train_data = tuple(t.index_select(0, idx).contiguous() for t in self.train_data)
        self.test_data = tuple(t.index_select(0, idx).contiguous() for t in self.test_data)
        self.ids = self.ids[torch.tensor(keep, dtype=torch.int64)]
        self._alloc()
        self.first_bad.copy_(old_bad)
        self._graph, self._keep_ws, self._eager_steps = None, None, 0

    # -- checkpoints ----------------------------------------------------------------------------------

    def state_dict(self, row: int) -> dict[str, torch.Tensor]:
        """Model ``row``'s state with the single-run steppers' keys (copies, so later steps do not change it)."""
        lay, opt = self.layout, self.opt
        s = {f"model.{n}": v[row].clone() for n, v in lay.views(self.flat).items()}
        s.update({f"opt.m.{n}": v[row].clone() for n, v in lay.views(opt.mom).items()})
        s.update({f"opt.v.{n}": v[row].clone() for n, v in lay.views(opt.vel).items()})
        s["opt.t"] = opt.counters[0].clone()
        seen = self.steps_done if self.tcfgs[row].grokfast != "none" else 0
        if seen > 0 and opt.ema is not None:
            s.update({f"filter.ema.{n}": v[row].clone() for n, v in lay.views(opt.ema).items()})
        if seen > 0 and opt.ring is not None:
            for n, shape in lay.shapes.items():
                o, k = lay.offsets[n], math.prod(shape)
                s[f"filter.ring.{n}"] = opt.ring[row, :, o:o + k].reshape(opt.window, *shape).clone()
        s["filter.count"] = opt.counters[1].clone()
        return s

    @torch.no_grad()
    def load_state_dict(self, row: int, s: dict[str, torch.Tensor]) -> None:
        """Load model ``row`` from a checkpoint (either stepper's keys). The shared counters are set from
        it, so every row must be loaded from a checkpoint of the same step (ValueError otherwise)."""
        lay, opt = self.layout, self.opt
        t, count = int(s["opt.t"]), int(s["filter.count"])
        if self.steps_done and t != self.steps_done:
            raise ValueError(f"models in one batch must be at the same step: this checkpoint is at step {t}, "
                             f"the batch at {self.steps_done}")
        for prefix, buf in (("model.", self.flat), ("opt.m.", opt.mom), ("opt.v.", opt.vel)):
            for n, v in lay.views(buf).items():
                v[row].copy_(s[prefix + n])
        for kind, buf in (("ema", opt.ema), ("ring", opt.ring)):
            if buf is None or count == 0:
                continue
            for n, shape in lay.shapes.items():
                key = f"filter.{kind}.{n}"
                if key not in s:
                    raise KernelConfigError(f"checkpoint has filter.count {count} but no {key}: it was written "
                                        "with another --grokfast setting")
                if kind == "ema":
                    lay.views(buf)[n][row].copy_(s[key])
                else:
                    o = lay.offsets[n]
                    buf[row, :, o:o + s[key][0].numel()].copy_(s[key].reshape(opt.window, -1))
        if opt.ring is not None and count > 0:
            opt.rebuild_ma_sum(row)   # derived from the ring, not a checkpoint key
        opt.counters.copy_(torch.tensor([t, count], dtype=torch.int64))
        self.steps_done = t
        self._graph, self._keep_ws, self._eager_steps = None, None, 0


def make_batched_stepper(models: Sequence, tcfgs: Sequence, train, test, cuda_graph: bool | None = None):
    """The batched fused training step for ``models`` (grokfast.Transformer, one ModelConfig) with one
    TrainConfig each, their training and test splits (see BatchedStepper)."""
    return BatchedStepper(models, tcfgs, train, test, cuda_graph=cuda_graph)
