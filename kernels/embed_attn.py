"""Embedding tables and causal attention over 2-5 positions, forward and backward.

The vocabulary is tiny and n_ctx is 2-5, so the first layer works on tables indexed by
(position t, token v), row t * V + v (V = d_vocab):

    X0[t * V + v] = W_E[v] + W_pos[t]     (formed by its first reader: the QKV product's operand load,
                                           or LayerNorm 1 with LayerNorm: mlp.gemm_plan / layernorm_forward)

and the first layer's Q, K, V are tables too (LayerNorm and the projections run on T * V rows, not
on every example). Attention then reads rows by token. A layer in "plain" mode (the second layer)
reads per-example rows b * T + t instead. For query position tq of example b and head h:

    q = QKV[row(b, tq), Q_h], k_t = QKV[row(b, t), K_h], v_t = QKV[row(b, t), V_h]
    sm_t = softmax_{t <= tq}(q . k_t / sqrt(d_head))          (causal)
    pattern_t = alpha * sm_t + (1 - alpha) * [t <= tq]         (the attention rate of Zhong et al.)
    z[b, tq, h] = sum_t pattern_t v_t

The forward kernel goes on to the output projection and the residual in the same launch:
out = z W_O + b_O + x[row(b, tq)] (one tl.dot per head; z and sm are kept for the backward).

Backward (attn_backward), with dz = dL/dz = dmid W_O^T (formed in the kernel from dmid = dL/d(block
residual after attention), d_model at a time; it never reaches memory) and the saved sm:
    dp_t = dz . v_t,  dscore_t = alpha * sm_t * (dp_t - sum_s sm_s dp_s),
    dq = sum_t dscore_t k_t / sqrt(d_head),  dk_t += dscore_t q / sqrt(d_head),  dv_t += pattern_t dz
written per example and position into G[b * T + t] = [dq | dk | dv | dres] (columns
[0, HDh), [HDh, 2HDh), [2HDh, 3HDh), [3HDh, 3HDh + D), HDh = n_heads * d_head; dres is the residual
gradient at query positions, 0 elsewhere). In table mode token_scatter then sums G into the tables:

    Gtab[t * V + v] = sum_{b : tok[b, t] == v} G[b * T + t]

as a segmented sum over the examples sorted by token (token_index, built once per data set): each
program adds its (position, token) segment's rows in a fixed order (deterministic, no atomics) and
skips the columns that are zero at non-query positions; embed_backward turns dX0 into dW_E[v] = sum_t dX0[t * V + v] and
dW_pos[t] = sum_v dX0[t * V + v].

Limits: T = n_ctx <= 8 (BLOCK_T = next power of two >= T); d_head <= 256; d_model <= 256. Tokens
are int64 [M or 1, B, T] and are assumed to lie in [0, d_vocab) (checking would need a host sync;
an out-of-range token reads zeros, never out of bounds).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _common
from ._common import check, launch, pow2, pow2_floor
from .layernorm import _ln_bwd_coefs, _ln_row_stats, check_ln_params, deferred_partials


# ----------------------------------------------------------------------------------------------
# Embedding table


@triton.jit
def _embed_grad_block(row, local, BLOCK: tl.constexpr):
    """Program ``local`` of the embedding gradient (a task of flush.flush_kernel), from the table row
    (int64: dX0, dW_E, dW_pos addresses, V, D, T, their model strides, M): per model, cdiv(V * D, BLOCK)
    programs dW_E[v, d] = sum_t dX0[t * V + v, d] (flat index v * D + d), then T programs dW_pos[t] =
    sum_v dX0[t * V + v] ([16, 256] tiles over v, then a sum over the tile's rows; D <= 256)."""
    dx = tl.load(row + 0).to(tl.pointer_type(tl.float32))
    dwe = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    dwp = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    V = tl.load(row + 3)
    D = tl.load(row + 4)
    T = tl.load(row + 5)
    n_e = (V * D + BLOCK - 1) // BLOCK
    per_model = n_e + T
    m = local // per_model
    k = local % per_model
    base = dx + m * tl.load(row + 6)
    if k < n_e:
        idx = k * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = idx < V * D
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for t in range(0, T):
            acc += tl.load(base + t * V * D + idx, mask=mask, other=0.0)
        tl.store(dwe + m * tl.load(row + 7) + idx, acc, mask=mask)
    else:
        t = k - n_e
        vs = tl.arange(0, 16)
        ds = tl.arange(0, 256)
        dmask = ds < D
        acc2 = tl.zeros((16, 256), dtype=tl.float32)
        for v0 in range(0, V, 16):
            v = v0 + vs
            acc2 += tl.load(base + (t * V + v)[:, None] * D + ds[None, :], mask=(v < V)[:, None] & dmask[None, :],
                            other=0.0)
        tl.store(dwp + m * tl.load(row + 8) + t * D + ds, tl.sum(acc2, axis=0), mask=dmask)


def _param_check(name, t, M, shape):
    check(name, t, torch.float32, shape=(M,) + tuple(shape))
    inner = t[0] if t.shape[0] > 0 else t
    if t.dim() > 1 and not inner.is_contiguous():
        raise ValueError(f"{name} must be contiguous within each model (a ParamLayout view)")


def embed_backward(dX0, dW_E, dW_pos, defer):
    """dW_E[v] = sum_t dX0[t * V + v], dW_pos[t] = sum_v dX0[t * V + v]. dX0 [M, T * V, D] contiguous.
    A task of the pass's last launch: complete after ``defer.flush()`` (defer: an mlp.Deferred)."""
    from .flush import EMBED_GRAD
    M, V, D = dW_E.shape
    T = dW_pos.shape[1]
    _param_check("dW_E", dW_E, M, (V, D))
    _param_check("dW_pos", dW_pos, M, (T, D))
    check("dX0", dX0, torch.float32, shape=(M, T * V, D))
    if not dX0.is_contiguous():
        raise ValueError("dX0 must be contiguous")
    if D > 256:
        raise ValueError(f"embed_backward handles d_model <= 256, got {D}")
    defer.add_task(EMBED_GRAD, [dX0, dW_E, dW_pos, V, D, T, dX0.stride(0), dW_E.stride(0), dW_pos.stride(0), M],
                   M * (triton.cdiv(V * D, defer.BLOCK) + T))


# ----------------------------------------------------------------------------------------------
# Attention


@triton.jit
def _rows_of(TOK, tok_base, bs, ts, bmask, tmask, V, T: tl.constexpr, TABLE: tl.constexpr):
    """Row of (example b, position t) in the Q/K/V source: t * V + tok[b, t] (table) or b * T + t."""
    if TABLE:
        inside = bmask[:, None] & tmask[None, :]
        tok = tl.load(TOK + tok_base + bs[:, None] * T + ts[None, :], mask=inside, other=0)
        ok = inside & (tok >= 0) & (tok < V)
        return ts[None, :].to(tl.int64) * V + tl.where(ok, tok, 0), ok
    else:
        return bs[:, None].to(tl.int64) * T + ts[None, :], bmask[:, None] & tmask[None, :]


@triton.jit
def attn_fwd_kernel(QKV, TOK, XIN, WO, BO, Z, SM, OUT,
                    B, V, D, NH, scale, alpha,
                    sqkv_m, sqkv_r, stok_m, sx_m, sx_r, swo_m, sbo_m, sz_m, ssm_m, so_m,
                    T: tl.constexpr, TQ: tl.constexpr, TABLE: tl.constexpr, DH: tl.constexpr,
                    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_N: tl.constexpr,
                    LNW, LNB, HN, MEAN, RSTD, ln_eps, sln_m, shn_m, sst_m, LN: tl.constexpr):
    """Attention of query position tq = T - TQ + pid(1) for BLOCK_B examples, every head, and the output
    projection with the residual: OUT[m, b * TQ + qi, n] = sum_h z[b, qi, h] W_O[h][:, n] (+ b_O[n]) +
    XIN[row(b, tq), n] for BLOCK_N columns n (z W_O as one tl.dot per head, heads in order). Grid
    (cdiv(B, BLOCK_B) * cdiv(D, BLOCK_N), TQ, M). The programs of column tile 0 also write
    Z[m, b * TQ + qi, h * DH:(h+1) * DH] and SM[m, b * TQ + qi, h, :T] for the backward.
    LN (BLOCK_N >= D: one column tile holds whole rows): also the next LayerNorm of OUT's rows,
    HN[m, r] = (OUT[m, r] - mean) * rstd * LNW[m] + LNB[m] ([M, B * TQ, D] contiguous, model stride shn_m),
    with MEAN, RSTD [M, B * TQ] (model stride sst_m) kept for the backward."""
    nt = tl.cdiv(D, BLOCK_N)
    pid_b = tl.program_id(0) // nt
    pid_n = tl.program_id(0) % nt
    qi = tl.program_id(1)
    m = tl.program_id(2).to(tl.int64)
    tq = T - TQ + qi
    bs = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    ts = tl.arange(0, BLOCK_T)
    es = tl.arange(0, BLOCK_DH)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    bmask = bs < B
    tmask = ts < T
    emask = es < DH
    nmask = ns < D
    rows, ok = _rows_of(TOK, m * stok_m, bs, ts, bmask, tmask, V, T, TABLE)       # [BB, BT]
    is_q = (ts == tq)[None, :]
    row_q = tl.sum(tl.where(is_q, rows, 0), axis=1)                                # [BB]
    ok_q = tl.sum(tl.where(is_q & ok, 1, 0), axis=1) > 0
    base = QKV + m * sqkv_m
    HD = NH * DH
    kv_off = rows[:, :, None] * sqkv_r + es[None, None, :]
    kv_mask = ok[:, :, None] & emask[None, None, :]
    allowed = (ts <= tq)[None, :]
    out_row = bs * TQ + qi
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for h in range(0, NH):
        q = tl.load(base + row_q[:, None] * sqkv_r + h * DH + es[None, :], mask=ok_q[:, None] & emask[None, :],
                    other=0.0)
        k = tl.load(base + kv_off + HD + h * DH, mask=kv_mask, other=0.0)           # [BB, BT, BDH]
        s = tl.sum(q[:, None, :] * k, axis=2) * scale
        s = tl.where(allowed, s, float("-inf"))
        e = tl.exp(s - tl.max(s, axis=1)[:, None])
        e = tl.where(allowed, e, 0.0)
        sm = e / tl.sum(e, axis=1)[:, None]
        pattern = alpha * sm + (1.0 - alpha) * tl.where(allowed, 1.0, 0.0)
        v = tl.load(base + kv_off + 2 * HD + h * DH, mask=kv_mask, other=0.0)
        z = tl.sum(pattern[:, :, None] * v, axis=1)                                 # [BB, BDH]
        if pid_n == 0:
            tl.store(Z + m * sz_m + out_row[:, None] * HD + h * DH + es[None, :], z,
                     mask=bmask[:, None] & emask[None, :])
            tl.store(SM + m * ssm_m + (out_row * NH + h)[:, None] * T + ts[None, :], sm,
                     mask=bmask[:, None] & tmask[None, :])
        w = tl.load(WO + m * swo_m + (h * DH + es)[:, None] * D + ns[None, :], mask=emask[:, None] & nmask[None, :],
                    other=0.0)                                                      # [BDH, BN]
        acc += tl.dot(z, w, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BO + m * sbo_m + ns, mask=nmask, other=0.0)[None, :]
    acc += tl.load(XIN + m * sx_m + row_q[:, None] * sx_r + ns[None, :], mask=ok_q[:, None] & nmask[None, :],
                   other=0.0)
    tl.store(OUT + m * so_m + out_row[:, None] * D + ns[None, :], acc, mask=bmask[:, None] & nmask[None, :])
    if LN:
        omask = bmask[:, None] & nmask[None, :]
        mu, rstd = _ln_row_stats(tl.where(omask, acc, 0.0), omask, D, ln_eps)
        lw = tl.load(LNW + m * sln_m + ns, mask=nmask, other=0.0)
        lb = tl.load(LNB + m * sln_m + ns, mask=nmask, other=0.0)
        hn = (acc - mu[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]
        tl.store(HN + m * shn_m + out_row[:, None] * D + ns[None, :], hn, mask=omask)
        tl.store(MEAN + m * sst_m + out_row, mu, mask=bmask)
        tl.store(RSTD + m * sst_m + out_row, rstd, mask=bmask)


@triton.jit
def attn_bwd_kernel(QKV, TOK, SM, WO, DMID, G,
                    B, V, D, NH, scale, alpha,
                    sqkv_m, sqkv_r, stok_m, ssm_m, swo_m, sdm_m, sg_m, sg_r,
                    T: tl.constexpr, TQ: tl.constexpr, TABLE: tl.constexpr, DH: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_D: tl.constexpr,
                    LX, LW, LMU, LRS, LDY, LRES, PART, slx_m, sln_m, sst_m, sldy_m, slres_m,
                    spart_m, spart_s, spart_w, LN: tl.constexpr):
    """Per-example attention backward of head h for BLOCK_B examples, all TQ query positions;
    grid (cdiv(B, BLOCK_B), M * NH). Writes G[m, b * T + t] blocks dq, dk, dv of head h for every t
    (dq = 0 where t holds no query) and (head 0) the residual block: DMID[b * TQ + qi] at t = tq, else 0.
    dz[b, qi, h] = DMID[b * TQ + qi] W_O[h]^T (WO [M, NH, DH, D], contiguous per model), 16 columns of
    d_model at a time (products summed in a fixed order).
    LN: DMID is an output, the backward of the LayerNorm that read the rows (LayerNorm 2) plus the residual
    gradient: DMID[r] = rstd (dy LW - c2 - xhat c1) + LRES[r] with dy = LDY[r], xhat = (LX[r] - LMU[r]) LRS[r],
    c1, c2 the row means of dy LW xhat and dy LW (layernorm._ln_bwd_coefs; every row tensor [M, B * TQ, D]
    contiguous per model, LMU, LRS [M, B * TQ]). Every head's program forms the row sums from one
    [BLOCK_B, BLOCK_D] pass and DMID's columns where dz needs them; head 0's programs write DMID and this
    row block's weight-gradient partials PART + m spart_m + pid(0) spart_s (+ spart_w) [D]: sums over its
    rows of dy * xhat and dy."""
    pid_b = tl.program_id(0)
    pmh = tl.program_id(1)
    m = (pmh // NH).to(tl.int64)
    h = pmh % NH
    bs = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    ts = tl.arange(0, BLOCK_T)
    es = tl.arange(0, BLOCK_DH)
    bmask = bs < B
    tmask = ts < T
    emask = es < DH
    rows, ok = _rows_of(TOK, m * stok_m, bs, ts, bmask, tmask, V, T, TABLE)
    base = QKV + m * sqkv_m
    HD = NH * DH
    kv_off = rows[:, :, None] * sqkv_r + es[None, None, :]
    kv_mask = ok[:, :, None] & emask[None, None, :]
    k = tl.load(base + kv_off + HD + h * DH, mask=kv_mask, other=0.0)
    v = tl.load(base + kv_off + 2 * HD + h * DH, mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_B, BLOCK_T, BLOCK_DH), dtype=tl.float32)
    dv = tl.zeros((BLOCK_B, BLOCK_T, BLOCK_DH), dtype=tl.float32)
    g_base = G + m * sg_m
    bt_mask = bmask[:, None] & emask[None, :]
    if LN:
        ds = tl.arange(0, BLOCK_D)
        rd_mask = bmask[:, None] & (ds < D)[None, :]
        lw = tl.load(LW + m * sln_m + ds, mask=ds < D, other=0.0)
        pw = tl.zeros((BLOCK_D,), dtype=tl.float32)
        pb = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for qi in tl.static_range(TQ):
        tq = T - TQ + qi
        is_q = (ts == tq)[None, :]
        row_q = tl.sum(tl.where(is_q, rows, 0), axis=1)
        ok_q = tl.sum(tl.where(is_q & ok, 1, 0), axis=1) > 0
        q = tl.load(base + row_q[:, None] * sqkv_r + h * DH + es[None, :], mask=ok_q[:, None] & emask[None, :],
                    other=0.0)
        out_row = bs * TQ + qi
        allowed = (ts <= tq)[None, :]
        sm = tl.load(SM + m * ssm_m + (out_row * NH + h)[:, None] * T + ts[None, :],
                     mask=bmask[:, None] & allowed, other=0.0)
        pattern = alpha * sm + (1.0 - alpha) * tl.where(allowed, 1.0, 0.0)
        if LN:
            lrow = out_row[:, None] * D + ds[None, :]
            mu = tl.load(LMU + m * sst_m + out_row, mask=bmask, other=0.0)
            rs = tl.load(LRS + m * sst_m + out_row, mask=bmask, other=0.0)
            dy = tl.load(LDY + m * sldy_m + lrow, mask=rd_mask, other=0.0)
            xhat = tl.where(rd_mask, (tl.load(LX + m * slx_m + lrow, mask=rd_mask, other=0.0) - mu[:, None])
                            * rs[:, None], 0.0)
            c1, c2 = _ln_bwd_coefs(dy, xhat, lw, D)
            pw += tl.sum(dy * xhat, axis=0)
            pb += tl.sum(dy, axis=0)
            if h == 0:
                dmr = rs[:, None] * (dy * lw[None, :] - c2[:, None] - xhat * c1[:, None])
                dmr += tl.load(LRES + m * slres_m + lrow, mask=rd_mask, other=0.0)
                tl.store(DMID + m * sdm_m + lrow, dmr, mask=rd_mask)
                tl.store(g_base + (bs * T + tq)[:, None] * sg_r + 3 * HD + ds[None, :], dmr, mask=rd_mask)
        dz = tl.zeros((BLOCK_B, BLOCK_DH), dtype=tl.float32)
        for d0 in range(0, D, 16):
            dd = d0 + tl.arange(0, 16)
            if LN:      # DMID's columns dd, formed here (head 0 writes them; other programs cannot read them)
                cm = bmask[:, None] & (dd < D)[None, :]
                crow = out_row[:, None] * D + dd[None, :]
                xh = tl.where(cm, (tl.load(LX + m * slx_m + crow, mask=cm, other=0.0) - mu[:, None]) * rs[:, None], 0.0)
                lwc = tl.load(LW + m * sln_m + dd, mask=dd < D, other=0.0)
                dm = rs[:, None] * (tl.load(LDY + m * sldy_m + crow, mask=cm, other=0.0) * lwc[None, :] - c2[:, None]
                                    - xh * c1[:, None])
                dm = tl.where(cm, dm + tl.load(LRES + m * slres_m + crow, mask=cm, other=0.0), 0.0)   # [BB, 16]
            else:
                dm = tl.load(DMID + m * sdm_m + out_row[:, None] * D + dd[None, :],
                             mask=bmask[:, None] & (dd < D)[None, :], other=0.0)                   # [BB, 16]
            wo = tl.load(WO + m * swo_m + (h * DH + es)[:, None] * D + dd[None, :],
                         mask=emask[:, None] & (dd < D)[None, :], other=0.0)                   # [BDH, 16]
            dz += tl.sum(dm[:, None, :] * wo[None, :, :], axis=2)
        dp = tl.sum(dz[:, None, :] * v, axis=2)                                     # [BB, BT]
        dscore = alpha * sm * (dp - tl.sum(sm * dp, axis=1)[:, None])
        dq = tl.sum(dscore[:, :, None] * k, axis=1) * scale
        tl.store(g_base + (bs * T + tq)[:, None] * sg_r + h * DH + es[None, :], dq, mask=bt_mask)
        dk += dscore[:, :, None] * q[:, None, :] * scale
        dv += pattern[:, :, None] * dz[:, None, :]
    zero = tl.zeros((BLOCK_B, BLOCK_DH), dtype=tl.float32)
    for t in tl.static_range(T - TQ):
        tl.store(g_base + (bs * T + t)[:, None] * sg_r + h * DH + es[None, :], zero, mask=bt_mask)
    g_off = (bs[:, None, None] * T + ts[None, :, None]) * sg_r + es[None, None, :]
    g_mask = bmask[:, None, None] & tmask[None, :, None] & emask[None, None, :]
    tl.store(g_base + g_off + HD + h * DH, dk, mask=g_mask)
    tl.store(g_base + g_off + 2 * HD + h * DH, dv, mask=g_mask)
    if h == 0:
        ds = tl.arange(0, BLOCK_D)
        dmask = ds < D
        rd_mask = bmask[:, None] & dmask[None, :]
        for t in tl.static_range(T):
            if t >= T - TQ:
                if not LN:      # (with LN, written in the query loop)
                    d = tl.load(DMID + m * sdm_m + (bs * TQ + (t - (T - TQ)))[:, None] * D + ds[None, :],
                                mask=rd_mask, other=0.0)
                    tl.store(g_base + (bs * T + t)[:, None] * sg_r + 3 * HD + ds[None, :], d, mask=rd_mask)
            else:
                tl.store(g_base + (bs * T + t)[:, None] * sg_r + 3 * HD + ds[None, :],
                         tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32), mask=rd_mask)
        if LN:
            part = PART + m * spart_m + pid_b.to(tl.int64) * spart_s + ds
            tl.store(part, pw, mask=dmask)
            tl.store(part + spart_w, pb, mask=dmask)


def _attn_blocks(T, Dh, D, budget):
    BT, BDH, BD = pow2(T, 2), pow2(Dh, 16), pow2(D, 16)
    BB = max(1, min(64, pow2_floor(max(1, budget // (BT * BDH)))))
    return BB, BT, BDH, BD


def _tokens_check(tokens, M, B, T, device):
    check("tokens", tokens, torch.int64, dims=3, device=device)
    if tokens.shape[0] not in (1, M) or tuple(tokens.shape[1:]) != (B, T) or not tokens.is_contiguous():
        raise ValueError(f"tokens must be a contiguous int64 [1 or {M}, {B}, {T}] tensor, got {list(tokens.shape)}")


def attn_forward(qkv, tokens, x_in, W_O, b_O, z, sm, out, n_heads, d_head, n_query, table, alpha, precision=None,
                 ln=None):
    """Attention of the query positions T - n_query .. T - 1 (causal) for every example, and the output
    projection with the residual, in one launch: out = z W_O (+ b_O) + x_in[query rows].

    qkv [M, R_in, 3 * H * Dh] contiguous (rows: table rows t * V + v when ``table``, else b * T + t);
    tokens int64 [1 or M, B, T] contiguous; x_in [M, R_in, D] the residual stream the rows index
    (d_model contiguous); W_O [M, H, Dh, D] (contiguous per model); b_O [M, D] or None. Writes
    z [M, B * n_query, H * Dh], sm [M, B * n_query * H * T] (the softmax before the attention-rate mix) and
    out [M, B * n_query, D]. V (for table rows) is R_in // T. precision: the dot mode (None: the default).
    ln: (w, b, eps, hn, mean, rstd) to run the next LayerNorm on out in the same launch (one program holds whole
    rows: d_model <= 256): hn [M, B * n_query, D] = LayerNorm(out) * w + b, mean and rstd [M, B * n_query]."""
    M, R_in, W3 = qkv.shape
    H, Dh = n_heads, d_head
    _, B, T = tokens.shape
    D = x_in.shape[2]
    TQ = n_query
    check("qkv", qkv, torch.float32, shape=(M, R_in, 3 * H * Dh))
    _tokens_check(tokens, M, B, T, qkv.device)
    check("x_in", x_in, torch.float32, shape=(M, R_in, D))
    check("W_O", W_O, torch.float32, shape=(M, H, Dh, D))
    if b_O is not None:
        check("b_O", b_O, torch.float32, shape=(M, D))
    check("z", z, torch.float32, shape=(M, B * TQ, H * Dh))
    check("sm", sm, torch.float32, shape=(M, B * TQ * H * T))
    check("out", out, torch.float32, shape=(M, B * TQ, D))
    if not (qkv.is_contiguous() and z.is_contiguous() and sm.is_contiguous() and out.is_contiguous()
            and x_in.stride(2) == 1 and W_O[0].is_contiguous() and (b_O is None or b_O.stride(1) == 1)):
        raise ValueError("attn_forward: qkv, z, sm, out must be contiguous (x_in along d_model, W_O per model)")
    if not 1 <= TQ <= T or (not table and R_in != B * T) or (table and R_in % T):
        raise ValueError(f"attn_forward: inconsistent n_query {TQ}, rows {R_in}, B {B}, T {T}")
    BT, BDH = pow2(T, 2), pow2(Dh, 16)
    BB = max(16, min(64, pow2_floor(max(1, 2048 // (BT * BDH)))))   # >= 16: a tl.dot operand
    BN = pow2(D, 16, 64)
    lnargs = dict(LNW=out, LNB=out, HN=out, MEAN=out, RSTD=out, ln_eps=0.0, sln_m=0, shn_m=0, sst_m=0)
    if ln is not None:
        w, b, eps, hn, mean, rstd = ln
        check_ln_params("attn_forward", M, D, w=w, b=b)
        check("hn", hn, torch.float32, shape=(M, B * TQ, D))
        check("mean", mean, torch.float32, shape=(M, B * TQ))
        check("rstd", rstd, torch.float32, shape=(M, B * TQ))
        if not (hn.is_contiguous() and mean.stride() == rstd.stride() and mean.stride(1) == 1
                and w.stride(0) == b.stride(0)) or D > 256:
            raise ValueError("attn_forward: ln needs hn contiguous, mean and rstd in one layout, w and b in one "
                             f"layout, d_model <= 256 (got {D})")
        BN = pow2(D, 16)            # one column tile: the LayerNorm needs whole rows
        lnargs = dict(LNW=w, LNB=b, HN=hn, MEAN=mean, RSTD=rstd, ln_eps=float(eps), sln_m=w.stride(0),
                      shn_m=hn.stride(0), sst_m=mean.stride(0))
    launch(attn_fwd_kernel, (triton.cdiv(B, BB) * triton.cdiv(D, BN), TQ, M),
           dict(QKV=qkv, TOK=tokens, XIN=x_in, WO=W_O, BO=b_O if b_O is not None else x_in, Z=z, SM=sm, OUT=out,
                B=B, V=R_in // T, D=D, NH=H, scale=1.0 / math.sqrt(Dh), alpha=float(alpha),
                sqkv_m=qkv.stride(0), sqkv_r=qkv.stride(1), stok_m=tokens.stride(0) if tokens.shape[0] > 1 else 0,
                sx_m=x_in.stride(0), sx_r=x_in.stride(1), swo_m=W_O.stride(0),
                sbo_m=b_O.stride(0) if b_O is not None else 0, sz_m=z.stride(0), ssm_m=sm.stride(0),
                so_m=out.stride(0), **lnargs),
           dict(T=T, TQ=TQ, TABLE=bool(table), DH=Dh, HAS_BIAS=b_O is not None,
                PRECISION=precision or _common.DOT_PRECISION, BLOCK_B=BB, BLOCK_T=BT, BLOCK_DH=BDH, BLOCK_N=BN,
                LN=ln is not None))


def attn_backward(qkv, tokens, sm, W_O, dmid, G, n_heads, d_head, n_query, table, alpha, ln=None):
    """Per-example attention backward into G [M, B * T, 3 * H * Dh + D] (row b * T + t; blocks
    dq | dk | dv | dres, every entry written). dmid [M, B * n_query, D] = dL/d(block residual after
    attention), copied into dres at query rows; dL/dz = dmid W_O^T is formed on chip (W_O [M, H, Dh, D],
    contiguous per model).
    ln: (x, w, mean, rstd, dy, res, dw, db, defer) when a LayerNorm read the block residual (LayerNorm 2):
    dmid is then written here, dmid = LayerNorm backward of dy (its output's gradient) + res, from its input
    rows x and layernorm_forward's mean, rstd (x, dy, res [M, B * n_query, D] contiguous; w, dw, db [M, D]);
    dw, db are split-K partials of ``defer`` (an mlp.Deferred): complete after its flush."""
    M, R_in, _ = qkv.shape
    H, Dh = n_heads, d_head
    _, B, T = tokens.shape
    D = dmid.shape[2]
    TQ = n_query
    check("qkv", qkv, torch.float32, shape=(M, R_in, 3 * H * Dh))
    _tokens_check(tokens, M, B, T, qkv.device)
    check("sm", sm, torch.float32, shape=(M, B * TQ * H * T))
    check("W_O", W_O, torch.float32, shape=(M, H, Dh, D))
    if not W_O[0].is_contiguous():
        raise ValueError("attn_backward: W_O must be contiguous within each model (a ParamLayout view)")
    check("dmid", dmid, torch.float32, shape=(M, B * TQ, D))
    check("G", G, torch.float32, shape=(M, B * T, 3 * H * Dh + D))
    if not all(t.is_contiguous() for t in (qkv, sm, dmid, G)):
        raise ValueError("attn_backward: qkv, sm, dmid, G must be contiguous")
    # five live [BB, BT, BDH] tiles, and the query loop unrolled n_query times: no spills on sm_80/sm_90
    BB, BT, BDH, BD = _attn_blocks(T, Dh, D, 1024 if TQ == 1 else 512)
    n_blocks = triton.cdiv(B, BB)
    lnargs = dict(LX=dmid, LW=dmid, LMU=dmid, LRS=dmid, LDY=dmid, LRES=dmid, PART=dmid, slx_m=0, sln_m=0, sst_m=0,
                  sldy_m=0, slres_m=0, spart_m=0, spart_s=0, spart_w=0)
    if ln is not None:
        x, w, mean, rstd, dy, res, dw, db, defer = ln
        check_ln_params("attn_backward", M, D, w=w, dw=dw, db=db)
        for n, t in (("x", x), ("dy", dy), ("res", res)):
            check(n, t, torch.float32, shape=(M, B * TQ, D))
            if not t.is_contiguous():
                raise ValueError(f"attn_backward: ln's {n} must be contiguous")
        for n, t in (("mean", mean), ("rstd", rstd)):
            check(n, t, torch.float32, shape=(M, B * TQ))
        if mean.stride() != rstd.stride() or mean.stride(1) != 1 or D > 256:
            raise ValueError(f"attn_backward: ln's mean and rstd must share a layout, d_model <= 256 (got {D})")
        part, strides = deferred_partials(defer, n_blocks, M, D, dw, db, dmid.device)
        lnargs = dict(LX=x, LW=w, LMU=mean, LRS=rstd, LDY=dy, LRES=res, PART=part, slx_m=x.stride(0),
                      sln_m=w.stride(0), sst_m=mean.stride(0), sldy_m=dy.stride(0), slres_m=res.stride(0), **strides)
    launch(attn_bwd_kernel, (n_blocks, M * H),
           dict(QKV=qkv, TOK=tokens, SM=sm, WO=W_O, DMID=dmid, G=G, B=B, V=R_in // T, D=D, NH=H,
                scale=1.0 / math.sqrt(Dh), alpha=float(alpha),
                sqkv_m=qkv.stride(0), sqkv_r=qkv.stride(1), stok_m=tokens.stride(0) if tokens.shape[0] > 1 else 0,
                ssm_m=sm.stride(0), swo_m=W_O.stride(0), sdm_m=dmid.stride(0), sg_m=G.stride(0), sg_r=G.stride(1),
                **lnargs),
           dict(T=T, TQ=TQ, TABLE=bool(table), DH=Dh, BLOCK_B=BB, BLOCK_T=BT, BLOCK_DH=BDH, BLOCK_D=BD,
                LN=ln is not None))


# ----------------------------------------------------------------------------------------------
# Per-example rows -> (position, token) tables


@triton.jit
def token_scatter_kernel(G, PERM, STARTS, OUT, B, V, W, ZERO_T, LIVE_LO, LIVE_HI,
                         sg_m, sg_r, sp_m, ss_m, so_m,
                         T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """OUT[m, t * V + v, c] = sum_{b : tok[m, b, t] == v} G[m, b * T + t, c] for one token v and BLOCK_W
    columns c: a segmented sum over the examples listed by token_index (PERM[m, t, STARTS[m, t, v]:
    STARTS[m, t, v + 1]], ascending b), BLOCK_R rows at a time into a [BLOCK_R, BLOCK_W] accumulator
    (row i of the segment into lane i % BLOCK_R), then a sum over the lanes: a fixed order. Grid
    (V * cdiv(W, BLOCK_W), M * T). Rows of G at positions t < ZERO_T are zero outside the columns
    [LIVE_LO, LIVE_HI) (what attn_backward writes there): those columns are written as 0 unread."""
    pid = tl.program_id(0)
    t = tl.program_id(1) % T
    m = (tl.program_id(1) // T).to(tl.int64)
    nw = tl.cdiv(W, BLOCK_W)
    v = pid // nw
    cs = (pid % nw) * BLOCK_W + tl.arange(0, BLOCK_W)
    cmask = cs < W
    zero_here = t < ZERO_T
    live = cmask & (cs >= tl.where(zero_here, LIVE_LO, 0)) & (cs < tl.where(zero_here, LIVE_HI, W))
    seg = STARTS + m * ss_m + t * (V + 1) + v
    lo = tl.load(seg)
    hi = tl.load(seg + 1)
    hi = tl.where(tl.max(live.to(tl.int32), axis=0) > 0, hi, lo)     # a block of zero columns: nothing to read
    rs = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_R):
        r = r0 + rs
        rmask = r < hi
        b = tl.load(PERM + m * sp_m + t * B + r, mask=rmask, other=0).to(tl.int64)
        acc += tl.load(G + m * sg_m + (b * T + t)[:, None] * sg_r + cs[None, :],
                       mask=rmask[:, None] & live[None, :], other=0.0)
    tl.store(OUT + m * so_m + (t * V + v).to(tl.int64) * W + cs, tl.sum(acc, axis=0), mask=cmask)


def token_index(tokens, d_vocab: int, out=None):
    """The examples of each (position, token) pair, for token_scatter: (perm, starts) with perm [M', T, B]
    int32 the example numbers sorted by token at each position (stable: ascending b within a token) and
    starts [M', T, V + 1] int32, starts[m, t, v] = #{b : tok[m, b, t] < v}, so that the examples holding v
    at t are perm[m, t, starts[v]:starts[v + 1]] (tokens outside [0, V) are in no segment). tokens int64
    [M', B, T]. A few torch operations on the device, no sync: build it once per data set (the tokens are
    fixed for a run). out: a previous (perm, starts) of the same shapes to overwrite in place (a captured
    CUDA graph keeps reading the same addresses)."""
    Mt, B, T = tokens.shape
    V = int(d_vocab)
    sorted_tok, order = torch.sort(tokens.transpose(1, 2).contiguous(), dim=-1, stable=True)   # [M', T, B]
    bounds = torch.arange(V + 1, dtype=sorted_tok.dtype, device=tokens.device).expand(Mt, T, V + 1).contiguous()
    starts = torch.searchsorted(sorted_tok, bounds)
    if out is None:
        return order.to(torch.int32).contiguous(), starts.to(torch.int32).contiguous()
    perm_out, starts_out = out
    if tuple(perm_out.shape) != (Mt, T, B) or tuple(starts_out.shape) != (Mt, T, V + 1):
        raise ValueError(f"token_index: out has shapes {list(perm_out.shape)}, {list(starts_out.shape)}; "
                         f"need [{Mt}, {T}, {B}] and [{Mt}, {T}, {V + 1}]")
    perm_out.copy_(order)
    starts_out.copy_(starts)
    return perm_out, starts_out


def token_scatter(G, index, out, zero=None):
    """out [M, T * V, W] (contiguous) = per-(position, token) sums of G [M, B * T, W] (contiguous) rows:
    out[m, t * V + v] = sum over examples b holding token v at position t of G[m, b * T + t]. index:
    token_index(tokens [1 or M, B, T], V). zero: None, or (t0, lo, hi) when G's rows at positions t < t0
    are exactly zero outside the columns [lo, hi) (the query and residual blocks of attn_backward at
    non-query positions): those sums are written as 0 without reading G. One launch, no workspace."""
    perm, starts = index
    M, BT_, W = G.shape
    check("perm", perm, torch.int32, dims=3, device=G.device)
    Mt, T, B = perm.shape
    check("starts", starts, torch.int32, shape=(Mt, T, None), device=G.device)
    V = starts.shape[2] - 1
    check("G", G, torch.float32, shape=(M, B * T, W))
    check("out", out, torch.float32, shape=(M, T * V, W))
    if Mt not in (1, M) or not all(t.is_contiguous() for t in (perm, starts, G, out)):
        raise ValueError(f"token_scatter: G, out and the index must be contiguous, the index for 1 or {M} models")
    t0, lo, hi = zero if zero is not None else (0, 0, 0)
    BW = pow2(W, 16, 32)
    launch(token_scatter_kernel, (V * triton.cdiv(W, BW), M * T),
           dict(G=G, PERM=perm, STARTS=starts, OUT=out, B=B, V=V, W=W, ZERO_T=int(t0), LIVE_LO=int(lo),
                LIVE_HI=int(hi), sg_m=G.stride(0), sg_r=G.stride(1), sp_m=perm.stride(0) if Mt > 1 else 0,
                ss_m=starts.stride(0) if Mt > 1 else 0, so_m=out.stride(0)),
           dict(T=T, BLOCK_R=64, BLOCK_W=BW))
    return out
