"""Unembedding, cross-entropy that stays accurate on confident data, its gradient, and evaluation.

logits = x W_U (+ b_U) is a GEMM (kernels.mlp.gemm). Per example, with l the logits row (P =
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

Limits: P <= 512 (BLOCK_P = next power of two >= P); labels int64 assumed in [0, P) (a label out of
range reads a zero logit: a wrong loss, never an out-of-bounds access).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check, launch, pow2


@triton.jit
def _log1p(r):
    """log(1 + r) for r >= 0, relative accuracy near float32 epsilon for small r."""
    w = r / (2.0 + r)
    w2 = w * w
    series = 2.0 * w * (1.0 + w2 * (1.0 / 3.0 + w2 * (1.0 / 5.0 + w2 * (1.0 / 7.0 + w2 * (1.0 / 9.0)))))
    return tl.where(r < 0.0625, series, tl.log(1.0 + r))


@triton.jit
def cross_entropy_kernel(LOGITS, LAB, LOSS, CORRECT, DLOG, B, P, inv_B,
                         sl_m, slab_m, sloss_m, sd_m,
                         GRAD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per-example loss, correct flag and (GRAD) dlogits for BLOCK_B rows; grid (cdiv(B, BLOCK_B), M).
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
        tl.store(DLOG + m * sd_m + bs[:, None] * P + js[None, :], g, mask=mask)


@triton.jit
def mean_reduce_kernel(LOSS, CORRECT, LOSS_OUT, CORRECT_OUT, B, sloss_m, BLOCK: tl.constexpr):
    """LOSS_OUT[m] = sum_b LOSS[m, b] / B, CORRECT_OUT[m] = sum_b CORRECT[m, b]; fixed order; grid (M,)."""
    m = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK,), dtype=tl.int32)
    for b0 in range(0, B, BLOCK):
        bs = b0 + offs
        acc += tl.load(LOSS + m * sloss_m + bs, mask=bs < B, other=0.0)
        cnt += tl.load(CORRECT + m * sloss_m + bs, mask=bs < B, other=0)
    tl.store(LOSS_OUT + m, tl.sum(acc, axis=0) / B)
    tl.store(CORRECT_OUT + m, tl.sum(cnt, axis=0))


def cross_entropy(logits, labels, loss_ex, correct_ex, dlogits=None, n_mean=None):
    """Per-example loss [M, B] and correct flags [M, B] int32 from logits [M, B, P]; with dlogits
    [M, B, P], also the gradient of the mean loss over n_mean examples (default B). logits and dlogits
    contiguous; loss_ex and correct_ex may be column slices of wider [M, B_total] buffers."""
    M, B, P = logits.shape
    check("logits", logits, torch.float32, dims=3)
    check("labels", labels, torch.int64, dims=2, device=logits.device)
    if labels.shape[0] not in (1, M) or labels.shape[1] != B or not labels.is_contiguous():
        raise ValueError(f"labels must be a contiguous int64 [1 or {M}, {B}] tensor, got {list(labels.shape)}")
    check("loss_ex", loss_ex, torch.float32, shape=(M, B))
    check("correct_ex", correct_ex, torch.int32, shape=(M, B))
    if dlogits is not None:
        check("dlogits", dlogits, torch.float32, shape=(M, B, P))
    if P > 512:
        raise ValueError(f"cross_entropy handles at most 512 classes, got {P}")
    if not all(t.is_contiguous() for t in (logits,) + ((dlogits,) if dlogits is not None else ())):
        raise ValueError("cross_entropy: logits and dlogits must be contiguous")
    if loss_ex.stride() != correct_ex.stride() or loss_ex.stride(1) != 1:
        raise ValueError("cross_entropy: loss_ex and correct_ex must share a layout with examples contiguous")
    BP = pow2(P, 16)
    BB = max(1, min(32, 4096 // BP))
    launch(cross_entropy_kernel, (triton.cdiv(B, BB), M),
           dict(LOGITS=logits, LAB=labels, LOSS=loss_ex, CORRECT=correct_ex,
                DLOG=dlogits if dlogits is not None else logits, B=B, P=P, inv_B=1.0 / float(n_mean or B),
                sl_m=logits.stride(0), slab_m=labels.stride(0) if labels.shape[0] > 1 else 0,
                sloss_m=loss_ex.stride(0), sd_m=dlogits.stride(0) if dlogits is not None else 0),
           dict(GRAD=dlogits is not None, BLOCK_B=BB, BLOCK_P=BP), num_warps=8)   # 4 warps spill


def mean_reduce(loss_ex, correct_ex, loss_out, correct_out):
    """loss_out [M] = mean over examples of loss_ex [M, B]; correct_out [M] int32 = count of correct_ex."""
    M, B = loss_ex.shape
    check("loss_ex", loss_ex, torch.float32, shape=(M, B))
    check("correct_ex", correct_ex, torch.int32, shape=(M, B))
    check("loss_out", loss_out, torch.float32, shape=(M,))
    check("correct_out", correct_out, torch.int32, shape=(M,))
    if loss_ex.stride() != correct_ex.stride() or loss_ex.stride(1) != 1:
        raise ValueError("mean_reduce: loss_ex and correct_ex must be contiguous [M, B]")
    if not (loss_out.is_contiguous() and correct_out.is_contiguous()):
        raise ValueError("mean_reduce: loss_out and correct_out must be contiguous")
    launch(mean_reduce_kernel, (M,),
           dict(LOSS=loss_ex, CORRECT=correct_ex, LOSS_OUT=loss_out, CORRECT_OUT=correct_out, B=B,
                sloss_m=loss_ex.stride(0)),
           dict(BLOCK=1024))
