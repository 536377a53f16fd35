"""Dense products: the MLP (and every other matrix product of the model) as one batched GEMM kernel
with fused epilogues; bias gradients (column sums) are the same GEMM with a row of ones.

The GEMM computes, for every batch index (m, j) (m: the model, j: a second batch axis such as the
head or the Q/K/V block),

    acc[r, n] = sum_{ko < KO} sum_{ki < KI} A[m, j, r, ko, ki] * Bw[m, j, ko, ki, n]
    pre       = acc + bias[m, j, n]                          (HAS_BIAS)
    out       = pre * act'(Z[m, j, r, n])                    (DACT: backward through the activation)
    out       = out + R[m, j, r, n]                          (HAS_RES: a residual)
    C         = act(out), Z <- out                           (ACT with STORE_PRE: MLP forward)

Every operand is addressed through its strides, so a transpose or a broadcast (stride 0) costs
nothing; the split of the contraction into (KO, KI) lets one launch contract over heads x d_head of
a [n_heads, d_model, d_head] weight. The MLP forward is two launches
(pre, post = act(h W_in + b_in); out = post W_out + b_out + resid_mid) and its backward four
(dpre = (dout W_out^T) * act'(pre); dW_out = post^T dout; dW_in = h^T dpre; dh = dpre W_in^T).

Weight gradients contract over the examples. With few output tiles and a long contraction, the
contraction is split into S slices (split-K): each program writes its partial tile to a scratch
buffer and split_sum_kernel adds the S partials in a fixed order, so the result is deterministic
without atomics (and bit-identical from run to run for the same shapes). Block sizes: BLOCK_R in {16, 32}, BLOCK_N in {16, 32, 64},
BLOCK_K = 16, 8 warps; every dot dimension >= 16 (masks pad small operands), float32 accumulators, dots at
``_common.DOT_PRECISION`` ("ieee" by default). act: 0 none, 1 ReLU, 2 GELU (exact, erf form).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import check, launch, pow2

ACTS = {None: 0, "relu": 1, "gelu": 2}


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 1:
        return tl.maximum(x, 0.0)
    else:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _dact(x, ACT: tl.constexpr):
    """d act / dx. ReLU: 1 where x > 0 (0 at 0, as torch). GELU: Phi(x) + x phi(x)."""
    if ACT == 1:
        return tl.where(x > 0.0, 1.0, 0.0)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        return cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)


@triton.jit
def gemm_kernel(
    A, Bw, C, BIAS, RES, Z, WS,
    R, N, KI, KO, NJ, K_SPLIT,
    sa_m, sa_j, sa_r, sa_ko, sa_ki,
    sb_m, sb_j, sb_ko, sb_ki, sb_n,
    sc_m, sc_j, sc_r, sc_n,
    sbias_m, sbias_j, sbias_n,
    sres_m, sres_j, sres_r, sres_n,
    sz_m, sz_j, sz_r, sz_n,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, STORE_PRE: tl.constexpr,
    DACT: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_R, BLOCK_N] tile of C for batch (m, j) = divmod(pid(1), NJ), contraction slice
    ki in [pid(2) * K_SPLIT, (pid(2) + 1) * K_SPLIT); grid (cdiv(R, BLOCK_R) * cdiv(N, BLOCK_N), M * NJ, S).
    SPLIT: write the raw partial sum to WS[pid(2), pid(1)] ([S, M * NJ, R, N] contiguous) for
    split_sum_kernel (no epilogue); otherwise S = 1 and the epilogue of the module docstring."""
    pid = tl.program_id(0)
    pb = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_r = pid // n_tiles
    pid_n = pid % n_tiles
    m = (pb // NJ).to(tl.int64)
    j = (pb % NJ).to(tl.int64)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    rmask = rows < R
    nmask = cols < N
    a_base = A + m * sa_m + j * sa_j + rows[:, None] * sa_r
    b_base = Bw + m * sb_m + j * sb_j + cols[None, :] * sb_n
    split = tl.program_id(2)
    k_lo = split * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, KI)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for ko in range(0, KO):
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + ks
            kmask = kk < k_hi
            a = tl.load(a_base + ko * sa_ko + kk[None, :] * sa_ki, mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_base + ko * sb_ko + kk[:, None] * sb_ki, mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc += tl.dot(a, b, input_precision=PRECISION)
    cmask = rmask[:, None] & nmask[None, :]
    if SPLIT:
        slot = split.to(tl.int64) * tl.num_programs(1) + pb
        tl.store(WS + (slot * R + rows[:, None]) * N + cols[None, :], acc, mask=cmask)
        return
    if HAS_BIAS:
        acc += tl.load(BIAS + m * sbias_m + j * sbias_j + cols * sbias_n, mask=nmask, other=0.0)[None, :]
    z_ptrs = Z + m * sz_m + j * sz_j + rows[:, None] * sz_r + cols[None, :] * sz_n
    if DACT != 0:
        acc = acc * _dact(tl.load(z_ptrs, mask=cmask, other=0.0), DACT)
    if HAS_RES:
        acc += tl.load(RES + m * sres_m + j * sres_j + rows[:, None] * sres_r + cols[None, :] * sres_n,
                       mask=cmask, other=0.0)
    if ACT != 0:
        if STORE_PRE:
            tl.store(z_ptrs, acc, mask=cmask)
        acc = _act(acc, ACT)
    tl.store(C + m * sc_m + j * sc_j + rows[:, None] * sc_r + cols[None, :] * sc_n, acc, mask=cmask)


@triton.jit
def split_sum_kernel(WS, C, S, R, N, NJ, sc_m, sc_j, sc_r, sc_n,
                     BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """C[m, j] = sum_{s < S} WS[s, m * NJ + j] in the order s = 0, 1, ... (deterministic);
    grid (cdiv(R, BLOCK_R) * cdiv(N, BLOCK_N), M * NJ)."""
    pid = tl.program_id(0)
    pb = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    rows = ((pid // n_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = ((pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cmask = (rows < R)[:, None] & (cols < N)[None, :]
    nb = tl.num_programs(1)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for s in range(0, S):
        slot = s * nb + pb
        acc += tl.load(WS + (slot.to(tl.int64) * R + rows[:, None]) * N + cols[None, :], mask=cmask, other=0.0)
    m = (pb // NJ).to(tl.int64)
    j = (pb % NJ).to(tl.int64)
    tl.store(C + m * sc_m + j * sc_j + rows[:, None] * sc_r + cols[None, :] * sc_n, acc, mask=cmask)


# Split-K for long contractions with few output tiles (weight and bias gradients sum over every
# example): S slices of >= SPLIT_MIN_K each, aiming at SPLIT_TARGET_PROGRAMS programs in all.
SPLIT_MIN_K = 512
SPLIT_TARGET_PROGRAMS = 256


def split_sum(ws, out):
    """out[m, j] = sum_s ws[s, m * J + j] in order s = 0, 1, ...: ws [S, M * J, R, N] contiguous,
    out [M, J, R, N] (any strides)."""
    S, MJ, R, N = ws.shape
    M, J = out.shape[:2]
    if MJ != M * J or tuple(out.shape[2:]) != (R, N) or not ws.is_contiguous():
        raise ValueError(f"split_sum: ws {list(ws.shape)} does not match out {list(out.shape)}")
    BR, BN = pow2(R, 16, 32), pow2(N, 16, 64)
    launch(split_sum_kernel, (triton.cdiv(R, BR) * triton.cdiv(N, BN), M * J),
           dict(WS=ws, C=out, S=S, R=R, N=N, NJ=J, sc_m=out.stride(0), sc_j=out.stride(1), sc_r=out.stride(2),
                sc_n=out.stride(3)),
           dict(BLOCK_R=BR, BLOCK_N=BN), num_warps=4)


def _n_splits(tiles: int, KI: int, KO: int) -> int:
    if KO != 1 or KI < 2 * SPLIT_MIN_K:
        return 1
    return max(1, min(SPLIT_TARGET_PROGRAMS // max(1, tiles), KI // SPLIT_MIN_K))


def _as5(t, name):
    """Accept [M, R, K] (one batch j, KO = 1) or the full [M, J, R, KO, KI]."""
    if t.dim() == 3:
        return t.unsqueeze(1).unsqueeze(3)
    if t.dim() == 5:
        return t
    raise ValueError(f"{name} must be [M, R, K] or [M, J, R, KO, KI], got shape {list(t.shape)}")


def _as4(t, name, lead: int):
    """[M, X, N] -> [M, 1, X, N]; [M, J, X, N] as is (lead = 3 dims for the short form)."""
    if t.dim() == lead:
        return t.unsqueeze(1)
    if t.dim() == lead + 1:
        return t
    raise ValueError(f"{name} has {t.dim()} dimensions, expected {lead} or {lead + 1}: got {list(t.shape)}")


def gemm(a, b, out, bias=None, res=None, act=None, pre_out=None, dact=None, z=None, precision=None):
    """out = act(a @ b + bias (* act'(z)) + res), batched over models (and an optional axis J).

    a [M, R, K] or [M, J, R, KO, KI]; b [M, K, N] or [M, J, KO, KI, N]; out [M, R, N] or
    [M, J, R, N]; bias [M, N] or [M, J, N]; res, z, pre_out like out. Any strides (views,
    transposes, expand). act in (None, "relu", "gelu") with pre_out receiving a @ b + bias;
    dact in (None, "relu", "gelu") multiplies by act'(z) (backward through the activation).
    float32 only. Returns out.
    """
    A, Bw = _as5(a, "a"), None
    if b.dim() == 3:
        Bw = b.unsqueeze(1).unsqueeze(2)
    elif b.dim() == 5:
        Bw = b
    else:
        raise ValueError(f"b must be [M, K, N] or [M, J, KO, KI, N], got shape {list(b.shape)}")
    C = _as4(out, "out", 3)
    M, J, R, KO, KI = A.shape
    N = C.shape[-1]
    for name, t in (("a", A), ("b", Bw), ("out", C)):
        check(name, t, torch.float32)
    if tuple(Bw.shape) != (M, J, KO, KI, N) or tuple(C.shape) != (M, J, R, N):
        raise ValueError(f"gemm shapes disagree: a {list(A.shape)}, b {list(Bw.shape)}, out {list(C.shape)}")
    if (act is not None) + (dact is not None) > 1 or act not in ACTS or dact not in ACTS:
        raise ValueError("gemm: give at most one of act / dact, each None, 'relu' or 'gelu'")
    if act is not None and pre_out is None:
        raise ValueError("gemm: act needs pre_out (the pre-activation is kept for the backward)")
    if dact is not None and z is None:
        raise ValueError("gemm: dact needs z (the saved pre-activation)")
    Bi = _as4(bias, "bias", 2) if bias is not None else None
    Rs = _as4(res, "res", 3) if res is not None else None
    Zs = _as4(pre_out if act is not None else z, "z", 3) if (act or dact) else None
    if Bi is not None and tuple(Bi.shape) != (M, J, N):
        raise ValueError(f"bias must be [M, J, N] = {[M, J, N]}, got {list(Bi.shape)}")
    for name, t in (("res", Rs), ("z", Zs)):
        if t is not None and tuple(t.shape) != (M, J, R, N):
            raise ValueError(f"{name} must have the shape of out {[M, J, R, N]}, got {list(t.shape)}")
    dummy = C
    BR, BN, BK = pow2(R, 16, 32), pow2(N, 16, 64), 16
    tiles = triton.cdiv(R, BR) * triton.cdiv(N, BN)
    epilogue = Bi is not None or Rs is not None or act is not None or dact is not None
    S = 1 if epilogue else _n_splits(tiles * M * J, KI, KO)
    k_split = triton.cdiv(triton.cdiv(KI, S), BK) * BK
    S = triton.cdiv(KI, k_split)
    ws = torch.empty((S, M * J, R, N), dtype=torch.float32, device=C.device) if S > 1 else dummy
    sb = Bi.stride() if Bi is not None else (0, 0, 0)
    sr = Rs.stride() if Rs is not None else (0, 0, 0, 0)
    sz = Zs.stride() if Zs is not None else (0, 0, 0, 0)
    args = dict(A=A, Bw=Bw, C=C, BIAS=Bi if Bi is not None else dummy, RES=Rs if Rs is not None else dummy,
                Z=Zs if Zs is not None else dummy, WS=ws, R=R, N=N, KI=KI, KO=KO, NJ=J, K_SPLIT=k_split,
                sa_m=A.stride(0), sa_j=A.stride(1), sa_r=A.stride(2), sa_ko=A.stride(3), sa_ki=A.stride(4),
                sb_m=Bw.stride(0), sb_j=Bw.stride(1), sb_ko=Bw.stride(2), sb_ki=Bw.stride(3), sb_n=Bw.stride(4),
                sc_m=C.stride(0), sc_j=C.stride(1), sc_r=C.stride(2), sc_n=C.stride(3),
                sbias_m=sb[0], sbias_j=sb[1], sbias_n=sb[2],
                sres_m=sr[0], sres_j=sr[1], sres_r=sr[2], sres_n=sr[3],
                sz_m=sz[0], sz_j=sz[1], sz_r=sz[2], sz_n=sz[3])
    cx = dict(HAS_BIAS=Bi is not None, HAS_RES=Rs is not None, ACT=ACTS[act], STORE_PRE=act is not None,
              DACT=ACTS[dact], SPLIT=S > 1, PRECISION=precision or _common.DOT_PRECISION,
              BLOCK_R=BR, BLOCK_N=BN, BLOCK_K=BK)
    # 32 x 64 x 16 tiles, 8 warps: <= 128 registers and no spills on sm_80 and sm_90 with every
    # epilogue (4 warps, or 64 x 64 tiles, spill a little)
    launch(gemm_kernel, (tiles, M * J, S), args, cx, num_warps=8)
    if S > 1:
        split_sum(ws, C)
    return out


_ONES: dict = {}


def colsum(x, out):
    """out[m, n] = sum_r x[m, r, n] (bias gradients), as the GEMM ones[1, R] @ x so that long sums
    get split-K like the weight gradients. x [M, R, N], out [M, N], any strides. Returns out."""
    check("x", x, torch.float32, dims=3)
    M, R, N = x.shape
    check("out", out, torch.float32, shape=(M, N))
    key = str(x.device)
    if key not in _ONES:
        _ONES[key] = torch.ones(1, dtype=torch.float32, device=x.device)
    ones = _ONES[key].expand(M, 1, R)
    gemm(ones, x, out.unsqueeze(1))
    return out


def mlp_forward(h, W_in, b_in, W_out, b_out, resid, pre, post, out, act):
    """out = resid + act(h W_in + b_in) W_out + b_out over rows; keeps pre = h W_in + b_in and post.

    h, resid, out [M, R, D]; W_in [M, D, F]; b_in [M, F]; W_out [M, F, D]; b_out [M, D];
    pre, post [M, R, F]."""
    gemm(h, W_in, post, bias=b_in, act=act, pre_out=pre)
    gemm(post, W_out, out, bias=b_out, res=resid)
    return out


def mlp_backward(dout, h, pre, post, W_in, W_out, dpre, dh, dW_in, db_in, dW_out, db_out, act, dh_res=None):
    """Backward of mlp_forward's MLP given dout = dLoss/d out [M, R, D]:

        dpre = (dout W_out^T) * act'(pre)     [M, R, F]
        dW_out = post^T dout, db_out = sum_r dout, dW_in = h^T dpre, db_in = sum_r dpre
        dh = dpre W_in^T (+ dh_res, e.g. the residual path's gradient when there is no LayerNorm)
    """
    gemm(dout, W_out.transpose(1, 2), dpre, dact=act, z=pre)
    gemm(post.transpose(1, 2), dout, dW_out)
    colsum(dout, db_out)
    gemm(h.transpose(1, 2), dpre, dW_in)
    colsum(dpre, db_in)
    gemm(dpre, W_in.transpose(1, 2), dh, res=dh_res)
