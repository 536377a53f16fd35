"""Benchmarks that tell the truth: every backend side by side on the same work, in one process.

What is measured (``run_report`` writes all of it; ``grokfast bench`` is its command line):

- Step time. One full-batch training step (forward, float64 loss, backward, Grokfast filter, AdamW) on
  each backend of ``BACKENDS``, from the same initial weights: ``warmup`` untimed steps (compilation,
  CUDA-graph capture and caches stay out of the numbers), then ``timed`` steps, each timed alone
  (CUDA events around every step on a GPU; ``time.perf_counter`` on a CPU). Reported: median, p10,
  p90, min, mean, steps/s (1 / median, and the wall-clock rate of the whole timed loop), the speed-up
  against the reference in eager PyTorch, and the raw per-step times.
- The floor (``step_cost``): the floating-point operations the step must do when it exploits the
  structure of the problem, and the fewest bytes it must move; over the device's peak rates (datasheet
  and measured: ``measure_ceilings``) they give the time no implementation can beat; each measured
  step reports ``floor / median`` (1.0 would be at the floor).
- Time to grok: ``grokfast.train`` with ``stop_at_grok`` on the trainer's backends (reference, fused):
  steps and wall seconds until test accuracy first reaches 95% and 99%.
- Scaling: step time against p, train fraction, d_model and the model batch M.
- GPU telemetry (nvidia-ml-py) read before and after each timed region: the total-energy counter
  (energy per step, mean power), SM clock, utilisation, temperature, memory used.

A backend that cannot run is reported ``not available`` with the reason, never left out or faked.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import inspect
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .backends import ReferenceStepper, fused_status
from .config import ConfigError, ModelConfig, TrainConfig, preset as get_preset
from .data import Task
from .model import Transformer, cross_entropy64

EAGER = "reference-eager"
BACKENDS = (EAGER, "reference-compile-max-autotune", "reference-compile-reduce-overhead", "fused",
            "fused-cudagraph")
COMPILE_MODES = {"reference-compile-max-autotune": "max-autotune",
                 "reference-compile-reduce-overhead": "reduce-overhead"}
# The backends grokfast.train can train with, for time to grok: bench backend -> TrainConfig.backend.
TRAIN_BACKENDS = {EAGER: "reference", "fused-cudagraph": "fused"}
SCALING_AXES = ("p", "frac", "d_model", "M")

# Datasheet peaks (dense, no sparsity) of the GPUs this project is measured on; leads, not readings
# (see /work/.library/device/H200.md and HOPPER.md). fp32: the CUDA cores' IEEE float32 rate; tf32: the
# tensor cores' TF32 rate (3xTF32 costs three TF32 products); bandwidth: HBM bytes/s.
DATASHEET = {
    "H100 SXM": {"fp32": 67e12, "tf32": 494.7e12, "bandwidth": 3.35e12},
    "H100 PCIe": {"fp32": 51.2e12, "tf32": 378e12, "bandwidth": 2.0e12},
    "H200": {"fp32": 67e12, "tf32": 494.7e12, "bandwidth": 4.8e12},
}


def datasheet_for(name: str) -> tuple[Optional[str], Optional[dict]]:
    """(part, peaks) for a CUDA device name as torch reports it, or (None, None) when unknown."""
    n = name.upper()
    if "H200" in n:
        return "H200", DATASHEET["H200"]
    if "H100" in n and "PCIE" in n:
        return "H100 PCIe", DATASHEET["H100 PCIe"]
    if "H100" in n and ("SXM" in n or "HBM3" in n):
        return "H100 SXM", DATASHEET["H100 SXM"]
    return None, None


# --------------------------------------------------------------------------------------------------
# Workloads and steppers


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
        if tcfg.grokfast == "ma":
            raise ConfigError("the compiled reference step implements Grokfast none and EMA, not MA")
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


def backend_status(name: str, wl: Workload, device, *, skip_reason: str | None = None) -> tuple[bool, str]:
    """(runnable, reason) for one backend on this workload and device."""
    device = torch.device(device)
    if skip_reason:
        return False, skip_reason
    if name == EAGER:
        return True, "grokfast.backends.ReferenceStepper"
    if name in COMPILE_MODES:
        if wl.train.grokfast == "ma":
            return False, "the compiled reference step implements Grokfast none and EMA, not MA"
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


# --------------------------------------------------------------------------------------------------
# Timing


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], device, warmup: int, timed: int,
               on_timed_start: Callable[[], None] | None = None,
               progress: Callable[[int], None] | None = None) -> dict:
    """Run ``warmup`` untimed steps, then ``timed`` steps each timed alone (``on_timed_start`` is called
    in between, after a sync: telemetry brackets the timed steps only; ``progress(n)`` is told of the
    steps done after the warm-up and after the timed loop, never inside it).

    On CUDA: an event pair around every step, all recorded back to back with no host sync in between
    (what the device spent per step, launch gaps included); on a CPU: perf_counter around every step.
    Returns {"first_step_s", "warmup_s", "times_s" (list), "wall_s" (the timed loop, synchronised)}."""
    device = torch.device(device)
    synchronize(device)
    t0 = time.perf_counter()
    first = None
    for i in range(warmup):
        step()
        if i == 0:
            synchronize(device)
            first = time.perf_counter() - t0
    synchronize(device)
    warm = time.perf_counter() - t0
    if progress is not None:
        progress(warmup)
    if on_timed_start is not None:
        on_timed_start()
    times: list[float] = []
    if device.type == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(timed)]
        w0 = time.perf_counter()
        for a, b in ev:
            a.record()
            step()
            b.record()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - w0
        times = [a.elapsed_time(b) / 1e3 for a, b in ev]
    else:
        w0 = time.perf_counter()
        for _ in range(timed):
            s = time.perf_counter()
            step()
            times.append(time.perf_counter() - s)
        wall = time.perf_counter() - w0
    if progress is not None:
        progress(timed)
    return {"first_step_s": first, "warmup_s": warm, "times_s": times, "wall_s": wall}


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    s = sorted(xs)
    if not s:
        raise ValueError("no samples")
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def time_stats(times: list[float], wall_s: float | None = None) -> dict:
    """median, p10, p90, min, mean (seconds) and steps/s (1 / median; and over the wall time)."""
    med = statistics.median(times)
    out = {"n": len(times), "median_s": med, "p10_s": percentile(times, 10), "p90_s": percentile(times, 90),
           "min_s": min(times), "mean_s": statistics.fmean(times),
           "steps_per_s": 1.0 / med if med > 0 else None}
    if wall_s:
        out["wall_steps_per_s"] = len(times) / wall_s
    return out


# --------------------------------------------------------------------------------------------------
# The floor


def step_cost(mcfg: ModelConfig, tcfg: TrainConfig, tokens: torch.Tensor, labels: torch.Tensor,
              M: int = 1) -> dict:
    """FLOPs and minimum bytes of one training step over the batch ``tokens`` [B, T], for M models.

    FLOPs count the least work the step must do when it exploits the structure (DESIGN.md, "The fused
    training step"); a multiply-add is 2 FLOPs, other operations 1 (exp, erf, sqrt too). With B examples,
    T positions, H heads of d_head Dh, d_model D, d_mlp F, V output classes, and R the distinct
    (position, token) pairs in the batch (R_q those at the last position):
      - layer 0 tables, once per step: Q rows (R_q when there is one layer, else R), K rows (R), and the
        value-output table VO = x0 W_V W_O (R rows, through d_head): 2 R D Dh H (K) + 2 R_q D Dh H (Q) +
        4 R D Dh H (VO);
      - per example, layer 0: scores over the causal (query, key) pairs P (T at the last position
        only, T(T+1)/2 at every position) and the VO-weighted sum: P H (2 Dh + 2 D); later layers
        compute Q, K, V, O from the residual stream (K, V at every position, Q, O at the query positions);
      - MLP 4 D F per query position (the last layer's at the last position only), unembedding 2 D V;
      - backward: twice every product above (one product for the input's gradient, one for the weight's);
      - elementwise, forward + backward: softmax 6 per score, activation 2 (ReLU) or 20 (GELU) per unit,
        biases 2, LayerNorm 16 per element, residual adds 1, loss 6 per logit; optimizer per parameter:
        AdamW 12, Grokfast-EMA 4, Grokfast-MA 4 (a running window sum).
    Bytes are the fewest a step must move through memory (float32 state): parameters read and written,
    gradients written and read, AdamW m and v read and written, Grokfast state (EMA read and written;
    MA a running float64 window sum read and written plus the oldest ring slot read and the newest
    written), and the
    batch's tokens and labels read once (shared by the M models). Activations are not counted: the
    per-example work fits on chip.
    """
    B, T = tokens.shape
    D, H, Dh, F, V, L = (mcfg.d_model, mcfg.n_heads, mcfg.d_head, mcfg.d_mlp, mcfg.d_vocab_out,
                         mcfg.n_layers)
    R = sum(int(torch.unique(tokens[:, t]).numel()) for t in range(T))
    R_q = int(torch.unique(tokens[:, -1]).numel())
    pairs_all, pairs_last = T * (T + 1) // 2, T
    act = 2 if mcfg.act == "relu" else 20

    mm = {"layer-0 tables": 0, "attention": 0, "mlp": 0, "unembed": 0}
    ew = {"softmax": 0, "activation": 0, "biases": 0, "layernorm": 0, "residual": 0, "loss": 0}
    q_rows = R_q if L == 1 else R
    mm["layer-0 tables"] = 2 * R * D * Dh * H + 2 * q_rows * D * Dh * H + 4 * R * D * Dh * H
    if mcfg.layernorm:
        ew["layernorm"] += 16 * R * D
    for l in range(L):
        last = l == L - 1
        nq = 1 if last else T
        P = pairs_last if last else pairs_all
        if l == 0:
            mm["attention"] += B * P * H * (2 * Dh + 2 * D)
        else:
            mm["attention"] += B * (2 * T * 2 * D * H * Dh + nq * 2 * D * H * Dh + P * H * 4 * Dh + nq * 2 * H * Dh * D)
            if mcfg.layernorm:
                ew["layernorm"] += 16 * B * T * D
        ew["softmax"] += 6 * B * P * H
        mm["mlp"] += B * nq * 4 * D * F
        ew["activation"] += act * B * nq * F
        ew["biases"] += 2 * B * nq * (F + D)
        ew["residual"] += 2 * B * nq * D
        if mcfg.layernorm:
            ew["layernorm"] += 16 * B * nq * D
        if mcfg.attn_bias:
            ew["biases"] += 2 * B * (3 * T * H * Dh + nq * D)
    if mcfg.layernorm:
        ew["layernorm"] += 16 * B * D
    mm["unembed"] = B * 2 * D * V
    ew["loss"] = 6 * B * V
    if mcfg.unembed_bias:
        ew["biases"] += 2 * B * V
    N = mcfg.n_params()
    opt = {"none": 12, "ema": 16, "ma": 16}[tcfg.grokfast] * N

    flops = {f"{k} (fwd+bwd)": 3 * v for k, v in mm.items()}
    flops.update({f"{k} (elementwise)": v for k, v in ew.items() if v})
    flops["optimizer"] = opt
    flops = {k: v * M for k, v in flops.items()}
    matmul_flops = 3 * sum(mm.values()) * M

    f4 = 4 * N * M
    nbytes = {"parameters (read + write)": 2 * f4, "gradients (write + read)": 2 * f4,
              "AdamW m, v (read + write)": 4 * f4}
    if tcfg.grokfast == "ema":
        nbytes["Grokfast EMA (read + write)"] = 2 * f4
    elif tcfg.grokfast == "ma":
        nbytes["Grokfast MA (float64 window sum read + write, ring slot read + write)"] = 6 * f4
    nbytes["tokens and labels (read once)"] = tokens.numel() * tokens.element_size() + labels.numel() * labels.element_size()
    return {"flops": sum(flops.values()), "matmul_flops": matmul_flops, "flops_by_part": flops,
            "bytes": sum(nbytes.values()), "bytes_by_part": nbytes,
            "counts": {"B": B, "T": T, "R": R, "R_q": R_q, "n_params": N, "M": M}}


def floors(cost: dict, ceilings: dict) -> dict:
    """Floor times for each set of peak rates: {name: {compute_s, memory_s, floor_s, bound}}.

    ``ceilings`` maps a name (e.g. "datasheet H100 SXM, fp32") to {"flops_per_s", "bytes_per_s",
    and optionally "matmul_flops_per_s" for the share of FLOPs in products}."""
    out = {}
    for name, c in ceilings.items():
        if not c.get("flops_per_s") or not c.get("bytes_per_s"):
            continue
        mm_rate = c.get("matmul_flops_per_s") or c["flops_per_s"]
        compute = cost["matmul_flops"] / mm_rate + (cost["flops"] - cost["matmul_flops"]) / c["flops_per_s"]
        memory = cost["bytes"] / c["bytes_per_s"]
        out[name] = {"compute_s": compute, "memory_s": memory, "floor_s": max(compute, memory),
                     "bound": "compute" if compute >= memory else "memory"}
    return out


def datasheet_ceilings(part: str | None, peaks: dict | None) -> dict:
    if not peaks:
        return {}
    return {f"datasheet {part}, IEEE fp32": {"flops_per_s": peaks["fp32"], "bytes_per_s": peaks["bandwidth"]},
            f"datasheet {part}, 3xTF32 products": {"flops_per_s": peaks["fp32"], "bytes_per_s": peaks["bandwidth"],
                                                   "matmul_flops_per_s": peaks["tf32"] / 3}}


def measure_ceilings(device, quick: bool) -> dict:
    """Measured ceilings on this device, on random data: a device-to-device copy (bytes read + written
    over the median time) and a float32 matrix product with TF32 off (2 n^3 over the median time)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n_copy = (1 << 28 if not quick else 1 << 26) if cuda else (1 << 24 if not quick else 1 << 22)  # float32 elements
    n_mm = (8192 if not quick else 4096) if cuda else (1024 if not quick else 512)
    g = torch.Generator(device=device).manual_seed(0)
    src = torch.rand(n_copy, device=device, generator=g)
    dst = torch.empty_like(src)
    a = torch.rand(n_mm, n_mm, device=device, generator=g)
    b = torch.rand(n_mm, n_mm, device=device, generator=g)
    old_tf32 = torch.backends.cuda.matmul.allow_tf32 if cuda else None
    try:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = False
        copy = time_steps(lambda: dst.copy_(src), device, warmup=3, timed=10 if quick else 30)
        mm = time_steps(lambda: torch.mm(a, b), device, warmup=2, timed=5 if quick else 10)
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = old_tf32
    bw = 2 * src.numel() * 4 / statistics.median(copy["times_s"])
    fl = 2 * n_mm ** 3 / statistics.median(mm["times_s"])
    del src, dst, a, b
    return {"measured": {"flops_per_s": fl, "bytes_per_s": bw,
                         "how": f"copy of {n_copy * 4 / 2**20:.0f} MiB (read + write) and a {n_mm}^3 float32 "
                                f"product with TF32 off, medians of {len(copy['times_s'])} and {len(mm['times_s'])}"}}


# --------------------------------------------------------------------------------------------------
# Telemetry and environment


class Telemetry:
    """NVIDIA GPU readings through nvidia-ml-py, taken before and after a timed region (no sampling
    thread: a thread would steal the GIL from a launch-bound step). ``available`` and ``reason`` say
    whether it works here."""

    def __init__(self, device):
        self.available, self.reason, self.h, self.nvml = False, "", None, None
        device = torch.device(device)
        if device.type != "cuda":
            self.reason = "no NVIDIA GPU: telemetry not available"
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            idx = device.index if device.index is not None else torch.cuda.current_device()
            uuid = getattr(torch.cuda.get_device_properties(idx), "uuid", None)
            h = None
            if uuid is not None:
                try:
                    h = pynvml.nvmlDeviceGetHandleByUUID(("GPU-" + str(uuid)).encode())
                except Exception:
                    h = None
            self.h = h if h is not None else pynvml.nvmlDeviceGetHandleByIndex(idx)
            self.nvml = pynvml
            self.available, self.reason = True, "nvidia-ml-py"
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (pip install nvidia-ml-py): telemetry not available"
        except Exception as e:
            self.reason = f"NVML failed ({type(e).__name__}: {e}): telemetry not available"

    def _read(self) -> dict:
        n, h, r = self.nvml, self.h, {}
        for key, fn in (("energy_mJ", lambda: n.nvmlDeviceGetTotalEnergyConsumption(h)),
                        ("power_W", lambda: n.nvmlDeviceGetPowerUsage(h) / 1e3),
                        ("sm_clock_MHz", lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
                        ("utilization_pct", lambda: n.nvmlDeviceGetUtilizationRates(h).gpu),
                        ("temperature_C", lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
                        ("memory_used_MiB", lambda: n.nvmlDeviceGetMemoryInfo(h).used / 2**20)):
            try:
                r[key] = fn()
            except Exception:
                r[key] = None
        r["t"] = time.perf_counter()
        return r

    def begin(self):
        return self._read() if self.available else None

    def end(self, before, n_steps: int) -> Optional[dict]:
        """Readings after the region, and the energy per step and mean power from the energy counter."""
        if not self.available or before is None:
            return None
        after = self._read()
        out = {"before": before, "after": after}
        if before.get("energy_mJ") is not None and after.get("energy_mJ") is not None:
            joules = (after["energy_mJ"] - before["energy_mJ"]) / 1e3
            secs = after["t"] - before["t"]
            out["energy_J"] = joules
            out["energy_per_step_J"] = joules / n_steps if n_steps else None
            out["mean_power_W"] = joules / secs if secs > 0 else None
        return out

    def device_facts(self) -> dict:
        if not self.available:
            return {}
        n = self.nvml
        facts = {}
        for key, fn in (("driver", lambda: n.nvmlSystemGetDriverVersion()),
                        ("nvml_cuda_driver_version", lambda: n.nvmlSystemGetCudaDriverVersion()),
                        ("power_limit_W", lambda: n.nvmlDeviceGetEnforcedPowerLimit(self.h) / 1e3),
                        ("max_sm_clock_MHz", lambda: n.nvmlDeviceGetMaxClockInfo(self.h, n.NVML_CLOCK_SM))):
            try:
                v = fn()
                facts[key] = v.decode() if isinstance(v, bytes) else v
            except Exception:
                pass
        return facts


def git_commit() -> dict:
    """The checkout's commit and whether it has uncommitted changes (None outside a git checkout)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except Exception:
        return {"commit": None, "dirty": None}


def environment(device, telemetry: Telemetry, command: str) -> dict:
    """Device, versions, date, git commit and the command: what every report carries."""
    device = torch.device(device)
    env = {"date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
           "command": command, "python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "git": git_commit(),
           "dot_precision": os.environ.get("GROKFAST_DOT_PRECISION", "ieee"),   # the fused kernels' float32 dots
           "gemm_group": os.environ.get("GROKFAST_GEMM_GROUP", "3")}            # products per grouped launch
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as e:
        env["triton"] = f"not importable ({type(e).__name__})"
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    env["cpu"] = cpu
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = props.name
        env["cuda"] = torch.version.cuda
        env["sm_count"] = props.multi_processor_count
        env["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env.update(telemetry.device_facts())
        if not env.get("driver"):
            try:
                q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20)
                env["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
            except Exception:
                env["driver"] = None
    else:
        env["device"] = f"CPU: {cpu}" if cpu else "CPU"
        env["cuda"] = None
        env["driver"] = None
    env["telemetry"] = telemetry.reason
    return env


# --------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class GrokSpec:
    """One time-to-grok run: a preset with train-config overrides, capped at max_steps."""

    label: str
    preset: str
    max_steps: int
    eval_every: int
    overrides: dict = field(default_factory=dict)


@dataclass
class Plan:
    """Everything one report measures; ``make_plan`` builds it from the command line's choices."""

    quick: bool
    device: torch.device
    preset: str
    backends: tuple
    skipped: dict                 # backend -> reason it is not run in this plan
    warmup: int
    timed: int
    grok: tuple                   # GrokSpec, ...
    scaling: dict                 # axis -> values
    scaling_backends: tuple
    scaling_warmup: int
    scaling_timed: int
    ceilings: bool = True


def make_plan(quick: bool = False, device=None, preset: str | None = None, backends=None,
              scaling_backends=None, timed: int | None = None, warmup: int | None = None,
              grok: bool = True, scaling: bool = True, grok_max_steps: int | None = None) -> Plan:
    """Validate the choices (ConfigError, before any work) and fill in the defaults for the device.

    Defaults: nanda on a GPU, small (x+y mod 31) on a CPU. --quick: fewer steps, small scaling grids, and
    the torch.compile backends left out unless named in ``backends`` (compiling takes tens of seconds to
    minutes: that is not a quick run)."""
    from .train import default_preset_name, resolve_device

    device = resolve_device(device)
    preset = preset or default_preset_name(device)
    get_preset(preset)

    def parse(names, what):
        if names is None:
            return None
        if isinstance(names, str):
            names = [s.strip() for s in names.split(",") if s.strip()]
        bad = [n for n in names if n not in BACKENDS]
        if bad or not names:
            raise ConfigError(f"{what} {','.join(bad) or '(empty)'} unknown; choose from: {', '.join(BACKENDS)}")
        return tuple(dict.fromkeys(names))

    chosen = parse(backends, "--backends")
    skipped = {}
    if chosen is None:
        chosen = BACKENDS
        if quick:
            for b in COMPILE_MODES:
                skipped[b] = ("not run in --quick: torch.compile takes tens of seconds to minutes to compile; "
                              "run without --quick, or name it in --backends")
    else:
        for b in BACKENDS:
            if b not in chosen:
                skipped[b] = "not asked for (--backends)"
    if EAGER not in chosen:
        raise ConfigError(f"--backends must include {EAGER}: every ratio is taken against it")
    sb = parse(scaling_backends, "--scaling-backends") or tuple(b for b in (EAGER, "fused", "fused-cudagraph"))
    for name, v in (("--timed-steps", timed), ("--warmup-steps", warmup), ("--grok-max-steps", grok_max_steps)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    gpu = device.type == "cuda"

    if quick:
        w, n = (20, 200) if gpu else (2, 10)
        sw, sn = (10, 50) if gpu else (1, 3)
        axes = {"p": (11, 31) if not gpu else (31, 113, 257), "frac": (0.3, 0.7),
                "d_model": (32, 128) if not gpu else (64, 128, 256), "M": (1, 2) if not gpu else (1, 8)}
        if gpu:
            runs = (GrokSpec("nanda, Grokfast-EMA", "nanda", 5000, 10, {"grokfast": "ema"}),)
        else:
            runs = (GrokSpec("small (x+y mod 31), Grokfast-EMA, capped", "small", 100, 25, {}),)
    else:
        w, n = (50, 500) if gpu else (10, 100)
        sw, sn = (10, 100) if gpu else (3, 20)
        axes = {"p": (31, 59, 97, 113, 167, 211, 257), "frac": (0.1, 0.3, 0.5, 0.7, 0.9),
                "d_model": (32, 64, 128, 256), "M": (1, 4, 16, 64)}
        # Grokfast paper (Lee et al. 2024): x*y mod 97, EMA alpha 0.98, lamb 2.0, weight decay 0.005.
        runs = (GrokSpec("nanda, no filter", "nanda", 25000, 50, {"grokfast": "none"}),
                GrokSpec("nanda, Grokfast-EMA", "nanda", 25000, 10, {"grokfast": "ema"}),
                GrokSpec("Grokfast paper task (power), baseline", "power", 100000, 100, {"grokfast": "none"}),
                GrokSpec("Grokfast paper task (power), Grokfast-EMA", "power", 20000, 10,
                         {"grokfast": "ema", "alpha": 0.98, "lamb": 2.0, "wd": 0.005}))
        if not gpu:
            runs = (GrokSpec("small (x+y mod 31), Grokfast-EMA", "small", 3000, 25, {}),
                    GrokSpec("small (x+y mod 31), no filter", "small", 3000, 25, {"grokfast": "none"}))
    if grok_max_steps is not None:
        runs = tuple(dataclasses.replace(r, max_steps=grok_max_steps) for r in runs)
    if grok:
        for r in runs:
            get_preset(r.preset)
    return Plan(quick, device, preset, chosen, skipped, warmup or w, timed or n, runs if grok else (),
                axes if scaling else {}, sb, sw, sn)


# --------------------------------------------------------------------------------------------------
# Measurements


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr, leave=False)


def measure_backend(name: str, wl: Workload, device, warmup: int, timed: int, telemetry: Telemetry,
                    skip_reason: str | None = None, progress: bool = False) -> dict:
    """One row: the backend's step on the workload, measured, or 'not available' with the reason."""
    ok, reason = backend_status(name, wl, device, skip_reason=skip_reason)
    row = {"backend": name, "workload": wl.label, "M": wl.M}
    if not ok:
        row.update(status="not available", reason=reason)
        return row
    tok, lab = wl.task.train.tokens, wl.task.train.labels
    bar = _progress(warmup + timed, f"{name} {wl.label}", progress)
    try:
        models: list = []
        steppers = make_steppers(name, wl, device, models)

        def step():
            for s in steppers:
                s.step(tok, lab)

        mark = {}
        res = time_steps(step, device, warmup, timed, on_timed_start=lambda: mark.update(t=telemetry.begin()),
                         progress=bar.update if bar is not None else None)
        tel = telemetry.end(mark.get("t"), timed)
    except Exception as e:  # an honest failure is a result too: say what broke
        first_line = str(e).splitlines()[0] if str(e) else ""
        row.update(status="not available", reason=f"failed while running: {type(e).__name__}: {first_line}",
                   error=traceback.format_exc())
        return row
    finally:
        if bar is not None:
            bar.close()
    row.update(status="measured", reason=reason, stats=time_stats(res["times_s"], res["wall_s"]),
               first_step_s=res["first_step_s"], warmup_s=res["warmup_s"], warmup=warmup, times_s=res["times_s"])
    if name in COMPILE_MODES:
        row["compile_s_note"] = "first_step_s includes compiling forward, backward and the optimizer"
    if name.startswith("fused"):
        # whether the stepper really replays a captured graph (FusedStepper keeps it in _graph)
        row["cuda_graph_captured"] = getattr(steppers[0], "_graph", None) is not None
    if tel is not None:
        row["telemetry"] = tel
    # every backend took the same steps from the same weights: compare the first model's at the end
    row["_final_params"] = {n: p.detach().to("cpu", torch.float64, copy=True) for n, p in models[0].named_parameters()}
    return row


def attach_ratios_and_floor(rows: list[dict], cost: dict, ceilings: dict) -> None:
    """speedup_vs_eager (eager median / median) and floor fractions (floor / median) on measured rows."""
    eager = next((r for r in rows if r["backend"] == EAGER and r["status"] == "measured"), None)
    fl = floors(cost, ceilings)
    ref = eager.get("_final_params") if eager else None
    for r in rows:
        if r["status"] != "measured":
            continue
        med = r["stats"]["median_s"]
        r["speedup_vs_eager"] = eager["stats"]["median_s"] / med if eager else None
        r["speedup_vs"] = {o["backend"]: o["stats"]["median_s"] / med for o in rows
                           if o["status"] == "measured" and o is not r}
        r["fraction_of_floor"] = {k: v["floor_s"] / med for k, v in fl.items()}
        mine = r.get("_final_params")
        if ref is not None and mine is not None:
            # ||theta - theta_eager|| / ||theta_eager|| over all parameters after the same steps: the same
            # work was done (float32 rounding grows over many steps, so this is a figure, not a pass/fail)
            num = math.sqrt(sum(float((mine[n] - ref[n]).pow(2).sum()) for n in ref))
            den = math.sqrt(sum(float(ref[n].pow(2).sum()) for n in ref))
            r["params_rel_diff_vs_eager"] = num / den if den > 0 else None
    for r in rows:
        r.pop("_final_params", None)


def time_to_grok(spec: GrokSpec, backend: str, device, progress: bool = False) -> dict:
    """grokfast.train with stop_at_grok on one of the trainer's backends; steps and wall seconds to 95%
    and 99% test accuracy (wall from the trainer's clock: it includes the evaluations every eval_every
    steps)."""
    from .train import train

    row = {"run": spec.label, "backend": backend, "preset": spec.preset, "max_steps": spec.max_steps,
           "eval_every": spec.eval_every, "overrides": dict(spec.overrides)}
    tb = TRAIN_BACKENDS.get(backend)
    if tb is None:
        why = ("grokfast.train's fused backend replays the step's CUDA graph: see the fused-cudagraph row"
               if backend == "fused" else
               "grokfast.train trains with the reference (eager) or the fused stepper; the compiled step is "
               "timed in the step table only")
        row.update(status="not available", reason=why)
        return row
    pre = get_preset(spec.preset)
    task = Task.from_spec(pre.task, seed=0, device=device)
    tcfg = dataclasses.replace(pre.train, steps=spec.max_steps, eval_every=spec.eval_every, stop_at_grok=True,
                               backend=tb, checkpoint_every=max(spec.max_steps, 1), **spec.overrides)
    wl = Workload(spec.label, task, pre.model.for_task(task), tcfg)
    ok, reason = backend_status(backend, wl, device)
    if not ok:
        row.update(status="not available", reason=reason)
        return row
    bar = _progress(spec.max_steps, f"grok: {spec.label} [{backend}]", progress)
    logs: list[str] = []
    try:
        run = train(task, wl.model, tcfg, device=device, progress=False, log=logs.append,
                    on_step=(lambda s: bar.update(1)) if bar is not None else None)
    except Exception as e:
        row.update(status="not available", reason=f"failed while training: {type(e).__name__}: {e}")
        return row
    finally:
        if bar is not None:
            bar.close()
    s = run.summary
    row.update(status="measured", reason=reason, trainer_log=logs,
               task=task.spec(), batch_size=tcfg.batch_size, grokfast=tcfg.grokfast, wd=tcfg.wd,
               steps_to_grok_95=s.get("steps_to_grok_95"), seconds_to_grok_95=s.get("seconds_to_grok_95"),
               steps_to_grok=s.get("steps_to_grok"), seconds_to_grok=s.get("seconds_to_grok"),
               steps_done=s["steps_done"], wall_seconds=s["wall_seconds"],
               final_test_acc=s.get("final_test_acc"), final_train_acc=s.get("final_train_acc"),
               history=run.history)
    return row


def scaling_points(plan: Plan) -> list[tuple[str, object, Workload]]:
    out = []
    for axis, values in plan.scaling.items():
        for v in values:
            kw = {axis: v}
            out.append((axis, v, make_workload(plan.preset, plan.device, label=f"{plan.preset} {axis}={v}", **kw)))
    return out


# --------------------------------------------------------------------------------------------------
# The report


def fused_launches(wl: Workload) -> dict:
    """The fused step's kernel launches for the workload, counted on meta tensors (no GPU needed):
    {"forward_backward": {kernel: n}, "optimizer": n, "total": n} or {"unavailable": reason}."""
    try:
        from grokfast.kernels import forward_backward as fb
        why = fb.supported(wl.model)
        if why:
            return {"unavailable": why}
        counts = fb.launches_per_step(wl.model, wl.M, wl.batch_size())
    except Exception as e:  # no triton here: say so
        return {"unavailable": f"{type(e).__name__}: {e}"}
    from grokfast.kernels import optimizer
    return {"forward_backward": counts, "optimizer": optimizer.LAUNCHES,
            "total": sum(counts.values()) + optimizer.LAUNCHES}


def run_report(plan: Plan, out_dir, command: str | None = None, progress: bool = True,
               log: Callable[[str], None] | None = None) -> dict:
    """Measure everything the plan asks for and write report.json (every raw figure), report.md and the
    figures into ``out_dir``. Returns the report dict."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = plan.device
    command = command if command is not None else " ".join(shlex.quote(a) for a in sys.argv)
    tel = Telemetry(device)
    env = environment(device, tel, command)
    log(f"bench: {env['device']}; telemetry: {tel.reason}")

    part, peaks = datasheet_for(env["device"]) if device.type == "cuda" else (None, None)
    ceilings = datasheet_ceilings(part, peaks)
    measured_ceilings = {}
    if plan.ceilings:
        measured_ceilings = measure_ceilings(device, plan.quick)
        ceilings.update(measured_ceilings)

    # Step time, every backend on the same work.
    wl = make_workload(plan.preset, device)
    steps = []
    for b in BACKENDS:
        steps.append(measure_backend(b, wl, device, plan.warmup, plan.timed, tel,
                                     skip_reason=plan.skipped.get(b), progress=progress))
    cost = step_cost(wl.model, wl.train, wl.task.train.tokens, wl.task.train.labels, wl.M)
    attach_ratios_and_floor(steps, cost, ceilings)
    launches = fused_launches(wl)

    # Time to grok.
    grok_rows = []
    for spec in plan.grok:
        for b in BACKENDS:
            if b in plan.skipped and b in TRAIN_BACKENDS:
                grok_rows.append({"run": spec.label, "backend": b, "status": "not available",
                                  "reason": plan.skipped[b]})
                continue
            grok_rows.append(time_to_grok(spec, b, device, progress=progress))
    for r in grok_rows:
        if r.get("status") == "measured" and r.get("steps_to_grok") is not None:
            row_med = next((s["stats"]["median_s"] for s in steps if s["backend"] == r["backend"]
                            and s["status"] == "measured"), None)
            if (row_med is not None and r["preset"] == plan.preset and r.get("batch_size") is None
                    and r.get("grokfast") == wl.train.grokfast):
                r["step_seconds_to_grok"] = r["steps_to_grok"] * row_med
                r["step_seconds_note"] = ("steps to 99% x the median step time measured above (same preset, "
                                          "filter and full batch)")

    # Scaling.
    scaling = {axis: [] for axis in plan.scaling}
    for axis, value, swl in scaling_points(plan):
        rows = []
        for b in BACKENDS:
            skip = plan.skipped.get(b)
            if skip is None and b not in plan.scaling_backends:
                skip = "not run in the scaling sweep (pass --scaling-backends to include it)"
            rows.append(measure_backend(b, swl, device, plan.scaling_warmup, plan.scaling_timed, tel,
                                        skip_reason=skip, progress=progress))
        c = step_cost(swl.model, swl.train, swl.task.train.tokens, swl.task.train.labels, swl.M)
        attach_ratios_and_floor(rows, c, ceilings)
        scaling[axis].append({"value": value, "workload": swl.describe(), "cost": c,
                              "floors": floors(c, ceilings), "rows": rows})

    report = {"environment": env,
              "plan": {"quick": plan.quick, "device": str(device), "preset": plan.preset,
                       "backends": list(plan.backends), "skipped": plan.skipped, "warmup": plan.warmup,
                       "timed": plan.timed, "scaling": {k: list(v) for k, v in plan.scaling.items()},
                       "scaling_backends": list(plan.scaling_backends), "scaling_warmup": plan.scaling_warmup,
                       "scaling_timed": plan.scaling_timed,
                       "grok": [dataclasses.asdict(g) for g in plan.grok]},
              "timing_method": ("CUDA events around every step, recorded back to back" if device.type == "cuda"
                                else "time.perf_counter around every step"),
              "workload": wl.describe(), "cost": cost, "ceilings": ceilings, "floors": floors(cost, ceilings),
              "steps": steps, "launches": launches, "grok": grok_rows, "scaling": scaling}
    write_report(report, out)
    return report


def _fmt_s(x) -> str:
    if x is None:
        return "n/a"
    if x >= 1:
        return f"{x:.3g} s"
    if x >= 1e-3:
        return f"{x * 1e3:.3g} ms"
    return f"{x * 1e6:.3g} us"


def _fmt_rel(x) -> str:
    return "n/a" if x is None else f"{x:.1e}"


def _fmt_n(x, unit="") -> str:
    if x is None:
        return "n/a"
    for k, s in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= k:
            return f"{x / k:.3g} {s}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def render_markdown(report: dict, figures: dict) -> str:
    """The Markdown report: device, date, versions and command first; then every table."""
    env, wl, cost = report["environment"], report["workload"], report["cost"]
    L = []
    L.append(f"# grokfast bench: {env['device']}, {env['date_utc']}")
    L.append("")
    g = env["git"]
    L.append(f"- command: `{env['command']}`")
    L.append(f"- git commit: {g['commit'] or 'unknown'}{' (with uncommitted changes)' if g.get('dirty') else ''}")
    L.append(f"- python {env['python']}, torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda') or 'n/a'}, "
             f"driver {env.get('driver') or 'n/a'}; {env['platform']}; CPU: {env['cpu']} "
             f"({env['cpu_count']} cores, torch threads {env['torch_threads']})")
    L.append(f"- telemetry: {env['telemetry']}")
    L.append(f"- fused kernels' float32 dots: {env.get('dot_precision', 'ieee')} (GROKFAST_DOT_PRECISION); "
             f"up to {env.get('gemm_group', '3')} independent products per launch (GROKFAST_GEMM_GROUP)")
    L.append(f"- timing: {report['timing_method']}; {report['plan']['warmup']} warm-up steps, "
             f"{report['plan']['timed']} timed steps per backend" + ("; --quick" if report["plan"]["quick"] else ""))
    L.append("")
    m = wl["model"]
    L.append(f"## Step time: one full-batch training step ({env['device']}, {env['date_utc']})")
    L.append("")
    L.append(f"Work: {wl['label']}: {wl['task']['op']} mod {wl['task']['p']}, {wl['n_train']} training examples "
             f"(full batch), {m['n_layers']} layer(s), d_model {m['d_model']}, {m['n_heads']} heads x {m['d_head']}, "
             f"d_mlp {m['d_mlp']}, {m['act']}, {wl['n_params']} parameters, Grokfast {wl['grokfast']}.")
    L.append("")
    fl_names = list(report["floors"])
    L.append("| backend | status | median | p10 | p90 | min | steps/s | speed-up vs eager | first step (compile) | "
             "weights vs eager after all steps | " + " | ".join(f"floor / median ({n})" for n in fl_names) + " |")
    L.append("|" + "---|" * (10 + len(fl_names)))
    for r in report["steps"]:
        if r["status"] != "measured":
            L.append(f"| {r['backend']} | not available: {r['reason']} |" + " |" * (8 + len(fl_names)))
            continue
        s = r["stats"]
        sp = r.get("speedup_vs_eager")
        L.append(f"| {r['backend']} | measured | {_fmt_s(s['median_s'])} | {_fmt_s(s['p10_s'])} | {_fmt_s(s['p90_s'])} | "
                 f"{_fmt_s(s['min_s'])} | {s['steps_per_s']:.4g} | {'n/a' if sp is None else f'{sp:.3g}x'} | "
                 f"{_fmt_s(r.get('first_step_s'))} | {_fmt_rel(r.get('params_rel_diff_vs_eager'))} | "
                 + " | ".join(f"{r['fraction_of_floor'].get(n, float('nan')):.3g}" for n in fl_names) + " |")
    for r in report["steps"]:
        if r["backend"].startswith("fused") and r["status"] == "measured":
            L.append("")
            L.append(f"{r['backend']}: CUDA graph captured and replayed: {'yes' if r.get('cuda_graph_captured') else 'no'}.")
    la = report.get("launches") or {}
    L.append("")
    if "total" in la:
        L.append(f"Fused step: {la['total']} kernel launches (forward + backward "
                 + ", ".join(f"{n} x{c}" for n, c in la["forward_backward"].items())
                 + f"; optimizer {la['optimizer']}), counted.")
    elif la:
        L.append(f"Fused step launches: not counted ({la.get('unavailable')}).")
    fused = next((r for r in report["steps"] if r["backend"] == "fused-cudagraph" and r["status"] == "measured"), None)
    if fused and fused.get("speedup_vs"):
        L.append("")
        L.append("fused-cudagraph against the others (median over median): "
                 + ", ".join(f"{v:.3g}x {k}" for k, v in fused["speedup_vs"].items()) + ".")
    L.append("")
    L.append("## The floor")
    L.append("")
    L.append(f"One step must do {_fmt_n(cost['flops'], 'FLOP')} ({_fmt_n(cost['matmul_flops'], 'FLOP')} of it in "
             f"products) and move at least {_fmt_n(cost['bytes'], 'B')} (counting in grokfast.bench.step_cost; "
             f"R = {cost['counts']['R']} distinct (position, token) pairs).")
    L.append("")
    L.append("| part | FLOPs |")
    L.append("|---|---|")
    for k, v in cost["flops_by_part"].items():
        L.append(f"| {k} | {_fmt_n(v)} |")
    L.append("")
    L.append("| part | bytes |")
    L.append("|---|---|")
    for k, v in cost["bytes_by_part"].items():
        L.append(f"| {k} | {_fmt_n(v)} |")
    L.append("")
    if report["floors"]:
        L.append("| peak rates | FLOP/s | bytes/s | compute time | memory time | floor | bound |")
        L.append("|---|---|---|---|---|---|---|")
        for n, f in report["floors"].items():
            c = report["ceilings"][n]
            L.append(f"| {n} | {_fmt_n(c['flops_per_s'])}" + (f" (products {_fmt_n(c['matmul_flops_per_s'])})"
                                                               if c.get("matmul_flops_per_s") else "")
                     + f" | {_fmt_n(c['bytes_per_s'])} | {_fmt_s(f['compute_s'])} | {_fmt_s(f['memory_s'])} | "
                       f"{_fmt_s(f['floor_s'])} | {f['bound']} |")
        if "measured" in report["ceilings"]:
            L.append("")
            L.append(f"Measured ceilings: {report['ceilings']['measured']['how']}.")
    if not any(k.startswith("datasheet") for k in report["ceilings"]):
        L.append("")
        L.append("No datasheet peaks for this device: datasheet floor fractions n/a.")
    L.append("")
    if report["grok"]:
        L.append(f"## Time to grok ({env['device']}, {env['date_utc']})")
        L.append("")
        L.append("grokfast.train with stop_at_grok; wall seconds are the trainer's clock and include evaluations.")
        L.append("")
        L.append("| run | backend | status | steps to 95% | s to 95% | steps to 99% | s to 99% | steps x median step | "
                 "steps run | final test acc |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in report["grok"]:
            if r["status"] != "measured":
                L.append(f"| {r['run']} | {r['backend']} | not available: {r['reason']} | | | | | | | |")
                continue
            nr = f"not reached in {r['steps_done']}"
            L.append(f"| {r['run']} | {r['backend']} | measured | {r['steps_to_grok_95'] if r['steps_to_grok_95'] is not None else nr} | "
                     f"{_fmt_s(r['seconds_to_grok_95'])} | {r['steps_to_grok'] if r['steps_to_grok'] is not None else nr} | "
                     f"{_fmt_s(r['seconds_to_grok'])} | {_fmt_s(r.get('step_seconds_to_grok'))} | {r['steps_done']} | "
                     f"{r['final_test_acc']:.4f} |")
        L.append("")
        L.append("Published (ANCHORS.md, Lee et al. 2024, one GTX 1080 Ti, batch 512): iterations to 95% "
                 "validation accuracy, baseline 39890, Grokfast-EMA 910.")
        L.append("")
    for axis, pts in report["scaling"].items():
        if not pts:
            continue
        L.append(f"## Scaling: step time against {axis} ({env['device']}, {env['date_utc']})")
        L.append("")
        names = [r["backend"] for r in pts[0]["rows"]]
        fl = next(iter(pts[0]["floors"]), None)
        L.append(f"| {axis} | " + " | ".join(names) + (f" | floor ({fl})" if fl else "") + " |")
        L.append("|" + "---|" * (1 + len(names) + (1 if fl else 0)))
        for pt in pts:
            cells = [_fmt_s(r["stats"]["median_s"]) if r["status"] == "measured" else "not available"
                     for r in pt["rows"]]
            L.append(f"| {pt['value']} | " + " | ".join(cells) + (f" | {_fmt_s(pt['floors'][fl]['floor_s'])}" if fl else "") + " |")
        reasons = {r["backend"]: r["reason"] for pt in pts for r in pt["rows"] if r["status"] != "measured"}
        if reasons:
            L.append("")
            for b, why in reasons.items():
                L.append(f"- {b}: not available: {why}")
        if axis == "M":
            L.append("")
            L.append("M > 1: the M models' steps run in turn (M single runs), unless a backend batches them.")
        L.append("")
    if figures:
        L.append("## Figures")
        L.append("")
        for what, name in figures.items():
            L.append(f"![{what}]({name})")
        L.append("")
    tel_rows = [r for r in report["steps"] if r.get("telemetry")]
    if tel_rows:
        L.append("## GPU telemetry (step-time runs, read before and after the timed steps)")
        L.append("")
        L.append("| backend | energy per step | mean power | SM clock after | utilisation after | temperature after | memory used after |")
        L.append("|---|---|---|---|---|---|---|")
        for r in tel_rows:
            t, a = r["telemetry"], r["telemetry"]["after"]
            L.append(f"| {r['backend']} | {_fmt_n(t.get('energy_per_step_J'), 'J')} | {_fmt_n(t.get('mean_power_W'), 'W')} | "
                     f"{a.get('sm_clock_MHz')} MHz | {a.get('utilization_pct')}% | {a.get('temperature_C')} C | "
                     f"{a.get('memory_used_MiB') and round(a['memory_used_MiB'])} MiB |")
        L.append("")
    else:
        L.append(f"Telemetry: {env['telemetry']}.")
        L.append("")
    return "\n".join(L)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.device, Path)):
        return str(o)
    return repr(o)


def write_report(report: dict, out: Path) -> dict:
    """report.json, the figures, report.md; returns {what: file name} of the figures."""
    from . import plots
    from .rundir import write_text

    out = Path(out)
    env = report["environment"]
    stamp = f"{env['device']}, {env['date_utc']}"
    figures = {}
    try:
        figures["step time"] = plots.bench_step_figure(report["steps"], out / "step_time.png",
                                                       title=f"one training step: {report['workload']['label']} ({stamp})").name
        for axis, pts in report["scaling"].items():
            if pts:
                figures[f"scaling: {axis}"] = plots.bench_scaling_figure(
                    axis, pts, out / f"scaling_{axis}.png", title=f"step time against {axis} ({stamp})").name
    except Exception as e:  # the numbers must survive a figure that fails
        report.setdefault("figure_errors", []).append(f"{type(e).__name__}: {e}")
    report["figures"] = figures
    write_text(out / "report.json", json.dumps(report, indent=1, default=_json_default) + "\n")
    write_text(out / "report.md", render_markdown(report, figures))
    return figures


# ------------------------------------------------------------------------------ sweep throughput

SWEEP_MS = (1, 8, 64, 256)


def sweep_throughput(wl: Workload, device, Ms=SWEEP_MS, run_steps: int | None = None, warmup: int = 3,
                     timed: int = 20, allow_interpreter: bool = False) -> dict:
    """Runs per hour of the batched fused executor at M models per launch against M single runs.

    Single run: the trainer's fused stepper (CUDA graph) on one model, plus the trainer's evaluation
    (the reference model over the train and test splits) every ``eval_every`` steps: seconds per step
    t_1 = step median + eval median / eval_every. Batched: BatchedStepper.step over M models (distinct
    seeds, data seeds and learning rates) plus its eval_flat evaluation every eval_every steps:
    t_M = step median + eval median / eval_every. A run of ``run_steps`` steps (default: the workload's
    steps) then gives runs/hour = 3600 / (run_steps t_1) single, 3600 M / (run_steps t_M) batched, and
    the speed-up M t_1 / t_M (M single runs go one after another on the device). Runs that grok early
    and leave the batch make a real sweep faster than this fixed-M figure; file writing is left out
    of both sides. Needs a CUDA GPU (or, with allow_interpreter, TRITON_INTERPRET=1 for tests).
    Returns {"workload", "run_steps", "single": {...}, "rows": [{"M", "status", ...}]}."""
    from .backends import interpreter_on
    from .train import evaluate

    device = torch.device(device)
    if device.type != "cuda" and not (allow_interpreter and interpreter_on()):
        return {"status": "not available", "reason": "the sweep throughput benchmark needs a CUDA GPU"}
    from grokfast import kernels

    steps = run_steps or wl.train.steps
    k = wl.train.eval_every
    tcfg = dataclasses.replace(wl.train, batch_size=None, backend="fused")
    task = wl.task

    def stats(r):
        return statistics.median(r["times_s"])

    model = Transformer(wl.model, seed=0, device=device)
    st1 = kernels.make_stepper(model, tcfg)
    tr, te = task.train, task.test
    one = stats(time_steps(lambda: st1.step(tr.tokens, tr.labels), device, warmup, timed))
    ev1 = stats(time_steps(lambda: (evaluate(model, tr.tokens, tr.labels), evaluate(model, te.tokens, te.labels)),
                           device, 1, max(2, timed // 5)))
    t1 = one + ev1 / k
    single = {"step_s": one, "eval_s": ev1, "seconds_per_step": t1, "runs_per_hour": 3600 / (steps * t1)}
    del st1, model
    rows = []
    for M in Ms:
        row = {"M": M}
        try:
            tasks = [Task(task.op, task.p, task.frac, i, task.layout, device=device) for i in range(M)]
            models = [Transformer(wl.model, seed=i, device=device) for i in range(M)]
            tcfgs = [dataclasses.replace(tcfg, seed=i, lr=tcfg.lr * (1 + 0.01 * i)) for i in range(M)]
            st = kernels.make_batched_stepper(models, tcfgs, ([t.train.tokens for t in tasks],
                                                              [t.train.labels for t in tasks]),
                                              ([t.test.tokens for t in tasks], [t.test.labels for t in tasks]))
            del models, tasks
            sm = stats(time_steps(st.step, device, warmup, timed))
            ev = stats(time_steps(st.evaluate, device, 1, max(2, timed // 5)))
            tm = sm + ev / k
            row.update(status="measured", step_s=sm, eval_s=ev, seconds_per_step=tm,
                       runs_per_hour=3600 * M / (steps * tm), single_runs_per_hour=single["runs_per_hour"],
                       speedup=M * t1 / tm)
            del st
        except torch.OutOfMemoryError as e:
            row.update(status="not available", reason=f"out of memory at M={M}: {str(e).splitlines()[0]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    return {"status": "measured", "workload": wl.describe(), "run_steps": steps, "eval_every": k,
            "single": single, "rows": rows}


def render_sweep_throughput(res: dict) -> str:
    """The sweep throughput result as a markdown table."""
    if res.get("status") != "measured":
        return f"sweep throughput: not available ({res.get('reason')})\n"
    s = res["single"]
    lines = [f"Sweep throughput, {res['workload']['label']}, runs of {res['run_steps']} steps, evaluation every "
             f"{res['eval_every']}: single fused run {s['seconds_per_step'] * 1e6:.1f} us/step, "
             f"{s['runs_per_hour']:.1f} runs/hour", "",
             "| M | us per batched step | runs/hour | single runs/hour | speed-up |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        if r["status"] == "measured":
            lines.append(f"| {r['M']} | {r['seconds_per_step'] * 1e6:.1f} | {r['runs_per_hour']:.1f} | "
                         f"{r['single_runs_per_hour']:.1f} | {r['speedup']:.1f}x |")
        else:
            lines.append(f"| {r['M']} | not available: {r['reason']} | | | |")
    return "\n".join(lines) + "\n"
