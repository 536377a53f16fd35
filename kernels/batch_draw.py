"""Minibatches drawn on the device, inside the captured training step: the batch of step s, gathered into
the step's input buffers with its token-scatter index, in one launch (``draw_batch``). No host work, no
host random generator: the batch is a function of (seed, s), and s is the optimizer's own step counter
(a device tensor, checkpointed with the optimizer), so a resumed run draws the same batches.

The draw (grokfast/batches.py ``draw_indices`` computes the same bits with torch; it is the specification):

    h(x)         = lowbias32: x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16
                   (every value a 32-bit unsigned integer, products mod 2^32)
    keys         k_r = h((h(seed ^ h(s ^ 0x9e3779b9)) + r * 0x9e3779b9) mod 2^32),  r = 0 .. ROUNDS - 1
    a Feistel permutation pi of [0, 4^w), 4^w >= n the smallest: x = (L, R) of w bits each,
                   for r: (L, R) <- (R, L ^ (h(R ^ k_r) & (2^w - 1)))
    cycle walking: perm(j) = pi(j), then pi again while the value is >= n: a permutation of [0, n)
    batch        idx[j] = perm(j) for j < batch_size: batch_size distinct examples, a pseudorandom draw
                   without replacement, independent of the other steps' draws.

The kernel also writes the batch's token-scatter index, exactly embed_attn.token_index's (a stable sort
by token at each position): perm_out[t, rank(b)] = b with rank(b) = #{b' : (tok[b', t], b') <
(tok[b, t], b)}, and starts[t, v] = #{b : tok[b, t] < v}. A program computes its block's ranks against
every drawn example, recomputing their draws rather than reading another program's output, so the
programs are independent and run in any order with the same bits. Work: O(batch_size^2 T) comparisons,
fine for minibatches of a few thousand (full-batch training never draws).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check, launch, pow2
from .errors import KernelConfigError

ROUNDS = 6
BLOCK_B = 64        # examples per program (and per block of the rank comparisons)
BLOCK_V = 64        # tokens per block of the starts
MAX_BATCH = 8192    # the rank comparisons grow as batch_size^2: larger batches would want a real sort
NUM_WARPS = 4
M32 = 0xFFFFFFFF


@triton.jit
def _h32(x):
    """lowbias32 on int64 values in [0, 2^32) (products kept to 32 bits by the mask)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _round_key(kseed, r):
    return _h32((kseed + r * 0x9E3779B9) & 0xFFFFFFFF)


@triton.jit
def _feistel(x, kseed, W, ROUNDS: tl.constexpr):
    half = (1 << W) - 1
    L = x >> W
    R = x & half
    for r in tl.static_range(ROUNDS):
        F = _h32(R ^ _round_key(kseed, r)) & half
        nxt = L ^ F
        L = R
        R = nxt
    return (L << W) | R


@triton.jit
def _draw(j, n, kseed, W, ROUNDS: tl.constexpr):
    """perm(j) for int64 j in [0, n): the Feistel permutation, cycle-walked into [0, n)."""
    x = _feistel(j, kseed, W, ROUNDS)
    while tl.max((x >= n).to(tl.int32), axis=0) > 0:
        x = tl.where(x >= n, _feistel(x, kseed, W, ROUNDS), x)
    return x


@triton.jit
def draw_batch_kernel(
    src_tok,        # [n, T] int64 the training split's tokens
    src_lab,        # [n] int64 its labels
    dst_tok,        # [Bs, T] int64 out: the batch's tokens
    dst_lab,        # [Bs] int64 out: its labels
    perm_ptr,       # [T, Bs] int32 out: examples sorted by token at each position (token_index's perm)
    starts_ptr,     # [T, V + 1] int32 out: token_index's starts
    counter_ptr,    # [1+] int64: element 0 is s, the draw's number (the optimizer's steps done)
    n, Bs, T, V,
    seed,           # the run's batch seed, in [0, 2^32)
    W,              # Feistel half width: the smallest w with 4^w >= n
    ROUNDS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Program (t, pb): column t of batch rows pb * BLOCK_B + [0, BLOCK_B) (and their labels when t == 0),
    their ranks among the batch's tokens at position t, and a share of starts[t]; grid (T, cdiv(Bs, BLOCK_B))."""
    t = tl.program_id(0)
    pb = tl.program_id(1)
    s = tl.load(counter_ptr)
    kseed = _h32((seed ^ _h32((s & 0xFFFFFFFF) ^ 0x9E3779B9)) & 0xFFFFFFFF)
    b = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    ok = b < Bs
    idx = _draw(tl.where(ok, b, 0).to(tl.int64), n, kseed, W, ROUNDS)
    tok = tl.load(src_tok + idx * T + t, mask=ok, other=0)
    tl.store(dst_tok + b.to(tl.int64) * T + t, tok, mask=ok)
    if t == 0:
        tl.store(dst_lab + b, tl.load(src_lab + idx, mask=ok, other=0), mask=ok)
    # ranks: the stable sort position of (tok[b], b) among the batch's (tok[b'], b')
    rank = tl.zeros([BLOCK_B], dtype=tl.int32)
    for b0 in range(0, Bs, BLOCK_B):
        bq = b0 + tl.arange(0, BLOCK_B)
        okq = bq < Bs
        iq = _draw(tl.where(okq, bq, 0).to(tl.int64), n, kseed, W, ROUNDS)
        tq = tl.load(src_tok + iq * T + t, mask=okq, other=0)
        before = (tq[None, :] < tok[:, None]) | ((tq[None, :] == tok[:, None]) & (bq[None, :] < b[:, None]))
        rank += tl.sum((before & okq[None, :]).to(tl.int32), axis=1)
    tl.store(perm_ptr + t * Bs + rank, b.to(tl.int32), mask=ok)
    # starts[t, v] = #{b : tok[b, t] < v}: this program's share of the v blocks
    nprog = tl.num_programs(1)
    for v0 in range(pb * BLOCK_V, V + 1, nprog * BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        cnt = tl.zeros([BLOCK_V], dtype=tl.int32)
        for b0 in range(0, Bs, BLOCK_B):
            bq = b0 + tl.arange(0, BLOCK_B)
            okq = bq < Bs
            iq = _draw(tl.where(okq, bq, 0).to(tl.int64), n, kseed, W, ROUNDS)
            tq = tl.load(src_tok + iq * T + t, mask=okq, other=0)
            cnt += tl.sum(((tq[None, :] < v[:, None]) & okq[None, :]).to(tl.int32), axis=1)
        tl.store(starts_ptr + t * (V + 1) + v, cnt, mask=v <= V)


def half_width(n: int) -> int:
    """The Feistel half width w: the smallest w >= 1 with 4^w >= n."""
    w = 1
    while 4 ** w < n:
        w += 1
    return w


def draw_batch(src_tokens, src_labels, tokens_out, labels_out, index_out, counter, seed: int, d_vocab: int) -> None:
    """The batch of draw counter[0] (module docstring) into tokens_out [Bs, T], labels_out [Bs] and its
    token-scatter index index_out = (perm [1, T, Bs] int32, starts [1, T, d_vocab + 1] int32), from the split
    src_tokens [n, T], src_labels [n] (int64, contiguous, one device). One launch, no sync."""
    check("src_tokens", src_tokens, torch.int64, dims=2)
    n, T = src_tokens.shape
    dev = src_tokens.device
    check("src_labels", src_labels, torch.int64, shape=(n,), device=dev)
    check("tokens_out", tokens_out, torch.int64, shape=(None, T), device=dev)
    Bs = tokens_out.shape[0]
    check("labels_out", labels_out, torch.int64, shape=(Bs,), device=dev)
    perm, starts = index_out
    check("perm", perm, torch.int32, shape=(1, T, Bs), device=dev)
    check("starts", starts, torch.int32, shape=(1, T, d_vocab + 1), device=dev)
    check("counter", counter, torch.int64, dims=1, device=dev)
    if not 1 <= Bs <= min(n, MAX_BATCH):
        raise KernelConfigError(f"batch size {Bs}: the device draw takes 1 to min(n = {n}, {MAX_BATCH}) examples")
    if not all(x.is_contiguous() for x in (src_tokens, src_labels, tokens_out, labels_out, perm, starts)):
        raise ValueError("draw_batch: every tensor must be contiguous")
    launch(draw_batch_kernel, (T, triton.cdiv(Bs, BLOCK_B)),
           dict(src_tok=src_tokens, src_lab=src_labels, dst_tok=tokens_out, dst_lab=labels_out, perm_ptr=perm,
                starts_ptr=starts, counter_ptr=counter, n=n, Bs=Bs, T=T, V=int(d_vocab), seed=int(seed) & M32,
                W=half_width(n)),
           dict(ROUNDS=ROUNDS, BLOCK_B=BLOCK_B, BLOCK_V=BLOCK_V), num_warps=NUM_WARPS)


def aot_specs(n: int = 4656, batch_size: int = 512, n_ctx: int = 4, d_vocab: int = 99) -> list[dict]:
    """The draw kernel's compile spec for grokfast.kernels.aot at a split of n examples (default: the power
    preset's 4656, batch 512), specialised as the JIT specialises those values (_common.specialization)."""
    from ._common import record_launches, specialization
    meta = torch.device("meta")
    i64, i32 = torch.int64, torch.int32
    with record_launches() as rec:
        draw_batch(torch.empty((n, n_ctx), dtype=i64, device=meta), torch.empty(n, dtype=i64, device=meta),
                   torch.empty((batch_size, n_ctx), dtype=i64, device=meta), torch.empty(batch_size, dtype=i64, device=meta),
                   (torch.empty((1, n_ctx, batch_size), dtype=i32, device=meta),
                    torch.empty((1, n_ctx, d_vocab + 1), dtype=i32, device=meta)),
                   torch.empty(2, dtype=i64, device=meta), 7919, d_vocab)
    kernel, grid, args, cx, num_warps, num_stages = rec[0]
    return [dict(name=f"draw_batch[n={n},batch={batch_size}]", fn=kernel, num_warps=num_warps, num_stages=num_stages,
                 **specialization(kernel, args, cx))]
