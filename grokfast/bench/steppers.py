"""The backends the bench compares (``BACKENDS``) and their steppers: the reference in eager PyTorch, the
reference under torch.compile (``CompiledReferenceStepper`` over ``filter_adamw_``), and the fused kernels
with or without their CUDA graph; ``backend_status`` says whether one can run here, and why not."""
from __future__ import annotations

import functools
import inspect
import os

import torch

from ..backends import ReferenceStepper, fused_status
from ..config import ConfigError, TrainConfig
from ..model import Transformer, cross_entropy64
from .workload import Workload


EAGER = "reference-eager"
BACKENDS = (EAGER, "reference-compile-max-autotune", "reference-compile-reduce-overhead", "fused",
            "fused-cudagraph")
COMPILE_MODES = {"reference-compile-max-autotune": "max-autotune",
                 "reference-compile-reduce-overhead": "reduce-overhead"}
# The backends grokfast.train can train with, for time to grok: bench backend -> TrainConfig.backend.
TRAIN_BACKENDS = {EAGER: "reference", "fused-cudagraph": "fused"}


def filter_adamw_(params: list, grads: list, m: list, v: list, ema: list, t: torch.Tensor,
                  cfg: TrainConfig) -> None:
    """One Grokfast (none or EMA) + AdamW step, in place, as one function that torch.compile can take
    whole: the formulas of grokfast.optim with the step counter ``t`` (a float64 device tensor,
    incremented here) and the learning rate and bias corrections computed on the device, so no step
    needs a new graph or a host sync (``t`` has shape [1]). EMA's first step (ema = g) is
    ema * 0 + g * 1, hence the zero-initialised ``ema``."""
    t.add_(1)
    lr_t = cfg.lr * torch.clamp(t / cfg.warmup, max=1.0) if cfg.warmup > 0 else torch.full_like(t, cfg.lr)
    bc1 = 1 - cfg.beta1 ** t
    bc2 = 1 - cfg.beta2 ** t
    if cfg.grokfast == "ema":
        a = torch.where(t == 1, torch.zeros_like(t), torch.full_like(t, cfg.alpha))
    for i, (p, g) in enumerate(zip(params, grads)):
        if cfg.grokfast == "ema":
            ema[i].mul_(a).add_(g * (1 - a))
            g = g + cfg.lamb * ema[i]
        p.mul_(1 - lr_t * cfg.wd)
        m[i].mul_(cfg.beta1).add_(g, alpha=1 - cfg.beta1)
        v[i].mul_(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
        p.sub_((lr_t / bc1) * m[i] / ((v[i] / bc2).sqrt() + cfg.eps))


class CompiledReferenceStepper:
    """The reference step under torch.compile (``mode`` "max-autotune" or "reduce-overhead").

    Compiled: (1) the model's forward and the float64 loss, whose backward AOTAutograd compiles too
    (``torch.autograd.grad`` runs between the two compiled graphs: a graph break by design); (2) the
    optimizer, ``filter_adamw_`` over all parameters at once. Grokfast none and EMA only (MA's ring
    buffer is not written here). ``compile=False`` runs the same functions eagerly; ``backend`` is
    torch.compile's (the tests use "aot_eager": the same graphs, no code generation)."""

    def __init__(self, model: Transformer, tcfg: TrainConfig, mode: str | None, compile: bool = True,
                 backend: str = "inductor"):
        why = compiled_gap(tcfg)
        if why:
            raise ConfigError(why)
        self.model, self.cfg, self.mode = model, tcfg, mode
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.ema = [torch.zeros_like(p) for p in self.params] if tcfg.grokfast == "ema" else []
        # [1], not 0-dim: torch.compile (2.13, CPU) silently drops in-place updates of a 0-dim input
        self.t = torch.zeros(1, dtype=torch.float64, device=self.params[0].device)
        self.data = [p.data for p in self.params]   # aliases of the parameters, updated in place
        loss_fn = lambda tokens, labels: cross_entropy64(model(tokens), labels)  # noqa: E731
        update = functools.partial(filter_adamw_, cfg=tcfg)
        if compile:
            # The optimizer's tensors live at fixed addresses, as torch's own compiled optimizers mark
            # them, so that "reduce-overhead" may capture the in-place update in a CUDA graph.
            for x in (*self.data, *self.m, *self.v, *self.ema, self.t):
                torch._dynamo.mark_static_address(x)
            kw = {"mode": mode} if backend == "inductor" else {}
            loss_fn = torch.compile(loss_fn, backend=backend, **kw)
            update = torch.compile(update, backend=backend, **kw)
        self._loss, self._update = loss_fn, update

    def step(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self._loss(tokens, labels)
        grads = torch.autograd.grad(loss, self.params)
        with torch.no_grad():
            self._update(self.data, list(grads), self.m, self.v, self.ema, self.t)
        return loss.detach()


def _fused_factory(graph: bool):
    """(make(model, tcfg) -> stepper, None) or (None, reason) for the fused stepper with or without its
    CUDA graph: make_stepper's ``cuda_graph`` argument where it has one, else its documented switch, the
    environment variable GROKFAST_CUDA_GRAPH (read when the stepper is built)."""
    from grokfast import kernels

    make = kernels.make_stepper
    try:
        params = inspect.signature(make).parameters
    except (TypeError, ValueError):
        params = {}
    if "cuda_graph" in params:
        return (lambda model, tcfg: make(model, tcfg, cuda_graph=graph)), None

    def with_env(model, tcfg):
        old = os.environ.get("GROKFAST_CUDA_GRAPH")
        os.environ["GROKFAST_CUDA_GRAPH"] = "1" if graph else "0"
        try:
            return make(model, tcfg)
        finally:
            if old is None:
                del os.environ["GROKFAST_CUDA_GRAPH"]
            else:
                os.environ["GROKFAST_CUDA_GRAPH"] = old
    return with_env, None


def compiled_gap(tcfg: TrainConfig) -> str | None:
    """None when the compiled reference step computes what ``tcfg`` asks for, else why not (one line): it
    implements cross-entropy, Grokfast none or EMA and AdamW at lr with the linear warm-up, nothing else."""
    if tcfg.grokfast == "ma":
        return "the compiled reference step implements Grokfast none and EMA, not MA"
    gaps = [what for what, off in (("loss " + tcfg.loss, tcfg.loss != "ce"), ("orthograd", tcfg.orthograd),
                                   ("optimizer " + tcfg.optimizer, tcfg.optimizer != "adamw"),
                                   ("lr_matched", tcfg.lr_matched),
                                   ("warm-up " + tcfg.warmup_schedule,
                                    tcfg.warmup_schedule != "linear" and tcfg.warmup > 0))
            if off]
    if gaps:
        return (f"the compiled reference step implements AdamW on cross-entropy with the linear warm-up, "
                f"not {', '.join(gaps)}")
    return None


def backend_status(name: str, wl: Workload, device, *, skip_reason: str | None = None) -> tuple[bool, str]:
    """(runnable, reason) for one backend on this workload and device."""
    device = torch.device(device)
    if skip_reason:
        return False, skip_reason
    if name == EAGER:
        return True, "grokfast.backends.ReferenceStepper"
    if name in COMPILE_MODES:
        why = compiled_gap(wl.train)
        if why:
            return False, why
        if device.type == "cuda":
            try:
                import triton  # noqa: F401
            except Exception as e:
                return False, f"torch.compile on CUDA needs Triton ({type(e).__name__}: {e})"
        return True, f"torch.compile(mode={COMPILE_MODES[name]!r}) of forward+loss (+ AOTAutograd backward) and of Grokfast+AdamW"
    if name in ("fused", "fused-cudagraph"):
        if device.type == "cpu":
            # Under TRITON_INTERPRET=1 the kernels run on the CPU, one program after another: a correctness
            # tool whose times say nothing about the kernels.
            ok, why = fused_status(wl.model, device)
            if not ok:
                return False, why
            return False, "the fused kernels run on a CPU only under the Triton interpreter, whose times mean nothing: time them on a CUDA GPU"
        ok, why = fused_status(wl.model, device)
        if not ok:
            return False, why
        make, why = _fused_factory(graph=(name == "fused-cudagraph"))
        if make is None:
            return False, why
        return True, "grokfast.kernels.make_stepper" + (" with its CUDA graph" if name == "fused-cudagraph" else
                                                         " without a CUDA graph")
    raise ConfigError(f"unknown backend {name!r}; choose from: {', '.join(BACKENDS)}")


def make_steppers(name: str, wl: Workload, device, models: list | None = None) -> list:
    """M independent steppers (models seeded 0..M-1) for one backend; M > 1 runs them in turn. The
    models (whose parameters every stepper keeps live) are appended to ``models`` when given."""
    out = []
    for i in range(wl.M):
        model = Transformer(wl.model, seed=wl.train.seed + i, device=device)
        if models is not None:
            models.append(model)
        if name == EAGER:
            out.append(ReferenceStepper(model, wl.train))
        elif name in COMPILE_MODES:
            out.append(CompiledReferenceStepper(model, wl.train, COMPILE_MODES[name]))
        else:
            make, why = _fused_factory(graph=(name == "fused-cudagraph"))
            if make is None:
                raise ConfigError(why)
            out.append(make(model, wl.train))
    return out
