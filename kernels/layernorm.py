"""LayerNorm over d_model (TransformerLens / torch convention, biased variance), forward and backward.

Forward, per row x of length D:  mu = mean(x), rstd = 1 / sqrt(mean((x - mu)^2) + eps),
    xhat = (x - mu) * rstd,  y = xhat * w + b;  mu and rstd are kept for the backward.
Backward, given dy:  g = dy * w,
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))  (+ res, a residual gradient added),
    dw = sum_rows dy * xhat,  db = sum_rows dy   (each program writes its row block's partial sums to
    a scratch buffer, then a fixed-order column sum over the blocks: deterministic, no atomics).
Rows hold a whole d_model vector: BLOCK_D = next power of two >= D (D <= 256), BLOCK_R rows per
program with BLOCK_R * BLOCK_D <= 4096.

Other kernels whose programs hold whole rows run a LayerNorm inside their own launch with the helpers
below (the same math): the attention forward normalises its output rows (LayerNorm 2's forward), the
attention backward forms its input gradient from LayerNorm 2's (embed_attn), the unembedding normalises
its input rows and turns dxf into the final LayerNorm's input gradient (unembed_loss). Their weight-gradient
partials go to the pass's flush like layernorm_backward's (``deferred_partials``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check, launch, pow2
from .mlp import colsum_plan, gemm_launch


@triton.jit
def _ln_row_stats(x, mask, D, eps):
    """mean and rstd (biased variance) of each row of the [BLOCK_R, BLOCK_D] tile x, zero outside mask."""
    mu = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mu[:, None], 0.0)
    return mu, 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)


@triton.jit
def _ln_bwd_coefs(dy, xhat, w, D):
    """Per row of the tiles dy, xhat (zero outside the rows' d_model): c1 = mean(dy w xhat), c2 = mean(dy w),
    so that dx = rstd (dy w - c2 - xhat c1) (the module docstring)."""
    g = dy * w[None, :]
    return tl.sum(g * xhat, axis=1) / D, tl.sum(g, axis=1) / D


@triton.jit
def ln_fwd_kernel(X, W, Bb, Y, MEAN, RSTD, R, D, eps,
                  sx_m, sx_r, sw_m, sb_m, sy_m, sy_r, sst_m,
                  X2, X_DIV, sx2_m, sx2_r, XOUT, sxo_m, sxo_r,
                  EMBED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Y = LayerNorm(X) for BLOCK_R rows; grid (cdiv(R, BLOCK_R), M). EMBED: row r of X is
    X[m, r % X_DIV] + X2[m, r // X_DIV] (the embedding table X0[t * V + v] = W_E[v] + W_pos[t]), also
    written to XOUT[m, r]."""
    m = tl.program_id(1).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    ds = tl.arange(0, BLOCK_D)
    rmask = rows < R
    dmask = ds < D
    mask = rmask[:, None] & dmask[None, :]
    if EMBED:
        x = tl.load(X + m * sx_m + (rows % X_DIV)[:, None] * sx_r + ds[None, :], mask=mask, other=0.0)
        x += tl.load(X2 + m * sx2_m + (rows // X_DIV)[:, None] * sx2_r + ds[None, :], mask=mask, other=0.0)
        tl.store(XOUT + m * sxo_m + rows[:, None] * sxo_r + ds[None, :], x, mask=mask)
    else:
        x = tl.load(X + m * sx_m + rows[:, None] * sx_r + ds[None, :], mask=mask, other=0.0)
    mu, rstd = _ln_row_stats(x, mask, D, eps)
    xc = tl.where(mask, x - mu[:, None], 0.0)
    w = tl.load(W + m * sw_m + ds, mask=dmask, other=0.0)
    b = tl.load(Bb + m * sb_m + ds, mask=dmask, other=0.0)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + m * sy_m + rows[:, None] * sy_r + ds[None, :], y, mask=mask)
    tl.store(MEAN + m * sst_m + rows, mu, mask=rmask)
    tl.store(RSTD + m * sst_m + rows, rstd, mask=rmask)


@triton.jit
def ln_bwd_kernel(X, W, MEAN, RSTD, DY, DX, RES, PART, R, D,
                  sx_m, sx_r, sw_m, sst_m, sdy_m, sdy_r, sdx_m, sdx_r, sres_m, sres_r, spart_m, spart_s, spart_w,
                  HAS_RES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """DX = LayerNorm backward (+ RES) for BLOCK_R rows, and this row block's partial weight
    gradients PART(m, pid, 0)[:D] = sum_rows DY * xhat, PART(m, pid, 1)[:D] = sum_rows DY, where
    PART(m, s, w) = PART + m spart_m + s spart_s + w spart_w; grid (cdiv(R, BLOCK_R), M)."""
    m = tl.program_id(1).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    ds = tl.arange(0, BLOCK_D)
    rmask = rows < R
    dmask = ds < D
    mask = rmask[:, None] & dmask[None, :]
    x = tl.load(X + m * sx_m + rows[:, None] * sx_r + ds[None, :], mask=mask, other=0.0)
    mu = tl.load(MEAN + m * sst_m + rows, mask=rmask, other=0.0)
    rstd = tl.load(RSTD + m * sst_m + rows, mask=rmask, other=0.0)
    w = tl.load(W + m * sw_m + ds, mask=dmask, other=0.0)
    dy = tl.load(DY + m * sdy_m + rows[:, None] * sdy_r + ds[None, :], mask=mask, other=0.0)
    xhat = tl.where(mask, (x - mu[:, None]) * rstd[:, None], 0.0)
    c1, c2 = _ln_bwd_coefs(dy, xhat, w, D)
    dx = rstd[:, None] * (dy * w[None, :] - c2[:, None] - xhat * c1[:, None])
    if HAS_RES:
        dx += tl.load(RES + m * sres_m + rows[:, None] * sres_r + ds[None, :], mask=mask, other=0.0)
    tl.store(DX + m * sdx_m + rows[:, None] * sdx_r + ds[None, :], dx, mask=mask)
    part = PART + m * spart_m + tl.program_id(0).to(tl.int64) * spart_s
    tl.store(part + ds, tl.sum(dy * xhat, axis=0), mask=dmask)
    tl.store(part + spart_w + ds, tl.sum(dy, axis=0), mask=dmask)


def deferred_partials(defer, n_blocks, M, D, dw, db, device):
    """A [2, n_blocks, M, D] partial-sum buffer from ``defer`` (an mlp.Deferred) whose block s holds row block
    s's sums of dy * xhat ([0]) and dy ([1]), registered as split-K partials of dw and db [M, D] (summed in
    s order by the flush); returns (buffer, its strides as spart_m, spart_s, spart_w)."""
    part = defer.buffer((2, n_blocks, M, D), device)
    defer.add(part[0].view(n_blocks, M, 1, D), dw.view(M, 1, 1, D))
    defer.add(part[1].view(n_blocks, M, 1, D), db.view(M, 1, 1, D))
    return part, dict(spart_m=D, spart_s=M * D, spart_w=n_blocks * M * D)


def check_ln_params(who, M, D, **ts):
    """One-line ValueError unless every given tensor is a float32 [M, D] row-contiguous (a LayerNorm w, b, dw
    or db: ParamLayout views)."""
    for n, t in ts.items():
        check(n, t, torch.float32, shape=(M, D))
        if t.stride(1) != 1:
            raise ValueError(f"{who}: {n} must be contiguous along d_model")


def _rows_check(name, t, M, D):
    check(name, t, torch.float32, dims=3, shape=(M, None, D))
    if t.stride(2) != 1:
        raise ValueError(f"{name} must be contiguous along d_model")


def _block_r(BD):
    return max(1, min(64, 4096 // BD))


def layernorm_forward(x, w, b, y, mean, rstd, eps, embed=None):
    """y = LayerNorm(x) * w + b. x, y [M, R, D] (rows may be strided, d_model contiguous);
    w, b [M, D]; mean, rstd [M, R] (written). Returns y. embed: (W_E [M, V, D], W_pos [M, T, D]) to form
    x = the embedding table (x[t * V + v] = W_E[v] + W_pos[t], R = T * V) in the same launch, written to x."""
    M, R, D = x.shape
    _rows_check("x", x, M, D)
    _rows_check("y", y, M, D)
    for n, t in (("w", w), ("b", b)):
        check(n, t, torch.float32, shape=(M, D))
    for n, t in (("mean", mean), ("rstd", rstd)):
        check(n, t, torch.float32, shape=(M, R))
    BD = pow2(D, 16)
    BR = _block_r(BD)
    args = dict(X=x, W=w, Bb=b, Y=y, MEAN=mean, RSTD=rstd, R=R, D=D, eps=float(eps),
                sx_m=x.stride(0), sx_r=x.stride(1), sw_m=w.stride(0), sb_m=b.stride(0),
                sy_m=y.stride(0), sy_r=y.stride(1), sst_m=mean.stride(0),
                X2=x, X_DIV=1, sx2_m=0, sx2_r=0, XOUT=x, sxo_m=0, sxo_r=0)
    if embed is not None:
        W_E, W_pos = embed
        V, T = W_E.shape[1], W_pos.shape[1]
        _rows_check("W_E", W_E, M, D)
        _rows_check("W_pos", W_pos, M, D)
        if R != T * V:
            raise ValueError(f"layernorm_forward: embed needs x of T * V = {T * V} rows, got {R}")
        args.update(X=W_E, sx_m=W_E.stride(0), sx_r=W_E.stride(1), X2=W_pos, X_DIV=V, sx2_m=W_pos.stride(0),
                    sx2_r=W_pos.stride(1), XOUT=x, sxo_m=x.stride(0), sxo_r=x.stride(1))
    launch(ln_fwd_kernel, (triton.cdiv(R, BR), M), args, dict(EMBED=embed is not None, BLOCK_R=BR, BLOCK_D=BD))
    return y


def layernorm_backward(x, w, mean, rstd, dy, dx, dw, db, res=None, defer=None):
    """dx = LayerNorm backward of dy (+ res); dw, db [M, D] the weight and bias gradients summed over
    rows. x, dy, dx, res [M, R, D]; mean, rstd [M, R] from layernorm_forward. The kernel writes each row
    block's partial sums; without defer one more launch sums them (column sums), with defer (an
    mlp.Deferred) they are split-K partials that its flush sums (s = 0, 1, ... in order: one launch
    fewer per LayerNorm), and dw, db are complete only after ``defer.flush()``."""
    M, R, D = x.shape
    for n, t in (("x", x), ("dy", dy), ("dx", dx)) + ((("res", res),) if res is not None else ()):
        _rows_check(n, t, M, D)
        if t.shape[1] != R:
            raise ValueError(f"{n} must have {R} rows like x, got {t.shape[1]}")
    for n, t in (("w", w), ("dw", dw), ("db", db)):
        check(n, t, torch.float32, shape=(M, D))
    if mean.stride() != rstd.stride():
        raise ValueError("mean and rstd must share a layout")
    BD = pow2(D, 16)
    BR = max(1, _block_r(BD) // 2)          # more live tiles than the forward
    n_blocks = triton.cdiv(R, BR)
    if defer is not None:     # [which, s, m, d]: two split-K partial sets
        part, strides = deferred_partials(defer, n_blocks, M, D, dw, db, x.device)
    else:
        part = torch.empty((M, n_blocks, 2 * D), dtype=torch.float32, device=x.device)
        strides = dict(spart_m=part.stride(0), spart_s=2 * D, spart_w=D)
    launch(ln_bwd_kernel, (n_blocks, M),
           dict(X=x, W=w, MEAN=mean, RSTD=rstd, DY=dy, DX=dx, RES=res if res is not None else dx, PART=part,
                R=R, D=D,
                sx_m=x.stride(0), sx_r=x.stride(1), sw_m=w.stride(0), sst_m=mean.stride(0),
                sdy_m=dy.stride(0), sdy_r=dy.stride(1), sdx_m=dx.stride(0), sdx_r=dx.stride(1),
                sres_m=res.stride(0) if res is not None else 0, sres_r=res.stride(1) if res is not None else 0,
                **strides),
           dict(HAS_RES=res is not None, BLOCK_R=BR, BLOCK_D=BD))
    if defer is None:   # fixed-order sums over the row blocks (split-K when long), both in one launch
        gemm_launch(colsum_plan(part[:, :, :D], dw), colsum_plan(part[:, :, D:], db))
    return dx
