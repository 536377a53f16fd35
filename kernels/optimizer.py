"""The fused optimizer: Grokfast gradient filter then AdamW, one kernel pass over flat [M, N] buffers.

Per element of model m (the formulas of grokfast/optim.py, which is the reference), with the
optimizer step t = 1, 2, ... and the filter's count c = raw gradients seen before this one:

    Grokfast EMA (alpha_m, lamb_m):  ema <- g if c == 0 else alpha_m * ema + (1 - alpha_m) * g
                                     g   <- g + lamb_m * ema
    Grokfast MA (window W, lamb_m):  ring[c mod W] <- g
                                     g   <- g + lamb_m * S / W   once c + 1 >= W,
                                     S = sum_{w=0}^{W-1} ring[w]  (the last W raw gradients)
    AdamW (lr_m, wd_m, beta1, beta2, eps), lr_t = lr_m * min(1, t / warmup) (lr_m when warmup = 0):
        theta <- theta * (1 - lr_t * wd_m)
        mom   <- beta1 * mom + (1 - beta1) * g
        vel   <- beta2 * vel + (1 - beta2) * g^2
        theta <- theta - (lr_t / (1 - beta1^t)) * mom / (sqrt(vel / (1 - beta2^t)) + eps)

Orthograd (orthograd=True; Prieto et al. 2025, grokfast/optim.py orthogonalize), per parameter tensor
of model m, on the filtered gradient g' the formulas above give (w the weights before the step):
    c = w.g' / (w.w + 1e-30),   r = |g'| / (|g' - c w| + 1e-30),   g <- (g' - c w) r   then AdamW
It needs three sums over each whole tensor before any element can be updated, so it adds one launch:
  the sums pass (grokfast_adamw_kernel with ORTHO and SUMS), grid (M, NB): block b of a tensor forms g'
  (reading the filter state, not advancing it) and writes its float64 partials (w.g', w.w, g'.g') to
  part[m, b]; then the element pass (ORTHO, grid (M, NB)) forms g' again (advancing the filter exactly
  once), adds its tensor's partials in a fixed order (the same in every block of the tensor, whatever
  the program order) and applies the formula in float64 before AdamW. Blocks are tensor blocks: each
  tensor (ParamLayout order) is cut into blocks of at most BLOCK elements, so no block straddles two
  tensors and a tensor of any size (1 element or millions) has cdiv(size, BLOCK) blocks.
Accuracy. The products of float32 values are exact in float64, so the partials and their sums carry only
float64 rounding (~k 2^-53 relative to the sum of |terms|, k the tree depth plus the partials' chunks);
a float32 accumulation would lose ~1e-5 over a 65k-element tensor and could not form the perpendicular
norm below. |g' - c w|^2 is formed from the three sums, gg - 2 c wg + c^2 ww, rather than reduced
directly: a direct reduction needs c first, a second pass over the tensor (one more launch and one more
read of w, g and the filter state). The price is cancellation when g' is nearly parallel to w: the
absolute error of the difference is ~k 2^-53 gg, so |g' - c w| is float32-accurate (2^-24) while
sin(w, g') >~ 2^-15 sqrt(k) (a worst-case bound: 2.4e-4 at k = 64), and then g'' = (g' - c w) r itself
is formed in float64 from float32 inputs like the reference's. tests/test_kernels_orthograd.py measures a tensor
at sin = 2e-3 against the float64 reference. A one-element tensor (g' always parallel to w) has
g' - c w = 0 in exact arithmetic: both sides return rounding noise scaled to |g'|; the models here
have none.

Everything the step depends on lives on the device: the per-model hyperparameters lr, wd, alpha,
lamb are [M] float32 tensors (a sweep trains M models with different settings in one launch), the
betas a float64 tensor [2], and the counters (t, c) an int64 tensor [2], so a whole training step
can be captured in a CUDA graph and replayed with no host sync. A step is two launches:
  1. adamw_scalars_kernel, one program: reads the counters, writes this step's (t, c) and its
     float32 scalars to a small workspace, then advances the counters (a barrier between the read
     and the write; the element kernel cannot advance them: its programs run in any order).
  2. grokfast_adamw_kernel, grid (M, cdiv(N, BLOCK)): the per-element formulas above
     (with orthograd: its sums pass, then the element pass, both over tensor blocks: three launches).

Bias corrections. 1 - beta^t cancels in float32 for small t (1 - 0.98 loses 6 of 24 bits: the old
float32 1 - exp2(t log2 beta) was off by 1e-6 at beta = 0.98 and 1e-5 at 0.999), so the scalar
kernel forms beta1^t and beta2^t in float64 by exponentiation by squaring over the bits of t (a fixed
48 iterations with tl.where, branch-free: assumes t < 2^48; beta = 0 gives 0^t = 0, so
1 - beta^t = 1), then lr_t / (1 - beta1^t), 1 - beta2^t, 1 - lr_t * wd_m, beta and 1 - beta in
float64 (lr_m, wd_m: the stored float32 values), each rounded once to float32: the step size is
within 2^-24 relative of the exact one.

Grokfast MA without reading the window. The kernel keeps S in ``ma_sum`` [M, N] float64 (derived
state: rebuilt from the ring by ``rebuild_ma_sum``, never checkpointed). With slot = c mod W:
  - c + 1 < W (window not full):  ring[slot] <- g only; S is neither read nor written.
  - slot == W - 1 (once per cycle, including the first full step c = W - 1): S is recomputed
    exactly as the fixed-order sum over w = 0..W-1 (ring[slot] replaced by g), like the reference.
  - otherwise (c >= W):  S <- (S - ring[slot]) + g, ring[slot] the raw gradient leaving the window.
The branch depends only on the device counter c, so every program takes the same path and the step
stays capturable in a CUDA graph. S is float64, and the float32 mean S / W is rounded once from it.
Float64 has 29 more mantissa bits than float32, so the running update is exact whenever one
element's gradients in the window span less than 2^(28 - log2 W) in magnitude (~2^21 at W = 100);
then the running S equals the fixed-order sum bit for bit and a run resumed from a checkpoint (S
rebuilt from the ring) continues bit-identically, even mid-cycle. When it is not exact the two differ
by ~2^-53 relative, which changes the float32 mean only if it falls that close to a float32 rounding
boundary (~2^-29 odds per such element and step). (With a float32 S the running and rebuilt sums
differ in most elements -- measured 2/3 after 11 steps at W = 7 -- and a resume is not bit-identical.)

Memory traffic per element per step (bytes): AdamW reads g, theta, mom, vel and writes theta, mom,
vel (7 float32: 28); EMA adds ema read + write (8). MA adds, on W - 1 of every W steps, ring[slot]
read + write and S read + write (4 + 4 + 8 + 8 = 24), and on the recompute step the W ring slots read,
ring[slot] and S written (4 W + 4 + 8): amortised 28 - 12 / W bytes per step (27.9 at W = 100)
instead of the 4 (W + 1) of reading the whole window every step (404). Orthograd reads g, w and the
filter's state once more in its sums pass (12 bytes with EMA; the MA ring slot too) and writes 24 bytes
per block, which each of the tensor's blocks reads back (24 bytes x its tensor's blocks, per BLOCK elements).
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import launch
from .errors import KernelConfigError

FILTERS = {"none": 0, "ema": 1, "ma": 2}
BLOCK = 1024       # elements per program; N need not be a multiple (masked)
NUM_WARPS = 4
SCALARS = 5        # shared float32 scalars at the head of the scalar workspace (see adamw_scalars_kernel)
BLOCK_M = 128      # models per iteration of the scalar kernel
SCALAR_WARPS = 1   # the scalar kernel: one program, a few values per model
LAUNCHES = 2       # kernel launches per FusedOptimizer.step: adamw_scalars_kernel, grokfast_adamw_kernel
STEP_LAUNCHES = 1  # in a fused training step: the scalars ride in the forward/backward's last launch
                   # (scalars_task), the element kernel is the optimizer's only launch
ORTHO_LAUNCHES = 1 # orthograd adds one launch before the element pass: its sums pass (SUMS)
PBLOCK = 64        # orthograd partial sums read per iteration by the element kernel


def step_launches(orthograd: bool = False) -> int:
    """The optimizer's launches in a fused training step: STEP_LAUNCHES, plus ORTHO_LAUNCHES with orthograd."""
    return STEP_LAUNCHES + (ORTHO_LAUNCHES if orthograd else 0)


@triton.jit
def adamw_scalars_kernel(
    counter_ptr,    # [2] int64 (t - 1, c), advanced in place to (t, c + ADVANCE_C)
    betas_ptr,      # [2] float64 (beta1, beta2)
    lr_ptr,         # [M] float32 peak learning rate per model
    wd_ptr,         # [M] float32 decoupled weight decay per model
    scal_ptr,       # [SCALARS + 2 M] float32 out: beta1, 1 - beta1, beta2, 1 - beta2, 1 - beta2^t, then
                    #   per model m at SCALARS + 2 m: lr_t / (1 - beta1^t), 1 - lr_t * wd_m
    snap_ptr,       # [2] int64 out: (t, c) of this step
    M,
    warmup_steps,   # linear warm-up steps (0: none); not "warmup", a keyword of Triton's launcher
    ADVANCE_C: tl.constexpr,   # 1 when a filter counts raw gradients, else 0
    SCALARS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """The step's scalars in float64, each rounded once to float32, and the counters advanced; grid (1,).

    beta1^t and beta2^t by exponentiation by squaring over the bits of t: a fixed 48 iterations
    (assumes t < 2^48), tl.where instead of branches. beta = 0 gives 0^t = 0 (t >= 1), so 1 - beta^t = 1."""
    _adamw_scalars(counter_ptr, betas_ptr, lr_ptr, wd_ptr, scal_ptr, snap_ptr, M, warmup_steps, ADVANCE_C,
                   SCALARS, BLOCK_M)


@triton.jit
def _adamw_scalars(counter_ptr, betas_ptr, lr_ptr, wd_ptr, scal_ptr, snap_ptr, M, warmup_steps, ADVANCE_C,
                   SCALARS: tl.constexpr, BLOCK_M: tl.constexpr):
    """adamw_scalars_kernel's work (also a task of flush.flush_kernel, with ADVANCE_C a runtime value)."""
    two = tl.arange(0, 2)
    ctr = tl.load(counter_ptr + two)
    tl.store(snap_ptr + two, ctr + tl.where(two == 0, 1, 0))
    tl.debug_barrier()                                      # every thread has read the counters ...
    tl.store(counter_ptr + two, ctr + tl.where(two == 0, 1, ADVANCE_C))   # ... before they advance
    t = tl.sum(tl.where(two == 0, ctr, 0)) + 1               # this step, 1-based

    betas = tl.load(betas_ptr + two)                         # (beta1, beta2), both at once
    pows = tl.full([2], 1.0, tl.float64)                     # -> (beta1^t, beta2^t)
    sq = betas                                               # beta^(2^i)
    bits = t
    for _ in range(0, 48):
        pows = tl.where((bits & 1) != 0, pows * sq, pows)
        sq = sq * sq
        bits = bits >> 1
    bc = 1.0 - pows                                          # (1 - beta1^t, 1 - beta2^t)
    tl.store(scal_ptr + two * 2, betas.to(tl.float32))
    tl.store(scal_ptr + two * 2 + 1, (1.0 - betas).to(tl.float32))
    bc2 = tl.sum(tl.where(two == 1, bc, 0.0))                # exact: the other term is 0
    bc1 = tl.sum(tl.where(two == 0, bc, 0.0))
    tl.store(scal_ptr + 4, bc2.to(tl.float32))

    t64 = t.to(tl.float64)
    sched = tl.where(warmup_steps > 0, tl.minimum(t64 / tl.maximum(warmup_steps, 1).to(tl.float64), 1.0), 1.0)
    for m0 in range(0, M, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        ok = m < M
        lr_t = tl.load(lr_ptr + m, mask=ok, other=0.0).to(tl.float64) * sched
        wd = tl.load(wd_ptr + m, mask=ok, other=0.0).to(tl.float64)
        tl.store(scal_ptr + SCALARS + 2 * m, (lr_t / bc1).to(tl.float32), mask=ok)
        tl.store(scal_ptr + SCALARS + 2 * m + 1, (1.0 - lr_t * wd).to(tl.float32), mask=ok)


@triton.jit
def grokfast_adamw_kernel(
    param_ptr,      # [M, N] float32, updated in place (read only when SUMS)
    grad_ptr,       # [M, N] float32 raw gradients (read only)
    mom_ptr,        # [M, N] float32 AdamW first moment m, updated in place
    vel_ptr,        # [M, N] float32 AdamW second moment v, updated in place
    ema_ptr,        # [M, N] float32 Grokfast-EMA state (used only when FILTER == 1)
    ring_ptr,       # [M, W, N] float32 raw-gradient ring (used only when FILTER == 2)
    sum_ptr,        # [M, N] float64 MA window sum S (used only when FILTER == 2)
    alpha_ptr,      # [M] float32 EMA momentum per model
    lamb_ptr,       # [M] float32 Grokfast amplification per model
    scal_ptr,       # [SCALARS + 2 M] float32 from adamw_scalars_kernel
    snap_ptr,       # [2] int64 (t, c) of this step, from adamw_scalars_kernel
    loss_ptr,       # [M] float32 this step's loss per model (read only when TRACK)
    bad_ptr,        # [M] int64 first step whose loss was NaN or inf, -1 while none (updated when TRACK)
    tab_ptr,        # [NB, 4] int32 tensor blocks: start, end, first block of its tensor, its tensor's blocks (ORTHO)
    part_ptr,       # [M, NB, 3] float64 orthograd partial sums w.g', w.w, g'.g' per tensor block (ORTHO):
                    #   written when SUMS, read by the element pass
    N,              # parameters per model
    NB,             # tensor blocks per model (used only when ORTHO)
    window,         # W, the MA window (>= 1)
    eps,
    FILTER: tl.constexpr,   # 0 none, 1 EMA, 2 MA
    SCALARS: tl.constexpr,
    BLOCK: tl.constexpr,
    TRACK: tl.constexpr,    # 1: block 0 of model m also sets bad[m] = t if loss[m] is not finite and bad[m] < 0
    ORTHO: tl.constexpr,    # 1: orthograd between the filter and AdamW; blocks are tensor blocks (tab_ptr)
    SUMS: tl.constexpr,     # 1 (with ORTHO): orthograd's sums pass: form g' (the filter state read, not
                            #   written) and write this block's partial sums; nothing else
    PBLOCK: tl.constexpr,   # partial sums read per iteration of the element pass when ORTHO
):
    """One Grokfast (+ orthograd) + AdamW step for block ``pid(1)`` of model ``pid(0)``; grid (M, cdiv(N, BLOCK)),
    or (M, NB) with ORTHO: block b covers one tensor's elements tab[b, 0] <= i < tab[b, 1] (module docstring).
    The sums pass and the element pass are one kernel so that the filter is written once (and no
    @triton.jit helper call slows the interpreter, which re-patches the language at every call)."""
    model = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    if ORTHO:
        start = tl.load(tab_ptr + blk * 4).to(tl.int64)
        offs = start + tl.arange(0, BLOCK)
        mask = offs < tl.load(tab_ptr + blk * 4 + 1).to(tl.int64)
    else:
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
    row = model * N + offs
    count = tl.load(snap_ptr + 1)
    if TRACK:
        if tl.program_id(1) == 0:
            # the trainer's divergence check, on the device: no host work per step
            loss = tl.load(loss_ptr + model)
            bad = tl.load(bad_ptr + model)
            nonfinite = (loss != loss) | (tl.abs(loss) == float("inf"))
            tl.store(bad_ptr + model, tl.where(nonfinite & (bad < 0), tl.load(snap_ptr), bad))

    g = tl.load(grad_ptr + row, mask=mask, other=0.0)
    if FILTER == 1:
        alpha = tl.load(alpha_ptr + model)
        lamb = tl.load(lamb_ptr + model)
        ema = tl.load(ema_ptr + row, mask=mask, other=0.0)
        # where(), not arithmetic: the state before the first step may hold anything (even NaN).
        ema = tl.where(count == 0, g, alpha * ema + (1.0 - alpha) * g)
        if SUMS == 0:
            tl.store(ema_ptr + row, ema, mask=mask)
        g = g + lamb * ema
    elif FILTER == 2:
        lamb = tl.load(lamb_ptr + model)
        slot = count % window
        ring_row = model * window * N + offs
        if count + 1 >= window:
            if slot == window - 1:
                # Once per cycle: S exactly, the fixed-order sum over the ring with slot replaced by g
                # (g itself, not a re-read: no read-after-write of global memory).
                # (a pointer stepped by N, not ring_row + w * N: w * N is 32-bit and wraps once W N >= 2^31)
                s = tl.zeros([BLOCK], dtype=tl.float64)
                slot_ptr = ring_ptr + ring_row
                for w in range(0, window):
                    old = tl.load(slot_ptr, mask=mask, other=0.0)
                    s += tl.where(w == slot, g, old).to(tl.float64)
                    slot_ptr += N
            else:
                # The window moves by one: the raw gradient of c - W leaves, g enters.
                old = tl.load(ring_ptr + ring_row + slot * N, mask=mask, other=0.0)
                s = tl.load(sum_ptr + row, mask=mask, other=0.0)
                s = (s - old.to(tl.float64)) + g.to(tl.float64)
            if SUMS == 0:
                tl.store(sum_ptr + row, s, mask=mask)
                tl.store(ring_ptr + ring_row + slot * N, g, mask=mask)
            g = g + lamb * (s / window).to(tl.float32)
        else:
            if SUMS == 0:
                tl.store(ring_ptr + ring_row + slot * N, g, mask=mask)

    if SUMS:
        # Products of float32 values are exact in float64 and each block's sum is a fixed tree (tl.sum):
        # the partials do not depend on program order.
        g64 = g.to(tl.float64)[None, :]
        w64 = tl.load(param_ptr + row, mask=mask, other=0.0).to(tl.float64)[None, :]
        j = tl.arange(0, 4)[:, None]                        # rows w.g', w.w, g'.g' (and a zero row): one tl.sum
        terms = tl.where(j == 0, w64 * g64, tl.where(j == 1, w64 * w64, tl.where(j == 2, g64 * g64, 0.0)))
        tl.store(part_ptr + (model * NB + blk) * 3 + tl.arange(0, 4), tl.sum(terms, axis=1), mask=tl.arange(0, 4) < 3)
    else:
        p = tl.load(param_ptr + row, mask=mask, other=0.0)
        if ORTHO:
            # This tensor's sums from its blocks' partials in a fixed order (chunks of PBLOCK in turn, a tree
            # within each): every block of the tensor forms the same c and r whatever the program order.
            first = tl.load(tab_ptr + blk * 4 + 2).to(tl.int64)
            nblk = tl.load(tab_ptr + blk * 4 + 3)
            j = tl.arange(0, 4)
            acc = tl.zeros([PBLOCK, 4], dtype=tl.float64)
            for k0 in range(0, nblk, PBLOCK):
                k = k0 + tl.arange(0, PBLOCK)
                src = part_ptr + (model * NB + first + k)[:, None] * 3 + j[None, :]
                acc += tl.load(src, mask=(k < nblk)[:, None] & (j < 3)[None, :], other=0.0)
            # [w.g', w.w, g'.g', 0] as scalars without more reductions: [[wg, ww], [gg, 0]] split twice
            wg_gg, ww_0 = tl.split(tl.reshape(tl.sum(acc, axis=0), [2, 2]))
            wg_t, gg_t = tl.split(wg_gg)
            ww_t, _ = tl.split(ww_0)
            # float64 '/' and sqrt compile to the IEEE-rounded div.rn.f64 and sqrt.rn.f64 (no approximate forms)
            c = wg_t / (ww_t + 1e-30)
            perp2 = tl.maximum(gg_t - 2.0 * c * wg_t + c * c * ww_t, 0.0)     # |g' - c w|^2 from the three sums
            r = tl.sqrt(gg_t) / (tl.sqrt(perp2) + 1e-30)
            g = ((g.to(tl.float64) - c * p.to(tl.float64)) * r).to(tl.float32)

        b1 = tl.load(scal_ptr)
        one_b1 = tl.load(scal_ptr + 1)
        b2 = tl.load(scal_ptr + 2)
        one_b2 = tl.load(scal_ptr + 3)
        bc2 = tl.load(scal_ptr + 4)
        step = tl.load(scal_ptr + SCALARS + 2 * model)          # lr_t / (1 - beta1^t)
        decay = tl.load(scal_ptr + SCALARS + 2 * model + 1)     # 1 - lr_t * wd

        mom = tl.load(mom_ptr + row, mask=mask, other=0.0)
        vel = tl.load(vel_ptr + row, mask=mask, other=0.0)
        p = p * decay
        mom = b1 * mom + one_b1 * g
        vel = b2 * vel + one_b2 * (g * g)
        # IEEE-rounded sqrt and division (tl.sqrt and / compile to approximate ones on a GPU, which flush
        # subnormal moments to zero): the same bits on a GPU as under the interpreter, where parity matters
        denom = tl.sqrt_rn(tl.div_rn(vel, bc2)) + eps
        p = p - step * tl.div_rn(mom, denom)
        tl.store(param_ptr + row, p, mask=mask)
        tl.store(mom_ptr + row, mom, mask=mask)
        tl.store(vel_ptr + row, vel, mask=mask)


def aot_specs() -> list[dict]:
    """The optimizer's compile specs for grokfast.kernels.aot: the element kernel (one per filter, then each
    with the divergence check TRACK), the scalar kernel (with and without a filter), then the orthograd
    variants (ORTHO per filter with TRACK, as the steppers run it; its sums pass ORTHO + SUMS per filter; the
    ORTHO variant without TRACK is the same code less the divergence check); their code does not depend on
    M or N (runtime arguments)."""
    sig = {"param_ptr": "*fp32", "grad_ptr": "*fp32", "mom_ptr": "*fp32", "vel_ptr": "*fp32",
           "ema_ptr": "*fp32", "ring_ptr": "*fp32", "sum_ptr": "*fp64", "alpha_ptr": "*fp32",
           "lamb_ptr": "*fp32", "scal_ptr": "*fp32", "snap_ptr": "*i64", "loss_ptr": "*fp32", "bad_ptr": "*i64",
           "tab_ptr": "*i32", "part_ptr": "*fp64", "N": "i32", "NB": "i32", "window": "i32", "eps": "fp32",
           "FILTER": "constexpr", "SCALARS": "constexpr", "BLOCK": "constexpr", "TRACK": "constexpr",
           "ORTHO": "constexpr", "SUMS": "constexpr", "PBLOCK": "constexpr"}

    scal_sig = {"counter_ptr": "*i64", "betas_ptr": "*fp64", "lr_ptr": "*fp32", "wd_ptr": "*fp32",
                "scal_ptr": "*fp32", "snap_ptr": "*i64", "M": "i32", "warmup_steps": "i32",
                "ADVANCE_C": "constexpr", "SCALARS": "constexpr", "BLOCK_M": "constexpr"}

    def aligned(signature):
        # Torch allocations are 16-byte aligned; triton's launcher specialises on it, so compile it in too.
        return {(i,): [["tt.divisibility", 16]] for i, k in enumerate(signature) if k.endswith("_ptr")}
    def element(kind, code, track, ortho, sums=0):
        tag = f"{',track' if track else ''}{',orthograd' if ortho else ''}{'-sums' if sums else ''}"
        return dict(name=f"grokfast_adamw[{kind}{tag}]", fn=grokfast_adamw_kernel, signature=sig,
                    constexprs={"FILTER": code, "SCALARS": SCALARS, "BLOCK": BLOCK, "TRACK": track, "ORTHO": ortho,
                                "SUMS": sums, "PBLOCK": PBLOCK}, attrs=aligned(sig), num_warps=NUM_WARPS)
    return [element(kind, code, track, 0) for track in (0, 1) for kind, code in FILTERS.items()] + [
            dict(name=f"adamw_scalars[advance_c={a}]", fn=adamw_scalars_kernel, signature=scal_sig,
                 constexprs={"ADVANCE_C": a, "SCALARS": SCALARS, "BLOCK_M": BLOCK_M}, attrs=aligned(scal_sig),
                 num_warps=SCALAR_WARPS)
            for a in (0, 1)] + [
            element(kind, code, 1, 1) for kind, code in FILTERS.items()] + [
            element(kind, code, 0, 1, 1) for kind, code in FILTERS.items()]


def unsupported_training(tcfg) -> str | None:
    """None when this kernel computes the update a training config asks for, else one line saying why not:
    it implements AdamW (decoupled weight decay) with the linear warm-up lr * min(1, t / warmup), not Adam
    with L2 weight decay (optimizer "adam") nor Muon, nor a warm-up whose first step has lr 0 ("lambdalr");
    the loss kernel computes cross-entropy and StableMax (loss "ce", "stablemax"). lr_matched is plain AdamW at
    lr * (1 + lamb), and orthograd (FusedOptimizer(orthograd=True)) is computed: all supported."""
    optimizer = getattr(tcfg, "optimizer", "adamw")
    if optimizer != "adamw":
        return f"optimizer={optimizer!r}: the fused optimizer implements AdamW (decoupled weight decay) only"
    schedule = getattr(tcfg, "warmup_schedule", "linear")
    if schedule != "linear" and getattr(tcfg, "warmup", 0) > 0:
        return f"warmup_schedule={schedule!r}: the fused optimizer implements the linear warm-up lr * min(1, t / warmup) only"
    return None


def _per_model(name: str, value, M: int, device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(M)
    if t.numel() != M:
        raise KernelConfigError(f"{name} needs one value or one per model ({M}), got {t.numel()}")
    return t.to(device).contiguous().clone()


class FusedOptimizer:
    """Grokfast filter + AdamW state for M models of N parameters each, stepped by two kernel launches
    (three with orthograd).

    State (all on ``device``): ``mom``, ``vel`` [M, N] (AdamW m, v), ``ema`` [M, N] (EMA only),
    ``ring`` [M, W, N] (MA only, slot c mod W holds the c-th raw gradient), ``ma_sum`` [M, N] float64
    (MA only: the window sum S, derived from the ring; call ``rebuild_ma_sum`` after writing the ring),
    ``counters`` [2] int64 (t - 1 steps done, c raw gradients seen; c stays 0 without a filter, as in
    the reference). ``betas`` [2] float64 (beta1, beta2) on the device.
    lr, wd, alpha, lamb: a float or a sequence of M (one per model). Assumes float32 contiguous
    [M, N] params and grads on the same device.
    orthograd: the filtered gradient made orthogonal to the weights per parameter tensor before AdamW
    (module docstring); segments: the tensors' sizes in layout order (sum N; ParamLayout.sizes()), each
    cut into blocks of at most BLOCK that never straddle two tensors. It adds no state: a workspace of
    [M, NB, 3] float64 partial sums and the [NB, 4] int32 block table, the same buffers every step.
    """

    def __init__(self, M: int, N: int, *, lr, wd, beta1: float = 0.9, beta2: float = 0.98, eps: float = 1e-8,
                 warmup: int = 0, grokfast: str = "none", alpha=0.98, lamb=2.0, window: int = 100,
                 orthograd: bool = False, segments: Sequence[int] | None = None, device="cpu"):
        if grokfast not in FILTERS:
            raise KernelConfigError(f"grokfast must be one of {', '.join(FILTERS)}, got {grokfast!r}")
        if window < 1 or warmup < 0:
            raise KernelConfigError(f"window must be >= 1 and warmup >= 0, got {window}, {warmup}")
        if M < 1 or N < 1:
            raise KernelConfigError(f"need at least one model and one parameter, got M={M}, N={N}")
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise KernelConfigError(f"betas must lie in [0, 1), got ({beta1}, {beta2})")
        if orthograd and (segments is None or any(int(k) < 1 for k in segments) or sum(map(int, segments)) != N):
            raise KernelConfigError(f"orthograd needs segments: the parameter tensors' sizes (each >= 1, summing to "
                                    f"N={N}), got {None if segments is None else list(segments)}")
        self.M, self.N, self.kind, self.orthograd = M, N, grokfast, bool(orthograd)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.warmup, self.window = int(warmup), int(window)
        self.betas = torch.tensor([self.beta1, self.beta2], dtype=torch.float64, device=device)
        self.lr = _per_model("lr", lr, M, device)
        self.wd = _per_model("wd", wd, M, device)
        self.alpha = _per_model("alpha", alpha, M, device)
        self.lamb = _per_model("lamb", lamb, M, device)
        self.mom = torch.zeros((M, N), dtype=torch.float32, device=device)
        self.vel = torch.zeros((M, N), dtype=torch.float32, device=device)
        self.ema = torch.zeros((M, N), dtype=torch.float32, device=device) if grokfast == "ema" else None
        self.ring = (torch.zeros((M, window, N), dtype=torch.float32, device=device)
                     if grokfast == "ma" else None)
        self.ma_sum = torch.zeros((M, N), dtype=torch.float64, device=device) if grokfast == "ma" else None
        self.counters = torch.zeros(2, dtype=torch.int64, device=device)
        # Written by the scalar kernel every step (workspace, not state): the step's float32 scalars
        # and its (t, c).
        self._scal = torch.zeros(SCALARS + 2 * M, dtype=torch.float32, device=device)
        self._snap = torch.zeros(2, dtype=torch.int64, device=device)
        # orthograd's block table and partial sums; without it an unread int32 stand-in for the table
        self._tab, self._part = torch.zeros((1, 4), dtype=torch.int32, device=device), None
        if self.orthograd:
            rows, start = [], 0
            for size in map(int, segments):
                first, nblk = len(rows), -(-size // BLOCK)
                rows += [[start + b * BLOCK, min(start + (b + 1) * BLOCK, start + size), first, nblk]
                         for b in range(nblk)]
                start += size
            if start >= 2 ** 31:
                raise KernelConfigError(f"orthograd's block table holds int32 offsets: N={N} must be < 2^31")
            self._tab = torch.tensor(rows, dtype=torch.int32, device=device)
            self._part = torch.zeros((M, len(rows), 3), dtype=torch.float64, device=device)

    @classmethod
    def from_configs(cls, tcfgs: Sequence, N: int, device="cpu", segments: Sequence[int] | None = None
                     ) -> "FusedOptimizer":
        """One model per TrainConfig; they may differ in lr, wd, alpha, lamb only. segments: the parameter
        tensors' sizes (ParamLayout.sizes()), needed with orthograd."""
        first = tcfgs[0]
        for c in tcfgs:
            why = unsupported_training(c)
            if why:
                raise KernelConfigError(f"the fused optimizer cannot run this: {why}; use --backend reference")
        for c in tcfgs[1:]:
            for k in ("beta1", "beta2", "eps", "warmup", "grokfast", "window", "orthograd"):
                if getattr(c, k) != getattr(first, k):
                    raise KernelConfigError(f"models trained in one launch must share {k}: got "
                                      f"{getattr(first, k)!r} and {getattr(c, k)!r}")
        # lr_matched: the Grokfast filters' steady-state gain 1 + lamb as a learning rate, no filter
        return cls(len(tcfgs), N, lr=[c.lr * (1 + c.lamb if getattr(c, "lr_matched", False) else 1) for c in tcfgs], wd=[c.wd for c in tcfgs],
                   alpha=[c.alpha for c in tcfgs], lamb=[c.lamb for c in tcfgs], beta1=first.beta1,
                   beta2=first.beta2, eps=first.eps, warmup=first.warmup, grokfast=first.grokfast,
                   window=first.window, orthograd=bool(getattr(first, "orthograd", False)), segments=segments,
                   device=device)

    @torch.no_grad()
    def rebuild_ma_sum(self, rows=None) -> None:
        """ma_sum[rows] <- sum_{w=0}^{W-1} ring[rows, w] in float64, added in the order w = 0..W-1 as the
        kernel's once-per-cycle recomputation does (rows: an int, a sequence of ints, or None for all).
        Call it after loading the ring (a checkpoint holds the ring, not the sum); a no-op without MA.
        Before the window is full the kernel does not read the sum (it recomputes it at c = W - 1)."""
        if self.ring is None:
            return
        if rows is None:
            rows = slice(None)
        elif isinstance(rows, int):
            rows = slice(rows, rows + 1)
        else:
            rows = torch.as_tensor(list(rows), dtype=torch.int64, device=self.ring.device)
        ring = self.ring[rows]
        acc = torch.zeros(ring.shape[0], self.N, dtype=torch.float64, device=self.ring.device)
        for w in range(self.window):
            acc += ring[:, w]
        self.ma_sum[rows] = acc

    def scalars_task(self) -> tuple:
        """(kind, fields, programs) of this step's scalar work as a task of flush.flush_kernel, for a caller
        that carries it in a launch of its own (mlp.Deferred.add_task) before ``step(..., scalars=False)``."""
        from .flush import ADAMW_SCALARS
        return (ADAMW_SCALARS, [self.counters, self.betas, self.lr, self.wd, self._scal, self._snap, self.M,
                                self.warmup, 0 if self.kind == "none" else 1], 1)

    def step(self, params: torch.Tensor, grads: torch.Tensor, scalars: bool = True, track=None) -> None:
        """params [M, N] <- one filtered AdamW step with raw gradients grads [M, N]. Two launches (the
        scalar kernel, which also advances the counters, then the element kernel), no sync; one (the
        element kernel) with scalars=False, when the caller ran scalars_task() since the last step;
        orthograd adds the element kernel's sums pass (SUMS) before it (ORTHO_LAUNCHES).
        track: None, or (loss [M] float32, first_bad [M] int64): the element kernel also sets
        first_bad[m] = t (this step, 1-based) where loss[m] is NaN or inf and first_bad[m] < 0."""
        if params.shape != (self.M, self.N) or grads.shape != (self.M, self.N):
            raise ValueError(f"expected params and grads [{self.M}, {self.N}], got {tuple(params.shape)}, "
                             f"{tuple(grads.shape)}")
        if track is not None and (track[0].shape != (self.M,) or track[0].dtype != torch.float32
                                  or track[1].shape != (self.M,) or track[1].dtype != torch.int64):
            raise ValueError(f"track must be (loss [{self.M}] float32, first_bad [{self.M}] int64)")
        if not (params.is_contiguous() and grads.is_contiguous()):
            raise ValueError("params and grads must be contiguous")
        dummy = self.mom  # never read when the filter does not use it
        if scalars:
            launch(adamw_scalars_kernel, (1,),
                   dict(counter_ptr=self.counters, betas_ptr=self.betas, lr_ptr=self.lr, wd_ptr=self.wd,
                        scal_ptr=self._scal, snap_ptr=self._snap, M=self.M, warmup_steps=self.warmup),
                   dict(ADVANCE_C=0 if self.kind == "none" else 1, SCALARS=SCALARS, BLOCK_M=BLOCK_M),
                   num_warps=SCALAR_WARPS)
        filt = dict(ema_ptr=self.ema if self.ema is not None else dummy,
                    ring_ptr=self.ring if self.ring is not None else dummy,
                    sum_ptr=self.ma_sum if self.ma_sum is not None else self.betas, alpha_ptr=self.alpha,
                    lamb_ptr=self.lamb)
        args = dict(param_ptr=params, grad_ptr=grads, mom_ptr=self.mom, vel_ptr=self.vel, **filt,
                    scal_ptr=self._scal, snap_ptr=self._snap,
                    loss_ptr=track[0] if track is not None else self._scal,
                    bad_ptr=track[1] if track is not None else self._snap, tab_ptr=self._tab,
                    part_ptr=self._part if self.orthograd else self.betas, N=self.N,
                    NB=self._tab.shape[0], window=self.window, eps=self.eps)
        cx = dict(FILTER=FILTERS[self.kind], SCALARS=SCALARS, BLOCK=BLOCK, TRACK=int(track is not None),
                  ORTHO=int(self.orthograd), SUMS=0, PBLOCK=PBLOCK)
        if self.orthograd:
            grid = (self.M, self._tab.shape[0])
            launch(grokfast_adamw_kernel, grid, args, dict(cx, TRACK=0, SUMS=1), num_warps=NUM_WARPS)
        else:   # the tensor-block table and partials are not read: the element pass of before orthograd existed
            grid = (self.M, triton.cdiv(self.N, BLOCK))
        launch(grokfast_adamw_kernel, grid, args, cx, num_warps=NUM_WARPS)
