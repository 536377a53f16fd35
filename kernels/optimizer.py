"""The fused optimizer: Grokfast gradient filter then AdamW, one kernel pass over flat [M, N] buffers.

Per element of model m (the formulas of grokfast/optim.py, which is the reference), with the
optimizer step t = 1, 2, ... and the filter's count c = raw gradients seen before this one:

    Grokfast EMA (alpha_m, lamb_m):  ema <- g if c == 0 else alpha_m * ema + (1 - alpha_m) * g
                                     g   <- g + lamb_m * ema
    Grokfast MA (window W, lamb_m):  ring[c mod W] <- g
                                     g   <- g + lamb_m * (sum_{w=0}^{W-1} ring[w]) / W   once c + 1 >= W
    AdamW (lr_m, wd_m, beta1, beta2, eps), lr_t = lr_m * min(1, t / warmup) (lr_m when warmup = 0):
        theta <- theta * (1 - lr_t * wd_m)
        mom   <- beta1 * mom + (1 - beta1) * g
        vel   <- beta2 * vel + (1 - beta2) * g^2
        theta <- theta - (lr_t / (1 - beta1^t)) * mom / (sqrt(vel / (1 - beta2^t)) + eps)

Everything the step depends on lives on the device: the per-model hyperparameters lr, wd, alpha,
lamb are [M] float32 tensors (a sweep trains M models with different settings in one launch) and
the counters (t, c) are an int64 tensor [2] that the kernel reads and a tiny in-place add advances
after it, so a whole training step can be captured in a CUDA graph and replayed with no host sync.
(The kernel cannot advance the counters itself: its programs run in any order and all read them.)

The MA mean is an exact sum over the W ring slots in the fixed order w = 0..W-1 (like the
reference), so MA reads W + 4 floats per element per step once the window is full.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

FILTERS = {"none": 0, "ema": 1, "ma": 2}
BLOCK = 1024       # elements per program; N need not be a multiple (masked)
NUM_WARPS = 4


@triton.jit
def grokfast_adamw_kernel(
    param_ptr,      # [M, N] float32, updated in place
    grad_ptr,       # [M, N] float32 raw gradients (read only)
    mom_ptr,        # [M, N] float32 AdamW first moment m, updated in place
    vel_ptr,        # [M, N] float32 AdamW second moment v, updated in place
    ema_ptr,        # [M, N] float32 Grokfast-EMA state (read only when FILTER == 1)
    ring_ptr,       # [M, W, N] float32 raw-gradient ring (read only when FILTER == 2)
    lr_ptr,         # [M] float32 peak learning rate per model
    wd_ptr,         # [M] float32 decoupled weight decay per model
    alpha_ptr,      # [M] float32 EMA momentum per model
    lamb_ptr,       # [M] float32 Grokfast amplification per model
    counter_ptr,    # [2] int64: optimizer steps done t-1, raw gradients seen by the filter c
    N,              # parameters per model
    window,         # W, the MA window (>= 1)
    warmup,         # linear warm-up steps (0: none)
    beta1, beta2, eps,
    FILTER: tl.constexpr,   # 0 none, 1 EMA, 2 MA
    BLOCK: tl.constexpr,
):
    """One Grokfast + AdamW step for block ``pid(1)`` of model ``pid(0)``; grid (M, cdiv(N, BLOCK))."""
    model = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    row = model * N + offs

    t = (tl.load(counter_ptr) + 1).to(tl.float32)      # this step, 1-based
    count = tl.load(counter_ptr + 1)
    lr = tl.load(lr_ptr + model)
    wd = tl.load(wd_ptr + model)

    g = tl.load(grad_ptr + row, mask=mask, other=0.0)
    if FILTER == 1:
        alpha = tl.load(alpha_ptr + model)
        lamb = tl.load(lamb_ptr + model)
        ema = tl.load(ema_ptr + row, mask=mask, other=0.0)
        # where(), not arithmetic: the state before the first step may hold anything (even NaN).
        ema = tl.where(count == 0, g, alpha * ema + (1.0 - alpha) * g)
        tl.store(ema_ptr + row, ema, mask=mask)
        g = g + lamb * ema
    elif FILTER == 2:
        lamb = tl.load(lamb_ptr + model)
        slot = count % window
        ring_row = model * window * N + offs
        if count + 1 >= window:
            # The slot being replaced contributes g itself: no read-after-write of global memory.
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for w in range(0, window):
                old = tl.load(ring_ptr + ring_row + w * N, mask=mask, other=0.0)
                acc += tl.where(w == slot, g, old)
            tl.store(ring_ptr + ring_row + slot * N, g, mask=mask)
            g = g + lamb * (acc / window)
        else:
            tl.store(ring_ptr + ring_row + slot * N, g, mask=mask)

    sched = tl.where(warmup > 0, tl.minimum(t / tl.maximum(warmup, 1).to(tl.float32), 1.0), 1.0)
    lr_t = lr * sched
    # beta^t = 2^(t log2 beta); beta = 0 gives 2^-inf = 0, as the reference's 0 ** t.
    bc1 = 1.0 - tl.exp2(t * tl.log2(beta1))
    bc2 = 1.0 - tl.exp2(t * tl.log2(beta2))

    p = tl.load(param_ptr + row, mask=mask, other=0.0)
    mom = tl.load(mom_ptr + row, mask=mask, other=0.0)
    vel = tl.load(vel_ptr + row, mask=mask, other=0.0)
    p = p * (1.0 - lr_t * wd)
    mom = beta1 * mom + (1.0 - beta1) * g
    vel = beta2 * vel + (1.0 - beta2) * (g * g)
    denom = tl.sqrt(vel / bc2) + eps
    p = p - (lr_t / bc1) * (mom / denom)
    tl.store(param_ptr + row, p, mask=mask)
    tl.store(mom_ptr + row, mom, mask=mask)
    tl.store(vel_ptr + row, vel, mask=mask)


def aot_specs() -> list[dict]:
    """The optimizer kernel's compile specs (one per filter) for grokfast.kernels.aot; its code does
    not depend on M or N (both are runtime arguments)."""
    sig = {"param_ptr": "*fp32", "grad_ptr": "*fp32", "mom_ptr": "*fp32", "vel_ptr": "*fp32",
           "ema_ptr": "*fp32", "ring_ptr": "*fp32", "lr_ptr": "*fp32", "wd_ptr": "*fp32",
           "alpha_ptr": "*fp32", "lamb_ptr": "*fp32", "counter_ptr": "*i64", "N": "i32", "window": "i32",
           "warmup": "i32", "beta1": "fp32", "beta2": "fp32", "eps": "fp32",
           "FILTER": "constexpr", "BLOCK": "constexpr"}
    # Torch allocations are 16-byte aligned; triton's launcher specialises on it, so compile it in too.
    aligned = [i for i, k in enumerate(sig) if k.endswith("_ptr")]
    return [dict(name=f"grokfast_adamw[{kind}]", fn=grokfast_adamw_kernel, signature=sig,
                 constexprs={"FILTER": code, "BLOCK": BLOCK},
                 attrs={(i,): [["tt.divisibility", 16]] for i in aligned}, num_warps=NUM_WARPS)
            for kind, code in FILTERS.items()]


def _per_model(name: str, value, M: int, device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(M)
    if t.numel() != M:
        from grokfast.config import ConfigError
        raise ConfigError(f"{name} needs one value or one per model ({M}), got {t.numel()}")
    return t.to(device).contiguous().clone()


class FusedOptimizer:
    """Grokfast filter + AdamW state for M models of N parameters each, stepped by one kernel launch.

    State (all on ``device``): ``mom``, ``vel`` [M, N] (AdamW m, v), ``ema`` [M, N] (EMA only),
    ``ring`` [M, W, N] (MA only, slot c mod W holds the c-th raw gradient), ``counters`` [2] int64
    (t - 1 steps done, c raw gradients seen; c stays 0 without a filter, as in the reference).
    lr, wd, alpha, lamb: a float or a sequence of M (one per model). Assumes float32 contiguous
    [M, N] params and grads on the same device.
    """

    def __init__(self, M: int, N: int, *, lr, wd, beta1: float = 0.9, beta2: float = 0.98, eps: float = 1e-8,
                 warmup: int = 0, grokfast: str = "none", alpha=0.98, lamb=2.0, window: int = 100,
                 device="cpu"):
        from grokfast.config import ConfigError
        if grokfast not in FILTERS:
            raise ConfigError(f"grokfast must be one of {', '.join(FILTERS)}, got {grokfast!r}")
        if window < 1 or warmup < 0:
            raise ConfigError(f"window must be >= 1 and warmup >= 0, got {window}, {warmup}")
        if M < 1 or N < 1:
            raise ConfigError(f"need at least one model and one parameter, got M={M}, N={N}")
        self.M, self.N, self.kind = M, N, grokfast
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.warmup, self.window = int(warmup), int(window)
        self.lr = _per_model("lr", lr, M, device)
        self.wd = _per_model("wd", wd, M, device)
        self.alpha = _per_model("alpha", alpha, M, device)
        self.lamb = _per_model("lamb", lamb, M, device)
        self.mom = torch.zeros((M, N), dtype=torch.float32, device=device)
        self.vel = torch.zeros((M, N), dtype=torch.float32, device=device)
        self.ema = torch.zeros((M, N), dtype=torch.float32, device=device) if grokfast == "ema" else None
        self.ring = (torch.zeros((M, window, N), dtype=torch.float32, device=device)
                     if grokfast == "ma" else None)
        self.counters = torch.zeros(2, dtype=torch.int64, device=device)
        self._advance = torch.tensor([1, 0 if grokfast == "none" else 1], dtype=torch.int64, device=device)

    @classmethod
    def from_configs(cls, tcfgs: Sequence, N: int, device="cpu") -> "FusedOptimizer":
        """One model per TrainConfig; they may differ in lr, wd, alpha, lamb only."""
        from grokfast.config import ConfigError
        first = tcfgs[0]
        for c in tcfgs[1:]:
            for k in ("beta1", "beta2", "eps", "warmup", "grokfast", "window"):
                if getattr(c, k) != getattr(first, k):
                    raise ConfigError(f"models trained in one launch must share {k}: got "
                                      f"{getattr(first, k)!r} and {getattr(c, k)!r}")
        return cls(len(tcfgs), N, lr=[c.lr for c in tcfgs], wd=[c.wd for c in tcfgs],
                   alpha=[c.alpha for c in tcfgs], lamb=[c.lamb for c in tcfgs], beta1=first.beta1,
                   beta2=first.beta2, eps=first.eps, warmup=first.warmup, grokfast=first.grokfast,
                   window=first.window, device=device)

    def step(self, params: torch.Tensor, grads: torch.Tensor) -> None:
        """params [M, N] <- one filtered AdamW step with raw gradients grads [M, N]. Two launches, no sync."""
        if params.shape != (self.M, self.N) or grads.shape != (self.M, self.N):
            raise ValueError(f"expected params and grads [{self.M}, {self.N}], got {tuple(params.shape)}, "
                             f"{tuple(grads.shape)}")
        if not (params.is_contiguous() and grads.is_contiguous()):
            raise ValueError("params and grads must be contiguous")
        dummy = self.mom  # never read when the filter does not use it
        grid = (self.M, triton.cdiv(self.N, BLOCK))
        grokfast_adamw_kernel[grid](
            params, grads, self.mom, self.vel,
            self.ema if self.ema is not None else dummy, self.ring if self.ring is not None else dummy,
            self.lr, self.wd, self.alpha, self.lamb, self.counters,
            self.N, self.window, self.warmup, self.beta1, self.beta2, self.eps,
            FILTER=FILTERS[self.kind], BLOCK=BLOCK, num_warps=NUM_WARPS)
        self.counters.add_(self._advance)
