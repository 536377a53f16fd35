"""Unembedding, cross-entropy that stays accurate on confident data, its gradient, and evaluation.

In the training step and evaluation, ``unembed_cross_entropy`` forms logits = x W_U (+ b_U) for a block
of examples and every class on chip and goes straight on to the loss (one launch; the logits never
reach memory); ``cross_entropy`` does the same from logits in memory. Per example, with l the logits row (P =
d_vocab_out classes), y the label, m = max_j l_j, j* = argmax_j l_j (first on ties),
e_j = exp(l_j - m) (so e_{j*} = 1) and r = sum_{j != j*} e_j:

    loss = log1p(r) + (m - l_y)

with log1p(r) from the series 2 atanh(r / (2 + r)) for r < 1/16 (so a confident example's loss,
~r, keeps its relative accuracy; log(1 + r) would round it to 0 once r < 6e-8). The gradient of
the mean loss over B examples is

    dl_j = e_j / (1 + r) / B                     (j != y)
    dl_y = -(sum_{j != y} e_j) / (1 + r) / B     (= (p_y - 1) / B without the cancellation)

and the example is correct when j* == y. The per-example losses (and correct flags) are reduced to
one value per model by ``mean_reduce`` in a fixed order (deterministic).

StableMax cross-entropy (Prieto et al. 2025; loss "stablemax", constexpr LOSS_MODE 1; "ce" is 0) replaces
exp by s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0): with s_j = s(l_j), R = sum_{j != y} s_j and S = s_y + R,

    loss = log(S / s_y) = log1p(R / s_y)
    dl_j = s_j / (1 + |l_j|) / S / B             (j != y; s'(x) = s(x) / (1 + |x|): 1, or 1 / (1 - x)^2)
    dl_y = -(R / S) / (1 + |l_y|) / B            (= (s'_y / S - s'_y / s_y) / B without the cancellation)

No exp, no max to subtract (s grows linearly, so S stays finite while the logits do); every sum is of
positive terms, and R is summed apart from s_y, so neither the loss nor dl_y cancels when s_y dominates
(a confident example). Float32 error, logits taken as exact, u = 2^-24, counting a division as 2 roundings
(the GPU's div.full is within 2 ulp): s_j 3u (1 - x, the division); R (and S) log2(BLOCK_P) + 1 more (tree
sums of positive terms: no cancellation); q = R / s_y 2 more; log1p(q) adds at most 17u relative (below
1/16 the series; above, log(1 + q) rounds 1 + q, an absolute error u of a log >= 0.06) and the log's own
error (~4u on a GPU): per example |error| / loss <= (log2(BLOCK_P) + 30) u (2.2e-6 at BLOCK_P 512). dl_j
is a product and quotient of s_j, 1 / S (with inv_B) and 1 / (1 + |l_j|): <= (2 log2(BLOCK_P) + 16) u
relative per element (1.5e-6 at BLOCK_P 512). The logits' own float32 error adds the loss's condition
number, as for cross-entropy. The argmax (the correct flag) is taken on the logits: s is increasing, so
it is the argmax of s. Padded classes (the -inf logits beyond P) get s = 0, not s(0) = 1.

Limits: P <= 512 (BLOCK_P = next power of two >= P); labels int64 assumed in [0, P) (a label out of
range reads a zero logit: a wrong loss, never an out-of-bounds access).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import check, launch, pow2
from .errors import KernelConfigError
from .layernorm import _ln_bwd_coefs, _ln_row_stats, check_ln_params, deferred_partials

LOSS_MODES = {"ce": 0, "stablemax": 1}     # the kernels' LOSS_MODE constexpr


@triton.jit
def _ln_rows(X, bs, bmask, sx_r, D, eps, BLOCK_D: tl.constexpr):
    """mean and rstd of the rows bs of X (row stride sx_r, d_model contiguous) from one [BLOCK_B, BLOCK_D] load."""
    ds = tl.arange(0, BLOCK_D)
    mask = bmask[:, None] & (ds < D)[None, :]
    return _ln_row_stats(tl.load(X + bs[:, None] * sx_r + ds[None, :], mask=mask, other=0.0), mask, D, eps)


@triton.jit
def _ln_xhat(X, mu, rstd, bs, kk, bmask, kmask, sx_r):
    """(x - mean) * rstd of the columns kk of the rows bs, 0 outside the masks."""
    mask = bmask[:, None] & kmask[None, :]
    x = tl.load(X + bs[:, None] * sx_r + kk[None, :], mask=mask, other=0.0)
    return tl.where(mask, (x - mu[:, None]) * rstd[:, None], 0.0)


@triton.jit
def _ln_apply(a, mu, rstd, LNW, LNB, kk, bmask, kmask):
    """xf = (a - mean) * rstd * w + b for the columns kk (a: those columns of the rows), 0 outside the masks."""
    w = tl.load(LNW + kk, mask=kmask, other=0.0)
    b = tl.load(LNB + kk, mask=kmask, other=0.0)
    return tl.where(bmask[:, None] & kmask[None, :], (a - mu[:, None]) * rstd[:, None] * w[None, :] + b[None, :], 0.0)


@triton.jit
def _log1p(r):
    """log(1 + r) for r >= 0, relative accuracy near float32 epsilon for small r."""
    w = r / (2.0 + r)
    w2 = w * w
    series = 2.0 * w * (1.0 + w2 * (1.0 / 3.0 + w2 * (1.0 / 5.0 + w2 * (1.0 / 7.0 + w2 * (1.0 / 9.0)))))
    return tl.where(r < 0.0625, series, tl.log(1.0 + r))


@triton.jit
def _ce_rows(l, y, bs, js, bmask, jmask, m, LOSS, CORRECT, DLOG, P, inv_B, sloss_m, sd_m, GRAD: tl.constexpr):
    """Loss, correct flag and (GRAD) dlogits of a [BLOCK_B, BLOCK_P] tile of logits l (rows bs, classes js;
    entries outside jmask are -inf, rows outside bmask finite and ignored), labels y: the module docstring.
    Returns the dlogits tile (0 outside the masks) when GRAD, else the tile of exp(l - max)."""
    mask = bmask[:, None] & jmask[None, :]
    mx = tl.max(l, axis=1)
    jstar = tl.argmax(l, axis=1)
    e = tl.where(mask, tl.exp(l - mx[:, None]), 0.0)
    is_y = js[None, :] == y[:, None]
    r = tl.sum(tl.where(js[None, :] == jstar[:, None], 0.0, e), axis=1)
    l_y = tl.sum(tl.where(is_y & mask, l, 0.0), axis=1)
    loss = _log1p(r) + (mx - l_y)
    tl.store(LOSS + m * sloss_m + bs, loss, mask=bmask)
    tl.store(CORRECT + m * sloss_m + bs, (jstar == y).to(tl.int32), mask=bmask)
    if GRAD:
        s = 1.0 + r
        r_y = tl.sum(tl.where(is_y, 0.0, e), axis=1)
        g = tl.where(is_y, -r_y[:, None], e) * (inv_B / s)[:, None]
        g = tl.where(mask, g, 0.0)
        tl.store(DLOG + m * sd_m + bs[:, None] * P + js[None, :], g, mask=mask)
    else:
        g = e
    return g


@triton.jit
def _stablemax_rows(l, y, bs, js, bmask, jmask, m, LOSS, CORRECT, DLOG, P, inv_B, sloss_m, sd_m, GRAD: tl.constexpr):
    """StableMax loss, correct flag and (GRAD) dlogits of a tile, as _ce_rows (module docstring).
    Returns the dlogits tile when GRAD, else the tile of s(l) (0 outside the masks)."""
    mask = bmask[:, None] & jmask[None, :]
    jstar = tl.argmax(l, axis=1)
    a = tl.abs(l)
    s = tl.where(l >= 0.0, l + 1.0, 1.0 / (1.0 + a))       # 1 / (1 - l) for l < 0; padded classes: 1 / inf = 0
    s = tl.where(mask, s, 0.0)
    is_y = js[None, :] == y[:, None]
    s_y = tl.sum(tl.where(is_y, s, 0.0), axis=1)
    r = tl.sum(tl.where(is_y, 0.0, s), axis=1)
    s_y = tl.where(bmask, s_y, 1.0)                         # padded examples: finite, ignored
    loss = _log1p(r / s_y)
    tl.store(LOSS + m * sloss_m + bs, loss, mask=bmask)
    tl.store(CORRECT + m * sloss_m + bs, (jstar == y).to(tl.int32), mask=bmask)
    if GRAD:
        scale = inv_B / (s_y + r)
        g = tl.where(is_y, -r[:, None], s) * scale[:, None] / (1.0 + a)
        g = tl.where(mask, g, 0.0)
        tl.store(DLOG + m * sd_m + bs[:, None] * P + js[None, :], g, mask=mask)
    else:
        g = s
    return g


@triton.jit
def _loss_rows(l, y, bs, js, bmask, jmask, m, LOSS, CORRECT, DLOG, P, inv_B, sloss_m, sd_m, GRAD: tl.constexpr,
               LOSS_MODE: tl.constexpr):
    """_ce_rows (LOSS_MODE 0) or _stablemax_rows (LOSS_MODE 1)."""
    if LOSS_MODE == 1:
        g = _stablemax_rows(l, y, bs, js, bmask, jmask, m, LOSS, CORRECT, DLOG, P, inv_B, sloss_m, sd_m, GRAD)
    else:
        g = _ce_rows(l, y, bs, js, bmask, jmask, m, LOSS, CORRECT, DLOG, P, inv_B, sloss_m, sd_m, GRAD)
    return g


@triton.jit
def cross_entropy_kernel(LOGITS, LAB, LOSS, CORRECT, DLOG, B, P, inv_B,
                         sl_m, slab_m, sloss_m, sd_m,
                         GRAD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, LOSS_MODE: tl.constexpr):
    """Per-example loss (LOSS_MODE 0 cross-entropy, 1 StableMax), correct flag and (GRAD) dlogits for BLOCK_B
    rows; grid (cdiv(B, BLOCK_B), M).
    LOGITS, DLOG [M, B, P] contiguous rows; LAB [M or 1, B] int64; LOSS [M, B] f32; CORRECT [M, B] i32."""
    m = tl.program_id(1).to(tl.int64)
    bs = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    js = tl.arange(0, BLOCK_P)
    bmask = bs < B
    jmask = js < P
    mask = bmask[:, None] & jmask[None, :]
    l = tl.load(LOGITS + m * sl_m + bs[:, None] * P + js[None, :], mask=mask, other=float("-inf"))
    l = tl.where(bmask[:, None], l, 0.0)  # padded examples: finite, ignored
    y = tl.load(LAB + m * slab_m + bs, mask=bmask, other=0)
    _loss_rows(l, y, bs, js, bmask, jmask, m, LOSS, CORRECT, DLOG, P, inv_B, sloss_m, sd_m, GRAD, LOSS_MODE)


@triton.jit
def unembed_ce_kernel(X, WU, BU, LAB, LOSS, CORRECT, DLOG, DX, B, P, D, inv_B,
                      sx_m, sx_r, sw_m, sbu_m, slab_m, sloss_m, sd_m, sdx_m,
                      HAS_BIAS: tl.constexpr, GRAD: tl.constexpr, DX_OUT: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                      LNW, LNB, XF, PART, ln_eps, sln_m, sxf_m, spart_m, spart_s, spart_w,
                      LN: tl.constexpr, BLOCK_D: tl.constexpr, LOSS_MODE: tl.constexpr):
    """The unembedding and the loss in one pass: logits = x W_U (+ b_U) for BLOCK_B rows and every class,
    kept on chip, then the loss of LOSS_MODE (0 cross-entropy, 1 StableMax: _loss_rows); grid
    (cdiv(B, BLOCK_B), M). X [M, B, D] rows with unit stride along D;
    WU [M, D, P] contiguous per model; BU [M, P]; LAB, LOSS, CORRECT, DLOG as cross_entropy_kernel.
    DX_OUT (with GRAD): also DX[m, b] = dlogits[m, b] W_U^T ([M, B, D] contiguous), from the dlogits tile
    on chip, BLOCK_K columns at a time (one dot over every class each).
    LN: the final LayerNorm runs here too (its programs hold whole rows): X is its input, the unembedding
    reads xf = LayerNorm(X) LNW + LNB (LNW, LNB [M, D] row stride sln_m; mean and rstd from a [BLOCK_B, BLOCK_D]
    pass over the rows first) and writes xf to XF ([M, B, D] contiguous, model stride sxf_m: dW_U needs it);
    with DX_OUT, DX is the gradient of X: dxf = dlogits W_U^T, then the LayerNorm backward (a first pass over
    the columns for its row sums, then dxf again, the same dots, and dx), and this program's partial sums
    PART + m spart_m + pid spart_s (+ spart_w) [D] of dxf * xhat and dxf (the weight and bias gradients' split-K
    partials, summed by the flush)."""
    m = tl.program_id(1).to(tl.int64)
    bs = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    js = tl.arange(0, BLOCK_P)
    ks = tl.arange(0, BLOCK_K)
    bmask = bs < B
    jmask = js < P
    acc = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
    if LN:
        mu, rstd = _ln_rows(X + m * sx_m, bs, bmask, sx_r, D, ln_eps, BLOCK_D)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        kmask = kk < D
        a = tl.load(X + m * sx_m + bs[:, None] * sx_r + kk[None, :], mask=bmask[:, None] & kmask[None, :], other=0.0)
        if LN:
            a = _ln_apply(a, mu, rstd, LNW + m * sln_m, LNB + m * sln_m, kk, bmask, kmask)
            tl.store(XF + m * sxf_m + bs[:, None] * D + kk[None, :], a, mask=bmask[:, None] & kmask[None, :])
        w = tl.load(WU + m * sw_m + kk[:, None] * P + js[None, :], mask=kmask[:, None] & jmask[None, :], other=0.0)
        acc += tl.dot(a, w, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BU + m * sbu_m + js, mask=jmask, other=0.0)[None, :]
    l = tl.where(jmask[None, :], acc, float("-inf"))
    l = tl.where(bmask[:, None], l, 0.0)  # padded examples: finite, ignored
    y = tl.load(LAB + m * slab_m + bs, mask=bmask, other=0)
    g = _loss_rows(l, y, bs, js, bmask, jmask, m, LOSS, CORRECT, DLOG, P, inv_B, sloss_m, sd_m, GRAD, LOSS_MODE)
    if DX_OUT:
        if LN:      # the LayerNorm backward's row sums need every column of dxf first
            c1 = tl.zeros((BLOCK_B,), dtype=tl.float32)
            c2 = tl.zeros((BLOCK_B,), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                kk = k0 + ks
                kmask = kk < D
                wt = tl.load(WU + m * sw_m + kk[None, :] * P + js[:, None], mask=jmask[:, None] & kmask[None, :],
                             other=0.0)
                dxf = tl.dot(g, wt, input_precision=PRECISION)
                xhat = _ln_xhat(X + m * sx_m, mu, rstd, bs, kk, bmask, kmask, sx_r)
                k1, k2 = _ln_bwd_coefs(dxf, xhat, tl.load(LNW + m * sln_m + kk, mask=kmask, other=0.0), D)
                c1 += k1
                c2 += k2
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + ks
            kmask = kk < D
            wt = tl.load(WU + m * sw_m + kk[None, :] * P + js[:, None], mask=jmask[:, None] & kmask[None, :], other=0.0)
            dx = tl.dot(g, wt, input_precision=PRECISION)                            # [BLOCK_B, BLOCK_K]
            if LN:
                xhat = _ln_xhat(X + m * sx_m, mu, rstd, bs, kk, bmask, kmask, sx_r)
                part = PART + m * spart_m + tl.program_id(0).to(tl.int64) * spart_s + kk
                tl.store(part, tl.sum(dx * xhat, axis=0), mask=kmask)
                tl.store(part + spart_w, tl.sum(dx, axis=0), mask=kmask)
                lw = tl.load(LNW + m * sln_m + kk, mask=kmask, other=0.0)
                dx = rstd[:, None] * (dx * lw[None, :] - c2[:, None] - xhat * c1[:, None])
            tl.store(DX + m * sdx_m + bs[:, None] * D + kk[None, :], dx, mask=bmask[:, None] & kmask[None, :])


@triton.jit
def mean_reduce_kernel(LOSS, CORRECT, LOSS_OUT, CORRECT_OUT, B, sloss_m, BLOCK: tl.constexpr):
    """LOSS_OUT[m] = sum_b LOSS[m, b] / B, CORRECT_OUT[m] = sum_b CORRECT[m, b]; fixed order; grid (M,)."""
    _mean_rows(LOSS, CORRECT, LOSS_OUT, CORRECT_OUT, tl.program_id(0), B, sloss_m, BLOCK)


@triton.jit
def _mean_rows(LOSS, CORRECT, LOSS_OUT, CORRECT_OUT, m, B, sloss_m, BLOCK: tl.constexpr):
    """Model m's mean loss and correct count (mean_reduce_kernel; also a task of flush.flush_kernel)."""
    m = m.to(tl.int64)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK,), dtype=tl.int32)
    for b0 in range(0, B, BLOCK):
        bs = b0 + offs
        acc += tl.load(LOSS + m * sloss_m + bs, mask=bs < B, other=0.0)
        cnt += tl.load(CORRECT + m * sloss_m + bs, mask=bs < B, other=0)
    tl.store(LOSS_OUT + m, tl.sum(acc, axis=0) / B)
    tl.store(CORRECT_OUT + m, tl.sum(cnt, axis=0))


def loss_mode(loss: str) -> int:
    """The LOSS_MODE constexpr of a loss name ("ce" 0, "stablemax" 1); KernelConfigError (one line) otherwise."""
    if loss not in LOSS_MODES:
        raise KernelConfigError(f"loss must be one of {', '.join(LOSS_MODES)}, got {loss!r}")
    return LOSS_MODES[loss]


def _check_loss_args(who, M, B, P, labels, loss_ex, correct_ex, dlogits, device):
    """The checks cross_entropy and unembed_cross_entropy share: labels [1 or M, B] int64 contiguous on
    device; loss_ex [M, B] float32 and correct_ex [M, B] int32 in one layout with examples contiguous;
    dlogits [M, B, P] float32 when given; P <= 512 classes. One-line ValueError otherwise."""
    check("labels", labels, torch.int64, dims=2, device=device)
    if labels.shape[0] not in (1, M) or labels.shape[1] != B or not labels.is_contiguous():
        raise ValueError(f"labels must be a contiguous int64 [1 or {M}, {B}] tensor, got {list(labels.shape)}")
    check("loss_ex", loss_ex, torch.float32, shape=(M, B))
    check("correct_ex", correct_ex, torch.int32, shape=(M, B))
    if dlogits is not None:
        check("dlogits", dlogits, torch.float32, shape=(M, B, P))
    if P > 512:
        raise ValueError(f"{who} handles at most 512 classes, got {P}")
    if loss_ex.stride() != correct_ex.stride() or loss_ex.stride(1) != 1:
        raise ValueError(f"{who}: loss_ex and correct_ex must share a layout with examples contiguous")


def cross_entropy(logits, labels, loss_ex, correct_ex, dlogits=None, n_mean=None, loss="ce"):
    """Per-example loss [M, B] and correct flags [M, B] int32 from logits [M, B, P]; with dlogits
    [M, B, P], also the gradient of the mean loss over n_mean examples (default B). logits and dlogits
    contiguous; loss_ex and correct_ex may be column slices of wider [M, B_total] buffers. loss: "ce"
    (cross-entropy) or "stablemax" (StableMax cross-entropy; the module docstring)."""
    mode = loss_mode(loss)
    check("logits", logits, torch.float32, dims=3)
    M, B, P = logits.shape
    _check_loss_args("cross_entropy", M, B, P, labels, loss_ex, correct_ex, dlogits, logits.device)
    if not all(t.is_contiguous() for t in (logits,) + ((dlogits,) if dlogits is not None else ())):
        raise ValueError("cross_entropy: logits and dlogits must be contiguous")
    BP = pow2(P, 16)
    BB = max(1, min(32, 4096 // BP))
    launch(cross_entropy_kernel, (triton.cdiv(B, BB), M),
           dict(LOGITS=logits, LAB=labels, LOSS=loss_ex, CORRECT=correct_ex,
                DLOG=dlogits if dlogits is not None else logits, B=B, P=P, inv_B=1.0 / float(n_mean or B),
                sl_m=logits.stride(0), slab_m=labels.stride(0) if labels.shape[0] > 1 else 0,
                sloss_m=loss_ex.stride(0), sd_m=dlogits.stride(0) if dlogits is not None else 0),
           dict(GRAD=dlogits is not None, BLOCK_B=BB, BLOCK_P=BP, LOSS_MODE=mode), num_warps=8)   # 4 warps spill


def unembed_cross_entropy(x, W_U, b_U, labels, loss_ex, correct_ex, dlogits=None, n_mean=None, precision=None,
                          dx=None, ln=None, ln_grads=None, loss="ce"):
    """cross_entropy of logits = x W_U (+ b_U) without the logits ever reaching memory (one launch).
    With dlogits and dx [M, B, D] (contiguous), also dx = dlogits W_U^T, the gradient of x, in the same launch.

    x [M, B, D] float32 with unit stride along D; W_U [M, D, P] (each model's matrix contiguous); b_U [M, P]
    or None; labels [1 or M, B] int64; loss_ex, correct_ex, dlogits, n_mean as cross_entropy. precision:
    the dot mode (_common.PRECISIONS; None: the current default).
    ln: (w, b, eps, xf) to put a LayerNorm in front in the same launch: the logits are xf W_U (+ b_U) with
    xf = LayerNorm(x) * w + b written to xf [M, B, D] (contiguous; w, b [M, D]); dx is then the gradient of
    x through the LayerNorm, and ln_grads = (dw, db, defer) receives the LayerNorm's weight and bias gradients
    as split-K partials of ``defer`` (an mlp.Deferred: complete after its flush; needed with dx).
    loss: "ce" or "stablemax", as cross_entropy."""
    mode = loss_mode(loss)
    check("x", x, torch.float32, dims=3)
    M, B, D = x.shape
    check("W_U", W_U, torch.float32, dims=3, shape=(M, D, None), device=x.device)
    P = W_U.shape[2]
    if W_U.stride(1) != P or W_U.stride(2) != 1 or x.stride(2) != 1:
        raise ValueError("unembed_cross_entropy: W_U must be contiguous per model and x rows unit-stride along D")
    if b_U is not None:
        check("b_U", b_U, torch.float32, shape=(M, P), device=x.device)
        if b_U.stride(1) != 1:
            raise ValueError("unembed_cross_entropy: b_U must be contiguous along the classes")
    _check_loss_args("unembed_cross_entropy", M, B, P, labels, loss_ex, correct_ex, dlogits, x.device)
    if dlogits is not None and not dlogits.is_contiguous():
        raise ValueError("unembed_cross_entropy: dlogits must be contiguous")
    if dx is not None:
        check("dx", dx, torch.float32, shape=(M, B, D), device=x.device)
        if dlogits is None or not dx.is_contiguous():
            raise ValueError("unembed_cross_entropy: dx needs dlogits, and must be contiguous")
    BP = pow2(P, 16)
    BB = max(16, min(32, 4096 // BP))
    n_blocks = triton.cdiv(B, BB)
    lnargs = dict(LNW=x, LNB=x, XF=x, PART=x, ln_eps=0.0, sln_m=0, sxf_m=0, spart_m=0, spart_s=0, spart_w=0)
    if ln is not None:
        w, b, eps, xf = ln
        check_ln_params("unembed_cross_entropy", M, D, w=w, b=b)
        check("xf", xf, torch.float32, shape=(M, B, D), device=x.device)
        if not xf.is_contiguous() or w.stride(0) != b.stride(0):
            raise ValueError("unembed_cross_entropy: xf must be contiguous, and ln's w and b share a layout")
        if D > 256:
            raise ValueError(f"unembed_cross_entropy: the fused LayerNorm handles d_model <= 256, got {D}")
        lnargs.update(LNW=w, LNB=b, XF=xf, ln_eps=float(eps), sln_m=w.stride(0), sxf_m=xf.stride(0))
        if dx is not None:
            if ln_grads is None:
                raise ValueError("unembed_cross_entropy: dx through the LayerNorm needs ln_grads=(dw, db, defer)")
            dw, db, defer = ln_grads
            check_ln_params("unembed_cross_entropy", M, D, dw=dw, db=db)
            part, strides = deferred_partials(defer, n_blocks, M, D, dw, db, x.device)
            lnargs.update(PART=part, **strides)
    launch(unembed_ce_kernel, (n_blocks, M),
           dict(X=x, WU=W_U, BU=b_U if b_U is not None else W_U, LAB=labels, LOSS=loss_ex, CORRECT=correct_ex,
                DLOG=dlogits if dlogits is not None else x, DX=dx if dx is not None else x,
                B=B, P=P, D=D, inv_B=1.0 / float(n_mean or B),
                sx_m=x.stride(0), sx_r=x.stride(1), sw_m=W_U.stride(0), sbu_m=b_U.stride(0) if b_U is not None else 0,
                slab_m=labels.stride(0) if labels.shape[0] > 1 else 0, sloss_m=loss_ex.stride(0),
                sd_m=dlogits.stride(0) if dlogits is not None else 0, sdx_m=dx.stride(0) if dx is not None else 0,
                **lnargs),
           dict(HAS_BIAS=b_U is not None, GRAD=dlogits is not None, DX_OUT=dx is not None,
                PRECISION=precision or _common.DOT_PRECISION,
                BLOCK_B=BB, BLOCK_P=BP, BLOCK_K=16, LN=ln is not None, BLOCK_D=pow2(D, 16), LOSS_MODE=mode), num_warps=8)


def dot_flops(grid, args: dict, cx: dict) -> tuple[int, int]:
    """(executed, useful) tl.dot FLOPs of one recorded unembed_ce_kernel launch: every program's
    [BLOCK_B, BLOCK_K] x [BLOCK_K, BLOCK_P] products over cdiv(D, BLOCK_K) steps, twice with DX_OUT (the
    input gradient, [BLOCK_B, BLOCK_P] x [BLOCK_P, BLOCK_K] per step) and three times with DX_OUT and LN (dxf
    formed twice: once for the LayerNorm's row sums); useful 2 B D P per model and product (dxf counted once)."""
    BB, BP, BK = cx["BLOCK_B"], cx["BLOCK_P"], cx["BLOCK_K"]
    n_prog, times = grid[0] * grid[1], 2 if cx["DX_OUT"] else 1
    return ((times + (1 if cx["DX_OUT"] and cx["LN"] else 0)) * 2 * BB * BP * BK * triton.cdiv(args["D"], BK) * n_prog,
            times * 2 * args["B"] * args["D"] * args["P"] * grid[1])


def mean_reduce(loss_ex, correct_ex, loss_out, correct_out, defer=None):
    """loss_out [M] = mean over examples of loss_ex [M, B]; correct_out [M] int32 = count of correct_ex.
    With defer (an mlp.Deferred), done in its flush (the same bits) instead of a launch of its own."""
    M, B = loss_ex.shape
    check("loss_ex", loss_ex, torch.float32, shape=(M, B))
    check("correct_ex", correct_ex, torch.int32, shape=(M, B))
    check("loss_out", loss_out, torch.float32, shape=(M,))
    check("correct_out", correct_out, torch.int32, shape=(M,))
    if loss_ex.stride() != correct_ex.stride() or loss_ex.stride(1) != 1:
        raise ValueError("mean_reduce: loss_ex and correct_ex must be contiguous [M, B]")
    if not (loss_out.is_contiguous() and correct_out.is_contiguous()):
        raise ValueError("mean_reduce: loss_out and correct_out must be contiguous")
    if defer is not None:
        from .flush import MEAN
        defer.add_task(MEAN, [loss_ex, correct_ex, loss_out, correct_out, B, loss_ex.stride(0)], M)
        return
    launch(mean_reduce_kernel, (M,),
           dict(LOSS=loss_ex, CORRECT=correct_ex, LOSS_OUT=loss_out, CORRECT_OUT=correct_out, B=B,
                sloss_m=loss_ex.stride(0)),
           dict(BLOCK=1024))
