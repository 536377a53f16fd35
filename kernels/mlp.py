"""Dense products: the MLP (and every other matrix product of the model) as one batched GEMM kernel
with fused epilogues; bias gradients (column sums) are the same GEMM with a row of ones, which
the program sums instead of multiplying (A_ONES).

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
(pre, post = act(h W_in + b_in); out = post W_out + b_out + resid_mid) and its backward two
grouped launches ({dpre = (dout W_out^T) * act'(pre), dW_out = post^T dout, db_out}, then
{dW_in = h^T dpre, db_in, dh = dpre W_in^T}).

Grouped launches: problems that do not depend on one another (the backward's dX = dY W^T and
dW = X^T dY, and the bias sums, all read dY) run in one launch of gemm{2,3,4}_kernel (gemm_group.py,
generated from GEMM_ARGS): ``gemm_plan`` checks one problem, ``gemm_launch(*plans)`` runs up to
MAX_GROUP of them per launch, problem g on its own range of programs with its own constexprs (so each
keeps the code it would have alone: the same bits).

Weight gradients contract over the examples. With few output tiles and a long contraction, the
contraction is split into S slices (split-K): each program writes its partial tile to a scratch
buffer and the S partials are added in a fixed order, so the result is deterministic without
atomics (and bit-identical from run to run for the same shapes): right away by split_sum_kernel,
or, with a ``Deferred``, later and for every weight gradient of the pass in the pass's last launch
(flush.flush_kernel, driven by a device table of (buffer address, output address, shape, strides)
rows, which also carries the pass's other put-off work).
Block sizes come from TILES, a table per GPU architecture chosen where the GEMM is planned (gemm_plan,
``tile_arch``): BLOCK_R and BLOCK_N the smallest power of two >= R and N within the table's caps (16 at
least; BLOCK_R 1 for column sums), its BLOCK_K, warps and pipelining stages. Every dot dimension >= 16
(masks pad small operands), float32 accumulators, dots at ``_common.DOT_PRECISION`` ("ieee" by default).
act: 0 none, 1 ReLU, 2 GELU (exact, erf form).
"""
from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _common
from ._common import check, launch, pow2

ACTS = {None: 0, "relu": 1, "gelu": 2}


# ---------------------------------------------------------------------------------------------------
# Tiles per architecture

@dataclass(frozen=True)
class Tiles:
    """The tile shape of the float32 GEMMs on one architecture and precision class: caps on BLOCK_R and
    BLOCK_N (each problem takes the smallest power of two >= its size, 16 at least, up to the cap), BLOCK_K,
    warps for a problem launched alone, for a grouped launch, and for a group with an activation epilogue
    (the GELU backward holds more live values), and num_stages (None: Triton's default)."""
    r: int
    n: int
    k: int
    warps: int
    group_warps: int
    act_warps: int
    stages: int | None = None


# "default": the interpreter, the CPU and unknown GPUs; the tiles every CPU test runs. sm_80: the same
# 32 x 64 x 16 (whatever compiles with no spill on sm_80 and sm_90 at the presets' shapes: 8 warps alone or
# with an activation; grouped at 8 warps they spilled 16-20 bytes). sm_90, IEEE float32 (CUDA-core FMAs):
# 64 x 64 x 32 tiles read each shared-memory operand half as often per multiply-add as 32 x 64 x 16 (the
# sm_90 SASS of the small tiles loads shared memory about once per FMA); the registers allow it (python -m
# grokfast.aot shows no spill). TF32 modes ("tf32"): 32 x 32 tiles everywhere (3xTF32 holds split operands;
# 32 x 64 spilled 12 bytes on sm_90 with Triton 3.6). None of these is timed yet: no GPU session so far.
TILES = {
    "default": {"ieee": Tiles(32, 64, 16, 8, 4, 8), "tf32": Tiles(32, 32, 16, 8, 4, 8)},
    "sm_80": {"ieee": Tiles(32, 64, 16, 8, 4, 8), "tf32": Tiles(32, 32, 16, 8, 4, 8)},
    "sm_90": {"ieee": Tiles(64, 64, 32, 8, 8, 4, 2), "tf32": Tiles(32, 32, 16, 8, 4, 8)},
}
TILE_ARCH = os.environ.get("GROKFAST_TILE_ARCH")     # force one table (tests: the sm_90 tiles under the interpreter)
if TILE_ARCH is not None and TILE_ARCH not in TILES:
    raise ValueError(f"GROKFAST_TILE_ARCH must be one of {', '.join(TILES)}, got {TILE_ARCH!r}")


@contextlib.contextmanager
def tile_table(arch: str | None):
    """Inside the block, GEMMs are planned with TILES[arch] whatever the device (AOT compiling for an
    architecture on meta tensors; tests of other architectures' summation orders). None: no override."""
    global TILE_ARCH
    if arch is not None and arch not in TILES:
        raise ValueError(f"arch must be one of {', '.join(TILES)}, got {arch!r}")
    prev, TILE_ARCH = TILE_ARCH, arch if arch is not None else TILE_ARCH
    try:
        yield
    finally:
        TILE_ARCH = prev


_CAPABILITY: dict = {}


def tile_arch(device) -> str:
    """The TILES key for GEMMs on ``device``: the override (tile_table, GROKFAST_TILE_ARCH), else "sm_90"
    or "sm_80" for a CUDA device of compute capability 9.x or 8.x, else "default"."""
    if TILE_ARCH is not None:
        return TILE_ARCH
    device = torch.device(device)
    if device.type != "cuda":
        return "default"
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)[0]
    return {9: "sm_90", 8: "sm_80"}.get(_CAPABILITY[idx], "default")


def tiles_for(device, precision: str) -> Tiles:
    return TILES[tile_arch(device)]["ieee" if precision == "ieee" else "tf32"]


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


# The GEMM's runtime arguments, in order, for one problem (the group kernels repeat them with a suffix).
GEMM_ARGS = ("A", "Bw", "C", "BIAS", "RES", "Z", "WS", "R", "N", "KI", "KO", "NJ", "MJ", "K_SPLIT",
             "sa_m", "sa_j", "sa_r", "sa_ko", "sa_ki", "sb_m", "sb_j", "sb_ko", "sb_ki", "sb_n",
             "sc_m", "sc_j", "sc_r", "sc_n", "sbias_m", "sbias_j", "sbias_n",
             "sres_m", "sres_j", "sres_r", "sres_n", "sz_m", "sz_j", "sz_r", "sz_n",
             "A2", "A_DIV", "sa2_m", "sa2_r", "AOUT", "sao_m", "sao_r")
GEMM_CONSTEXPRS = ("HAS_BIAS", "HAS_RES", "ACT", "STORE_PRE", "DACT", "SPLIT", "PRECISION", "A_ONES", "A_SUM",
                   "BLOCK_R", "BLOCK_N", "BLOCK_K")


@triton.jit
def _gemm_program(
    pid,
    A, Bw, C, BIAS, RES, Z, WS,
    R, N, KI, KO, NJ, MJ, K_SPLIT,
    sa_m, sa_j, sa_r, sa_ko, sa_ki,
    sb_m, sb_j, sb_ko, sb_ki, sb_n,
    sc_m, sc_j, sc_r, sc_n,
    sbias_m, sbias_j, sbias_n,
    sres_m, sres_j, sres_r, sres_n,
    sz_m, sz_j, sz_r, sz_n,
    A2, A_DIV, sa2_m, sa2_r, AOUT, sao_m, sao_r,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, STORE_PRE: tl.constexpr,
    DACT: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, A_ONES: tl.constexpr, A_SUM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program ``pid`` of one GEMM problem: pid = (split * MJ + pb) * n_tiles + tile, tile = one
    [BLOCK_R, BLOCK_N] tile of C for batch pb = m * NJ + j (MJ = M * NJ batches), contraction slice
    ki in [split * K_SPLIT, (split + 1) * K_SPLIT). SPLIT: write the raw partial sum to
    WS[split, pb] ([S, MJ, R, N] contiguous) for a fixed-order reduction (no epilogue); otherwise
    S = 1 and the epilogue of the module docstring. A_ONES: A is a row of ones (R = 1, BLOCK_R = 1; column
    sums of Bw, the bias gradients): sums instead of a dot on a 16-row tile with one real row. A_SUM (KO = 1,
    no split): row r of A is A[m, r % A_DIV] + A2[m, r // A_DIV] (the embedding table X0[t * V + v] =
    W_E[v] + W_pos[t] formed in the operand load), which the programs of batch j = 0 and column tile 0
    also write to AOUT[m, r] (strides sao_*; every k), for the pass's later readers of X0."""
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    n_tiles = tl.cdiv(R, BLOCK_R) * n_tiles_n
    tile = pid % n_tiles
    rest = pid // n_tiles
    pb = rest % MJ
    split = rest // MJ
    pid_r = tile // n_tiles_n
    pid_n = tile % n_tiles_n
    m = (pb // NJ).to(tl.int64)
    j = (pb % NJ).to(tl.int64)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    rmask = rows < R
    nmask = cols < N
    if A_SUM:
        a_base = A + m * sa_m + j * sa_j + (rows % A_DIV)[:, None] * sa_r
        a2_base = A2 + m * sa2_m + (rows // A_DIV)[:, None] * sa2_r
        keep = (j == 0) & (pid_n == 0)
    else:
        a_base = A + m * sa_m + j * sa_j + rows[:, None] * sa_r
    b_base = Bw + m * sb_m + j * sb_j + cols[None, :] * sb_n
    k_lo = split * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, KI)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for ko in range(0, KO):
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + ks
            kmask = kk < k_hi
            if A_ONES:
                b = tl.load(b_base + ko * sb_ko + kk[:, None] * sb_ki, mask=kmask[:, None] & nmask[None, :],
                            other=0.0)
                acc += tl.sum(b, axis=0)[None, :]
            else:
                a = tl.load(a_base + ko * sa_ko + kk[None, :] * sa_ki, mask=rmask[:, None] & kmask[None, :],
                            other=0.0)
                if A_SUM:
                    a += tl.load(a2_base + kk[None, :] * sa_ki, mask=rmask[:, None] & kmask[None, :], other=0.0)
                    if keep:
                        tl.store(AOUT + m * sao_m + rows[:, None] * sao_r + kk[None, :], a,
                                 mask=rmask[:, None] & kmask[None, :])
                b = tl.load(b_base + ko * sb_ko + kk[:, None] * sb_ki, mask=kmask[:, None] & nmask[None, :],
                            other=0.0)
                acc += tl.dot(a, b, input_precision=PRECISION)
    cmask = rmask[:, None] & nmask[None, :]
    if SPLIT:
        slot = split.to(tl.int64) * MJ + pb
        tl.store(WS + (slot * R + rows[:, None]) * N + cols[None, :], acc, mask=cmask)
    else:
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
def gemm_kernel(
    A, Bw, C, BIAS, RES, Z, WS,
    R, N, KI, KO, NJ, MJ, K_SPLIT,
    sa_m, sa_j, sa_r, sa_ko, sa_ki,
    sb_m, sb_j, sb_ko, sb_ki, sb_n,
    sc_m, sc_j, sc_r, sc_n,
    sbias_m, sbias_j, sbias_n,
    sres_m, sres_j, sres_r, sres_n,
    sz_m, sz_j, sz_r, sz_n,
    A2, A_DIV, sa2_m, sa2_r, AOUT, sao_m, sao_r,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, STORE_PRE: tl.constexpr,
    DACT: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, A_ONES: tl.constexpr, A_SUM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One GEMM problem (_gemm_program); grid (n_tiles * MJ * S,)."""
    _gemm_program(
        tl.program_id(0), A, Bw, C, BIAS, RES, Z, WS, R, N, KI, KO, NJ, MJ, K_SPLIT,
        sa_m, sa_j, sa_r, sa_ko, sa_ki, sb_m, sb_j, sb_ko, sb_ki, sb_n, sc_m, sc_j, sc_r, sc_n,
        sbias_m, sbias_j, sbias_n, sres_m, sres_j, sres_r, sres_n, sz_m, sz_j, sz_r, sz_n,
        A2, A_DIV, sa2_m, sa2_r, AOUT, sao_m, sao_r,
        HAS_BIAS, HAS_RES, ACT, STORE_PRE, DACT, SPLIT, PRECISION, A_ONES, A_SUM, BLOCK_R, BLOCK_N, BLOCK_K)


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


@triton.jit
def _split_sum_segment(row, local, BLOCK: tl.constexpr):
    """Program ``local`` of one deferred split-K sum (a task of flush.flush_kernel), described by the table
    row ``row`` (int64: ws address, out address, S, MJ, R, N, NJ, sc_m, sc_j, sc_r, sc_n): ws holds
    [S, MJ, R, N] contiguous partials; out[m, j, r, n] (strides sc_*) = sum_{s < S} ws[s, m * NJ + j, r, n]
    in the order s = 0, 1, ... (the float operations of split_sum_kernel, so its bits). A task has
    MJ * cdiv(R * N, BLOCK) programs."""
    ws = tl.load(row + 0).to(tl.pointer_type(tl.float32))
    out = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    S = tl.load(row + 2)
    MJ = tl.load(row + 3)
    R = tl.load(row + 4)
    N = tl.load(row + 5)
    NJ = tl.load(row + 6)
    RN = R * N
    per_slab = (RN + BLOCK - 1) // BLOCK
    pb = local // per_slab
    idx = (local % per_slab) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < RN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(ws + (s * MJ + pb) * RN + idx, mask=mask, other=0.0)
    r = idx // N
    n = idx % N
    m = pb // NJ
    j = pb % NJ
    dst = m * tl.load(row + 7) + j * tl.load(row + 8) + r * tl.load(row + 9) + n * tl.load(row + 10)
    tl.store(out + dst, acc, mask=mask)


class Deferred:
    """Work put off to the end of a pass and done in one launch (flush.flush_kernel): split-K reductions,
    and tasks of the other kinds flush_kernel knows (``add_task``: the loss mean, the embedding
    gradients, the optimizer's scalars).

    The weight and bias gradients of the backward are outputs only: nothing in the pass reads them,
    so their partial sums can wait. ``gemm(..., defer=d)`` writes its partials into a buffer that ``d``
    keeps: the i-th buffer handed out in a pass (``buffer`` counts the requests themselves, not the
    reductions already pending, so the plans of one grouped launch get distinct buffers) is the same
    tensor in every pass, so addresses are stable and the descriptor table is built once: a CUDA
    graph captured after a first eager pass replays it. ``d.start()`` opens a pass, ``d.flush()``
    reduces every pending one. Without splits, flush launches nothing.

    A captured graph keeps reading the buffers and the table it was captured with: its owner holds
    ``d.held()`` so that neither is freed while the graph lives, whatever later passes with other
    shapes or precisions do to this object. ``tables_built`` counts descriptor tables made (each a
    host-to-device copy): it stays constant over the passes of one shape."""

    SEG_FIELDS = 13
    BLOCK = 1024
    TABLE_CACHE = 8

    def __init__(self):
        self._bufs: list[torch.Tensor] = []
        self._next = 0                 # index of the next buffer handed out in this pass
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._tables: OrderedDict = OrderedDict()
        self.tables_built = 0
        self.last_table = None         # (table, program map) of the last flush

    def start(self) -> None:
        """Open a pass: forget what an interrupted pass left pending; buffers are handed out from the first."""
        self._next = 0
        self._pending = []

    def buffer(self, shape, device) -> torch.Tensor:
        device = torch.device(device)
        i = self._next
        self._next += 1
        if i < len(self._bufs) and tuple(self._bufs[i].shape) == tuple(shape) and self._bufs[i].device == device:
            return self._bufs[i]
        buf = torch.empty(shape, dtype=torch.float32, device=device)
        if i < len(self._bufs):
            self._bufs[i] = buf
        else:
            self._bufs.append(buf)
        return buf

    def add(self, ws: torch.Tensor, out4: torch.Tensor) -> None:
        """A split-K reduction: out4[m, j] = sum_s ws[s, m * J + j] (ws [S, M * J, R, N] contiguous)."""
        S, MJ, R, N = ws.shape
        self._pending.append((0, [ws, out4, S, MJ, R, N, out4.shape[1], *out4.stride()],
                              MJ * triton.cdiv(R * N, self.BLOCK)))

    def add_task(self, kind: int, fields: list, n_programs: int) -> None:
        """A task of flush_kernel's ``kind`` with up to 11 fields (ints, or tensors for their addresses) on
        ``n_programs`` programs."""
        if len(fields) > 11 or n_programs < 1:
            raise ValueError(f"a flush task has at most 11 fields and >= 1 program, got {len(fields)}, {n_programs}")
        self._pending.append((kind, list(fields), n_programs))

    def held(self) -> tuple:
        """What a replay of the last pass reads besides its inputs and outputs: the split buffers and the
        descriptor table."""
        return tuple(self._bufs), self.last_table

    def _table(self, device):
        meta = device.type == "meta"
        rows, prog, first = [], [], 0
        for seg, (kind, fields, n) in enumerate(self._pending):
            vals = [(0 if meta else f.data_ptr()) if isinstance(f, torch.Tensor) else int(f) for f in fields]
            rows.append(vals + [0] * (11 - len(vals)) + [first, kind])
            prog += [seg] * n
            first += n
        key = (str(device),) + tuple(map(tuple, rows))
        hit = self._tables.get(key)
        if hit is None:
            if meta:
                hit = (torch.empty((len(rows), self.SEG_FIELDS), dtype=torch.int64, device=device),
                       torch.empty((first,), dtype=torch.int32, device=device))
            else:
                hit = (torch.tensor(rows, dtype=torch.int64).to(device),
                       torch.tensor(prog, dtype=torch.int32).to(device))
            self.tables_built += 1
            # evicting is safe: a graph that replays an evicted table holds it (held())
            while len(self._tables) >= self.TABLE_CACHE:
                self._tables.popitem(last=False)
            self._tables[key] = hit
        else:
            self._tables.move_to_end(key)
        return hit, first

    def flush(self) -> None:
        from . import flush, optimizer
        self._next = 0
        if not self._pending:
            return
        device = next(f for _, fields, _ in self._pending for f in fields if isinstance(f, torch.Tensor)).device
        (tab, prog), n = self._table(device)
        self.last_table = (tab, prog)
        launch(flush.flush_kernel, (n,), dict(TAB=tab, PROG=prog),
               dict(BLOCK=self.BLOCK, SCALARS=optimizer.SCALARS, BLOCK_M=optimizer.BLOCK_M), num_warps=4)
        self._pending = []


# Split-K for long contractions with few output tiles (weight and bias gradients sum over every
# example): S slices of >= SPLIT_MIN_K each, aiming at SPLIT_TARGET_PROGRAMS programs in all.
# GROKFAST_SPLIT_MIN_K (or ``split_thresholds``) lowers the threshold so that the tiny shapes of the
# interpreter tests take the split paths the presets' real shapes take.
SPLIT_MIN_K = int(os.environ.get("GROKFAST_SPLIT_MIN_K", "512"))
SPLIT_TARGET_PROGRAMS = 256
if SPLIT_MIN_K < 16 or SPLIT_MIN_K % 16:
    raise ValueError(f"GROKFAST_SPLIT_MIN_K must be a multiple of 16 (BLOCK_K), got {SPLIT_MIN_K}")


@contextlib.contextmanager
def split_thresholds(min_k: int = 16, target_programs: int = SPLIT_TARGET_PROGRAMS):
    """Inside the block, contractions of >= 2 min_k split into slices of >= min_k (a multiple of 16).
    Read when a launch is planned: the same workspace then holds other split buffers."""
    global SPLIT_MIN_K, SPLIT_TARGET_PROGRAMS
    if min_k < 16 or min_k % 16:
        raise ValueError(f"min_k must be a positive multiple of 16, got {min_k}")
    prev = SPLIT_MIN_K, SPLIT_TARGET_PROGRAMS
    SPLIT_MIN_K, SPLIT_TARGET_PROGRAMS = int(min_k), int(target_programs)
    try:
        yield
    finally:
        SPLIT_MIN_K, SPLIT_TARGET_PROGRAMS = prev


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


class GemmPlan:
    """One GEMM problem ready to launch: its runtime arguments and constexprs (GEMM_ARGS and
    GEMM_CONSTEXPRS), its number of programs, and what to do with split-K partials afterwards."""

    def __init__(self, args, cx, n_programs, ws, out4, defer, tiles: Tiles = TILES["default"]["ieee"]):
        self.args, self.cx, self.n_programs, self.tiles = args, cx, n_programs, tiles
        self.k_steps = args["KO"] * triton.cdiv(min(args["K_SPLIT"], args["KI"]), cx["BLOCK_K"])   # per program
        self._ws, self._out4, self._defer = ws, out4, defer

    def finish(self) -> None:
        if not self.cx["SPLIT"]:
            return
        if self._defer is not None:
            self._defer.add(self._ws, self._out4)
        else:
            split_sum(self._ws, self._out4)


def gemm_plan(a, b, out, bias=None, res=None, act=None, pre_out=None, dact=None, z=None, precision=None,
              defer: Deferred | None = None, ones: bool = False, embed=None) -> GemmPlan:
    """The arguments of ``gemm`` checked and turned into a GemmPlan (nothing is launched): run it with
    ``gemm_launch(plan, ...)``, alone or grouped with independent problems. ones: a is a [M, 1, K] row of
    ones (colsum_plan): the program sums b's columns instead of multiplying (A_ONES). embed: (W_E [M, V, K],
    W_pos [M, T, K]) when a is [M, J, T * V, 1, K] views of the embedding table X0 (any J, stride 0 across
    J, unit stride along K): the operand load forms X0[t * V + v] = W_E[v] + W_pos[t] and writes it into
    a's storage (A_SUM), so X0 needs no launch of its own."""
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
    prec = precision or _common.DOT_PRECISION
    tl_ = tiles_for(C.device, prec)            # this architecture's tiles (TILES)
    BR, BN, BK = pow2(R, 16, tl_.r), pow2(N, 16, tl_.n), tl_.k
    if ones:
        if R != 1 or KO != 1:
            raise ValueError("gemm: ones=True needs a [M, 1, K] row of ones")
        BR = 1
    if embed is not None:
        W_E, W_pos = embed
        V, T = W_E.shape[1], W_pos.shape[1]
        if (KO != 1 or R != T * V or tuple(W_E.shape) != (M, V, KI) or tuple(W_pos.shape) != (M, T, KI)
                or A.stride(4) != 1 or W_E.stride(2) != 1 or W_pos.stride(2) != 1 or A.stride(1) != 0):
            raise ValueError("gemm: embed needs a [M, J, T * V, 1, K] view of X0 (stride 0 across J, unit along K) "
                             "and W_E [M, V, K], W_pos [M, T, K] unit-stride along K")
    tiles = triton.cdiv(R, BR) * triton.cdiv(N, BN)
    epilogue = Bi is not None or Rs is not None or act is not None or dact is not None
    S = 1 if epilogue or embed is not None else _n_splits(tiles * M * J, KI, KO)
    k_split = triton.cdiv(triton.cdiv(KI, S), BK) * BK
    S = triton.cdiv(KI, k_split)
    if S == 1:
        ws = dummy
    elif defer is not None:
        ws = defer.buffer((S, M * J, R, N), C.device)
    else:
        ws = torch.empty((S, M * J, R, N), dtype=torch.float32, device=C.device)
    sb = Bi.stride() if Bi is not None else (0, 0, 0)
    sr = Rs.stride() if Rs is not None else (0, 0, 0, 0)
    sz = Zs.stride() if Zs is not None else (0, 0, 0, 0)
    args = dict(A=A, Bw=Bw, C=C, BIAS=Bi if Bi is not None else dummy, RES=Rs if Rs is not None else dummy,
                Z=Zs if Zs is not None else dummy, WS=ws, R=R, N=N, KI=KI, KO=KO, NJ=J, MJ=M * J,
                K_SPLIT=k_split,
                sa_m=A.stride(0), sa_j=A.stride(1), sa_r=A.stride(2), sa_ko=A.stride(3), sa_ki=A.stride(4),
                sb_m=Bw.stride(0), sb_j=Bw.stride(1), sb_ko=Bw.stride(2), sb_ki=Bw.stride(3), sb_n=Bw.stride(4),
                sc_m=C.stride(0), sc_j=C.stride(1), sc_r=C.stride(2), sc_n=C.stride(3),
                sbias_m=sb[0], sbias_j=sb[1], sbias_n=sb[2],
                sres_m=sr[0], sres_j=sr[1], sres_r=sr[2], sres_n=sr[3],
                sz_m=sz[0], sz_j=sz[1], sz_r=sz[2], sz_n=sz[3],
                A2=dummy, A_DIV=1, sa2_m=0, sa2_r=0, AOUT=dummy, sao_m=0, sao_r=0)
    if embed is not None:
        args.update(A=W_E, sa_m=W_E.stride(0), sa_j=0, sa_r=W_E.stride(1), A2=W_pos, A_DIV=V,
                    sa2_m=W_pos.stride(0), sa2_r=W_pos.stride(1), AOUT=A, sao_m=A.stride(0), sao_r=A.stride(2))
    cx = dict(HAS_BIAS=Bi is not None, HAS_RES=Rs is not None, ACT=ACTS[act], STORE_PRE=act is not None,
              DACT=ACTS[dact], SPLIT=S > 1, PRECISION=prec, A_ONES=bool(ones), A_SUM=embed is not None,
              BLOCK_R=BR, BLOCK_N=BN, BLOCK_K=BK)
    return GemmPlan(args, cx, tiles * M * J * S, ws, C, defer, tl_)


def dot_flops(args: dict, cx: dict, suffix: str = "") -> tuple[int, int]:
    """(executed, useful) tl.dot FLOPs of one GEMM problem of a launch (its runtime arguments and
    constexprs as recorded, names suffixed as in gemm_group for problem g of a grouped launch): executed
    counts every program's dots on its padded [BLOCK_R, BLOCK_K] x [BLOCK_K, BLOCK_N] tiles (2 per
    multiply-add), useful the 2 R N KI KO per batch the math needs."""
    if cx["A_ONES" + suffix]:
        return 0, 0                      # column sums: additions, no dot
    a = {k: args[k + suffix] for k in ("R", "N", "KI", "KO", "MJ", "K_SPLIT")}
    BR, BN, BK = (cx[k + suffix] for k in ("BLOCK_R", "BLOCK_N", "BLOCK_K"))
    R, N, KI, KO, MJ, KS = a["R"], a["N"], a["KI"], a["KO"], a["MJ"], a["K_SPLIT"]
    S = triton.cdiv(KI, KS)
    k_steps = (S - 1) * triton.cdiv(KS, BK) + triton.cdiv(KI - (S - 1) * KS, BK)
    tiles = triton.cdiv(R, BR) * triton.cdiv(N, BN)
    return 2 * BR * BN * BK * tiles * MJ * KO * k_steps, 2 * R * N * KI * KO * MJ


# Problems per grouped launch (gemm_group.py has a kernel for each count up to 4). GROKFAST_GEMM_GROUP=1
# launches every problem alone (for benchmarking the grouping: grouped kernels hold more registers).
MAX_GROUP = int(os.environ.get("GROKFAST_GEMM_GROUP", "4"))
if MAX_GROUP not in (1, 2, 3, 4):
    raise ValueError(f"GROKFAST_GEMM_GROUP must be 1 to 4, got {MAX_GROUP}")


def gemm_launch(*plans: GemmPlan) -> None:
    """Run GEMM problems that do not depend on one another (none reads what another writes) in as
    few launches as possible: up to MAX_GROUP per launch, the programs of problem i after those of
    problems 0..i-1 (gemm_group.py). Each problem gives the same result as launched alone."""
    from . import gemm_group
    plans = [p for p in plans if p.n_programs > 0]
    for i in range(0, len(plans), MAX_GROUP):
        # the problems whose programs run longest (most contraction steps) first, so they do not form a tail
        group = sorted(plans[i:i + MAX_GROUP], key=lambda p: -p.k_steps)
        if len(group) == 1:
            kernel, args, cx = gemm_kernel, dict(group[0].args), dict(group[0].cx)
        else:
            kernel, args, cx = gemm_group.KERNELS[len(group)], {}, {}
            for g, p in enumerate(group):
                args.update({f"{k}{g}": v for k, v in p.args.items()})
                cx.update({f"{k}{g}": v for k, v in p.cx.items()})
            first = 0
            for g, p in enumerate(group[:-1]):
                first += p.n_programs
                args[f"NP{g}"] = first
        # warps and stages from the tile table (one architecture's: every plan of a pass has the same); the
        # most any problem of the group asks for
        act = any(p.cx["ACT"] or p.cx["DACT"] for p in group)
        warps = max(p.tiles.warps if len(group) == 1 else p.tiles.act_warps if act else p.tiles.group_warps
                    for p in group)
        stages = max((p.tiles.stages for p in group if p.tiles.stages is not None), default=None)
        launch(kernel, (sum(p.n_programs for p in group),), args, cx, num_warps=warps, num_stages=stages)
        for p in group:
            p.finish()


def gemm(a, b, out, bias=None, res=None, act=None, pre_out=None, dact=None, z=None, precision=None,
         defer: Deferred | None = None, embed=None):
    """out = act(a @ b + bias (* act'(z)) + res), batched over models (and an optional axis J).

    a [M, R, K] or [M, J, R, KO, KI]; b [M, K, N] or [M, J, KO, KI, N]; out [M, R, N] or
    [M, J, R, N]; bias [M, N] or [M, J, N]; res, z, pre_out like out. Any strides (views,
    transposes, expand). act in (None, "relu", "gelu") with pre_out receiving a @ b + bias;
    dact in (None, "relu", "gelu") multiplies by act'(z) (backward through the activation).
    float32 only. Returns out. defer: a Deferred that receives the split-K partials (when the
    contraction is split) so that out is complete only after ``defer.flush()``. embed: see gemm_plan.
    """
    gemm_launch(gemm_plan(a, b, out, bias=bias, res=res, act=act, pre_out=pre_out, dact=dact, z=z,
                          precision=precision, defer=defer, embed=embed))
    return out


def group_kernels_source(max_group: int = 4) -> str:
    """The text of kernels/gemm_group.py: for n = 2..max_group, gemm{n}_kernel runs n GEMM problems
    in one launch (the arguments of each suffixed with its index; NP0 < NP1 < ... the first program
    of each next problem). Generated because a Triton kernel's parameters must be spelled out;
    tests/test_kernels_model.py checks the file is up to date."""
    def params(g):
        return ", ".join(f"{a}{g}" for a in GEMM_ARGS) + ",\n        " + ", ".join(
            f"{c}{g}: tl.constexpr" for c in GEMM_CONSTEXPRS)

    def call(g, pid):
        return (f"_gemm_program(\n            {pid}, "
                + ", ".join(f"{a}{g}" for a in GEMM_ARGS) + ",\n            "
                + ", ".join(f"{c}{g}" for c in GEMM_CONSTEXPRS) + ")")

    out = ['"""Grouped GEMM kernels: several independent problems of kernels/mlp.py in one launch.',
           "",
           "GENERATED by kernels.mlp.group_kernels_source(); do not edit (regenerate with",
           "python -c \"from grokfast.kernels import mlp; open('kernels/gemm_group.py', 'w').write(mlp.group_kernels_source())\").",
           '"""',
           "import triton",
           "import triton.language as tl",
           "",
           "from .mlp import _gemm_program",
           ""]
    for n in range(2, max_group + 1):
        out += ["", "", "@triton.jit", f"def gemm{n}_kernel("]
        for g in range(n):
            out.append(f"        {params(g)},")
        out.append("        " + ", ".join(f"NP{g}" for g in range(n - 1)) + ",")
        out.append("):")
        out.append(f'    """{n} GEMM problems; problem g has programs [NP(g-1), NP(g)) (NP(-1) = 0);'
                   ' grid (total programs,)."""')
        out.append("    pid = tl.program_id(0)")
        for g in range(n):
            kw = "if" if g == 0 else ("elif" if g < n - 1 else "else")
            cond = f" pid < NP{g}" if g < n - 1 else ""
            base = "pid" if g == 0 else f"pid - NP{g - 1}"
            out.append(f"    {kw}{cond}:")
            out.append(f"        {call(g, base)}")
    out += ["", "", "KERNELS = {" + ", ".join(f"{n}: gemm{n}_kernel" for n in range(2, max_group + 1)) + "}", ""]
    return "\n".join(out)


_ONES: dict = {}


def colsum_plan(x, out, defer: Deferred | None = None) -> GemmPlan:
    """out[m, n] = sum_r x[m, r, n] (bias gradients) as the GemmPlan of ones[1, R] @ x, so that long
    sums get split-K like the weight gradients. x [M, R, N], out [M, N], any strides."""
    check("x", x, torch.float32, dims=3)
    M, R, N = x.shape
    check("out", out, torch.float32, shape=(M, N))
    key = str(x.device)
    if key not in _ONES:
        _ONES[key] = torch.ones(1, dtype=torch.float32, device=x.device)
    ones = _ONES[key].expand(M, 1, R)
    return gemm_plan(ones, x, out.unsqueeze(1), defer=defer, ones=True)


def colsum(x, out, defer: Deferred | None = None):
    """colsum_plan launched alone. Returns out."""
    gemm_launch(colsum_plan(x, out, defer))
    return out


def mlp_forward(h, W_in, b_in, W_out, b_out, resid, pre, post, out, act):
    """out = resid + act(h W_in + b_in) W_out + b_out over rows; keeps pre = h W_in + b_in and post.

    h, resid, out [M, R, D]; W_in [M, D, F]; b_in [M, F]; W_out [M, F, D]; b_out [M, D];
    pre, post [M, R, F]."""
    gemm(h, W_in, post, bias=b_in, act=act, pre_out=pre)
    gemm(post, W_out, out, bias=b_out, res=resid)
    return out


def launch_filled(spare: list | None, *plans: GemmPlan) -> None:
    """gemm_launch(*plans), the free slots of its last group filled from ``spare`` (weight-gradient products
    that nothing in the pass reads before its end, so they may run in any later launch); spare shrinks."""
    plans = list(plans)
    while spare and len(plans) % MAX_GROUP:
        plans.append(spare.pop(0))
    gemm_launch(*plans)


def mlp_backward(dout, h, pre, post, W_in, W_out, dpre, dh, dW_in, db_in, dW_out, db_out, act, dh_res=None,
                 defer: Deferred | None = None, spare: list | None = None):
    """Backward of mlp_forward's MLP given dout = dLoss/d out [M, R, D]:

        dpre = (dout W_out^T) * act'(pre)     [M, R, F]
        dW_out = post^T dout, db_out = sum_r dout, dW_in = h^T dpre, db_in = sum_r dpre
        dh = dpre W_in^T (+ dh_res, e.g. the residual path's gradient when there is no LayerNorm)
    Two grouped launches: {dpre, dW_out, db_out}, then {dW_in, db_in, dh}, their free slots filled from
    ``spare`` (launch_filled). The four weight and bias gradients are complete after ``defer.flush()`` when
    defer is given.
    """
    launch_filled(spare, gemm_plan(dout, W_out.transpose(1, 2), dpre, dact=act, z=pre),
                  gemm_plan(post.transpose(1, 2), dout, dW_out, defer=defer),
                  colsum_plan(dout, db_out, defer=defer))
    launch_filled(spare, gemm_plan(h.transpose(1, 2), dpre, dW_in, defer=defer),
                  colsum_plan(dpre, db_in, defer=defer),
                  gemm_plan(dpre, W_in.transpose(1, 2), dh, res=dh_res))
