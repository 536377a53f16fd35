"""`grokfast check`: the fused path against the reference on this machine.

For each preset it compares, with the float64 reference model and the float64 reference optimizer
as the ground truth (grokfast/model.py, grokfast/optim.py):
  - evaluation: the mean loss over the train split and the number of correct argmax predictions;
  - the training loss and the gradient of every parameter (one full batch);
  - the parameters after 1 and after S optimizer steps (S = 100, --quick 4) with each Grokfast
    filter (none, ema, ma; MA window 5, --quick 2): the fused stepper (float32 kernels) against
    the reference step run on a float64 copy of the same model; with orthograd (--orthograd) the
    gradient made orthogonal to the weights per tensor before AdamW, on both sides.
With loss="stablemax" (--loss stablemax) every row uses StableMax cross-entropy (the fused loss kernel's
LOSS_MODE 1 against grokfast.model.stablemax_cross_entropy64) with its own bounds (BOUNDS "... stablemax").
On a CUDA GPU the presets run at their real shapes (the batch is the full train split, or the
preset's minibatch size of fixed examples); on a CPU the kernels run under the Triton interpreter
(TRITON_INTERPRET=1, set by the CLI before triton is imported) at small shapes with the preset's
structure (layers, LayerNorm, activation, attention rate, token layout): d_model 32, 2 heads of 16,
d_mlp 64, p 7 (--quick) or 11.

Error of a quantity: max|fused - reference| / max|reference| over its elements (one number per
tensor; for parameters the worst tensor, leaving out the few elements whose update direction
float32 gradients cannot determine, see _train_rows). The bounds are in BOUNDS with the reasoning
and the errors measured under the interpreter; they have not yet been measured on a GPU.
``run_check`` returns rows, ``format_rows`` prints them.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .config import ConfigError, ModelConfig, TrainConfig, preset as get_preset
from .data import Task
from .model import Transformer, loss_and_grads_reference, loss_fn

PRESETS = ("nanda", "power", "pizza")
FILTERS = ("none", "ema", "ma")

# Relative error bounds (max-abs error over max-abs reference value), float32 kernels vs float64.
BOUNDS = {
    # a mean of per-example float32 log-softmax values: a few ulp of float32 each (measured ~1e-7)
    "loss": 1e-5,
    # float32 dot products over d_model..d_mlp terms, then a sum over the batch (measured <= 6e-7)
    "grad": 1e-4,
    # one AdamW step moves each parameter by about lr_t; the float32 update is exact to a few ulp
    # once undetermined directions are left out (measured <= 8e-7: biases start at 0, so their
    # max is lr_t and the rounding of the update shows)
    "params@1": 1e-5,
    # S steps: the float32 roundings of parameters, moments and gradients accumulate and feed back
    # through the model (interpreter: 3e-6 after 100 steps, nanda p 11 EMA; <= 3e-5 after 4 steps, power)
    "params@S": 1e-4,
    # orthograd: g'' = (g' - c w) r per tensor in float64 from the float32 g', then AdamW. Its relative error
    # is the gradient's (<= 1e-4 bound, measured ~1e-6) amplified by 1 / sin(w, g') (c w cancels part of g'),
    # which is ~1 for these random inits and small models; AdamW's first step is about lr_t * sign(g''), with
    # the undetermined signs left out as without orthograd (judged on the reference g''), so the same bounds
    # hold (interpreter, --quick, 2026-12-02: measured <= 2.3e-7 after 1 step and <= 8.9e-6 after 4, every
    # preset and filter; the largest, power with MA)
    "params@1 orthograd": 1e-5,
    "params@S orthograd": 1e-4,
    # StableMax (unembed_loss's docstring): no exp and no cancellation, so a per-example loss is within
    # (log2(BLOCK_P) + 30) u (<= 2.3e-6 relative) of its value from the same logits; the logits' float32 error adds
    # as for cross-entropy (measured, interpreter, --quick, three presets: eval and training loss <= 5.4e-8)
    "loss stablemax": 1e-5,
    # dlogits within (2 log2(BLOCK_P) + 16) u = 1.5e-6 per element, then the same float32 products and
    # batch sums as cross-entropy's (measured as above: <= 9.7e-7, power's blocks.0.ln1.w)
    "grad stablemax": 1e-4,
    # the optimizer does not see the loss: the AdamW reasoning above holds (measured as above: <= 2.3e-7 after
    # 1 step, <= 2.2e-5 after 4 (power, EMA); nanda p 11 EMA after 100 steps 1.7e-5, where the float32
    # reference (torch, same run, every element) itself lands 2.1e-5 from float64: 9.4e-6 with cross-entropy)
    "params@1 stablemax": 1e-5,
    "params@S stablemax": 1e-4,
}


def bound(key: str, loss: str = "ce") -> float:
    """BOUNDS[key], or its StableMax entry BOUNDS[key + " stablemax"] for loss "stablemax"."""
    return BOUNDS[key] if loss == "ce" else BOUNDS[f"{key} {loss}"]


@dataclass
class Row:
    preset: str
    quantity: str
    error: Optional[float]   # None when skipped
    bound: Optional[float]
    note: str = ""

    @property
    def status(self) -> str:
        if self.error is None:
            return "skip"
        return "pass" if self.error <= self.bound else "FAIL"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    den = b.abs().max().item()
    err = (a - b).abs().max().item()
    if err != err:  # NaN in the fused result
        return float("inf")
    return err / den if den > 0 else (0.0 if err == 0 else float("inf"))


def shapes_for(name: str, device: torch.device, quick: bool):
    """(ModelConfig, Task, TrainConfig, batch size) for a preset on this device."""
    pre = get_preset(name)
    if device.type == "cuda":
        task = Task(pre.task.op, pre.task.p, pre.task.frac, 0, pre.task.layout, device=device)
        cfg = pre.model.for_task(task)
        B = min(pre.train.batch_size or len(task.train), len(task.train))
    else:
        task = Task(pre.task.op, 7 if quick else 11, max(pre.task.frac, 0.5), 0, pre.task.layout, device=device)
        cfg = dataclasses.replace(pre.model, d_model=32, n_heads=2, d_head=16, d_mlp=64).for_task(task)
        B = len(task.train)
    return cfg, task, pre.train, B


def run_check(presets=PRESETS, quick: bool = False, device=None, seed: int = 0, filters=FILTERS,
              log: Callable[[str], None] = lambda s: None, precision: str = "ieee", loss: str = "ce",
              orthograd: bool = False) -> list[Row]:
    """Compare the fused kernels with the reference for each preset (and the optimizer steps for each
    Grokfast filter in ``filters``); returns one Row per quantity. precision: the kernels' float32
    dot mode (ieee | tf32x3 | tf32; the bounds are float32's whatever the mode, so the table shows
    whether a faster mode meets them). loss: "ce" or "stablemax", the loss every row computes.
    orthograd: the optimizer steps with the orthogonal gradient."""
    from .config import PRECISIONS
    if loss not in ("ce", "stablemax"):
        raise ConfigError(f"--loss must be ce or stablemax, got {loss!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    for kind in filters:
        if kind not in FILTERS:
            raise ConfigError(f"--grokfast must be among {', '.join(FILTERS)}, got {kind!r}")
    from grokfast import kernels

    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    steps = 4 if quick else 100
    rows: list[Row] = []
    for name in presets:
        cfg, task, pre_train, B = shapes_for(name, device, quick)
        why = kernels.unsupported_reason(cfg)
        if why:
            rows.append(Row(name, "everything", None, None, why))
            continue
        from grokfast.kernels import forward_backward as fb
        t0 = time.perf_counter()
        tokens = task.train.tokens[:B].contiguous()
        labels = task.train.labels[:B].contiguous()
        model = Transformer(cfg, seed=seed, device=device)
        model64 = copy.deepcopy(model).double()
        lay = kernels.ParamLayout(cfg)
        flat = lay.flatten({n: p.detach() for n, p in model.named_parameters()})

        # evaluation
        with torch.no_grad():
            logits64 = model64(tokens)
        loss64 = loss_fn(loss)(logits64, labels)
        ev_loss, ev_correct = fb.eval_flat(cfg, flat, tokens, labels, precision=precision, loss=loss)
        rows.append(Row(name, "eval loss", _rel(ev_loss[0], loss64), bound("loss", loss), f"B={B}"))
        top2 = logits64.topk(2, dim=-1).values
        near_tie = ((top2[:, 0] - top2[:, 1]) <= 1e-5 * logits64.abs().amax(-1)).sum().item()
        ref_correct = (logits64.argmax(-1) == labels).sum().item()
        flips = max(0, abs(int(ev_correct[0]) - ref_correct) - near_tie)
        rows.append(Row(name, "eval correct (argmax)", float(flips), 0.0,
                        f"fused {int(ev_correct[0])} vs reference {ref_correct} of {B}; {near_tie} near-ties allowed"))

        # loss and gradients
        fused_loss, grad = fb.loss_and_grads_flat(cfg, flat, tokens, labels, precision=precision, loss=loss)
        ref_loss, ref_grads = loss_and_grads_reference(model64, tokens, labels, loss=loss)
        rows.append(Row(name, "loss", _rel(fused_loss[0], ref_loss), bound("loss", loss)))
        for n, g in lay.views(grad).items():
            rows.append(Row(name, f"grad {n}", _rel(g[0], ref_grads[n]), bound("grad", loss)))

        # optimizer steps
        for kind in filters:
            tcfg = dataclasses.replace(pre_train, grokfast=kind, window=2 if quick else 5, batch_size=None,
                                       backend="auto", precision=precision, loss=loss, orthograd=orthograd)
            rows += _train_rows(name, cfg, tcfg, tokens, labels, seed, device, steps)
            log(f"{name}: {steps} optimizer steps with Grokfast {kind}: {rows[-1].status} "
                f"({time.perf_counter() - t0:.1f} s)")
        log(f"{name}: {cfg.n_layers} layer(s), d_model {cfg.d_model}, p {task.p}, B {B}: "
            f"{time.perf_counter() - t0:.1f} s")
    return rows


def _train_rows(name, cfg: ModelConfig, tcfg: TrainConfig, tokens, labels, seed, device, steps) -> list[Row]:
    """The fused stepper against the reference step (float64 model, autograd, GrokfastFilter, AdamW).

    AdamW's first step moves each element by lr_t * g / (|g| + eps), about lr_t * sign(g), so an
    element whose first reference gradient lies within the gradient bound of zero
    (0 < |g| <= BOUNDS["grad"] * max|g| of its tensor) has a direction that float32 gradients cannot
    determine: it may move by up to 2 lr_t the other way, and carry that difference on. Those
    elements (well under 1%) are left out of both comparisons, the note says how many; the gradient
    rows bound their gradients. Exact zeros (unused tokens, dead ReLU units) stay in: the kernels
    must give exact zeros there too. Later near-zero gradients are damped by the moments already
    accumulated and stay in."""
    from grokfast import kernels
    from .optim import AdamW, GrokfastFilter, orthogonalize

    model = Transformer(cfg, seed=seed, device=device)
    model64 = copy.deepcopy(model).double()
    params64 = dict(model64.named_parameters())
    fused = kernels.make_stepper(model, tcfg)
    loss = getattr(tcfg, "loss", "ce")
    filt = GrokfastFilter.from_config(tcfg)
    opt = AdamW({n: p.data for n, p in params64.items()}, tcfg)
    undetermined = {}
    rows = []
    for step in range(1, steps + 1):
        fused.step(tokens, labels)
        _, grads = loss_and_grads_reference(model64, tokens, labels, loss=loss)
        filtered = filt.apply(grads)
        if step == 1:
            # with orthograd the first update's signs are the orthogonal gradient's: judge those (reference)
            used = orthogonalize(params64, filtered) if tcfg.orthograd else grads
            for n, g in used.items():
                undetermined[n] = (g != 0) & (g.abs() <= bound("grad", loss) * g.abs().max())
        opt.step(filtered)
        if step in (1, steps):
            got = dict(model.named_parameters())
            errs = []
            for n, p in params64.items():
                keep = ~undetermined[n]
                errs.append((_rel(got[n][keep], p[keep]) if keep.any() else 0.0, n))
            err, worst = max(errs)
            left_out = sum(int(u.sum()) for u in undetermined.values())
            total = sum(u.numel() for u in undetermined.values())
            key = "params@1" if step == 1 else "params@S"
            limit = max(bound(key, loss), BOUNDS[key + " orthograd"]) if tcfg.orthograd else bound(key, loss)
            what = tcfg.grokfast + (", orthograd" if tcfg.orthograd else "")
            rows.append(Row(name, f"params after {step} step{'s' * (step > 1)} [{what}]", err,
                            limit, f"worst {worst}; {left_out} of {total} elements left out "
                                         f"(first gradient within its bound of 0); fused steps: {fused.mode}"))
    return rows


def format_rows(rows: list[Row]) -> str:
    w = max([len(r.quantity) for r in rows] + [8])
    head = f"{'preset':<7} {'quantity':<{w}} {'rel. error':>10} {'bound':>8}  status"
    out = [head, "-" * len(head)]
    for r in rows:
        err = "-" if r.error is None else f"{r.error:10.2e}"
        bound = "-" if r.bound is None else f"{r.bound:8.0e}"
        note = f"  {r.note}" if r.note else ""
        out.append(f"{r.preset:<7} {r.quantity:<{w}} {err:>10} {bound:>8}  {r.status}{note}")
    n_fail = sum(r.status == "FAIL" for r in rows)
    n_skip = sum(r.status == "skip" for r in rows)
    out.append(f"{len(rows) - n_fail - n_skip} passed, {n_fail} failed, {n_skip} skipped")
    return "\n".join(out)
