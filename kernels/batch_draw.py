"""Minibatches on the device, inside the captured training step: the batch of step s, gathered into the
step's input buffers with its token-scatter index, in one launch. s is the optimizer's own step counter (a
device tensor, checkpointed with the optimizer), so a resumed run gathers the same batches.

- minibatches "draw" (``draw_batch``): no host work, no host random generator: the batch is a function of
  (seed, s), below.
- minibatches "epoch" (``gather_epoch_batch``): the epochs' orders are torch's CPU permutations, drawn on the
  host as ever (grokfast/batches.py), but E epochs at a time: ``EpochRing`` keeps them in a device ring of 2E
  rows, one copy every E epochs, and the launch reads batch k = s mod K of epoch e = s // K from row e mod 2E.
  The short last batch of an epoch is a launch (and a captured graph) of its own size.

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
fine for minibatches of a few thousand (full-batch training never draws). The epoch gather is the same kernel
with the examples read from the ring (FROM_RING) instead of drawn.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check, launch
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
def _draw(j, n, kseed, W, ROUNDS: tl.constexpr):
    """perm(j) for int64 j in [0, n): the Feistel permutation pi, applied to every lane once and then again to
    the lanes still >= n (cycle walking), written once: the loop is the walk, its body the one copy of pi."""
    half = (1 << W) - 1
    x = j
    walk = j >= 0
    while tl.max(walk.to(tl.int32), axis=0) > 0:
        L = x >> W
        R = x & half
        for r in tl.static_range(ROUNDS):
            F = _h32(R ^ _h32((kseed + r * 0x9E3779B9) & 0xFFFFFFFF)) & half
            nxt = L ^ F
            L = R
            R = nxt
        x = tl.where(walk, (L << W) | R, x)
        walk = x >= n
    return x


@triton.jit
def _examples(b, ok, n, kseed, W, ring_ptr, start, stop, ROUNDS: tl.constexpr, FROM_RING: tl.constexpr):
    """The examples (int64) of batch rows b (lanes with ok false read example 0): the ring's entries start + b
    (below stop: never past the epoch's row), or the draw's perm(b)."""
    j = tl.where(ok, b, 0).to(tl.int64)
    if FROM_RING:
        return tl.load(ring_ptr + start + j, mask=start + j < stop, other=0).to(tl.int64)
    else:
        return _draw(j, n, kseed, W, ROUNDS)


@triton.jit
def batch_kernel(
    src_tok,        # [n, T] int64 the training split's tokens
    src_lab,        # [n] int64 its labels
    dst_tok,        # [Bs, T] int64 out: the batch's tokens
    dst_lab,        # [Bs] int64 out: its labels
    perm_ptr,       # [T, Bs] int32 out: examples sorted by token at each position (token_index's perm)
    starts_ptr,     # [T, V + 1] int32 out: token_index's starts
    counter_ptr,    # [1+] int64: element 0 is s, the draw's number (the optimizer's steps done)
    ring_ptr,       # FROM_RING: [R, n] int32, row e mod R the order of epoch e (else unused)
    n, Bs, T, V,
    seed,           # the draw: the run's batch seed, in [0, 2^32)
    W,              # the draw: Feistel half width, the smallest w with 4^w >= n
    K,              # FROM_RING: steps per epoch, ceil(n / BATCH)
    R,              # FROM_RING: rows of the ring
    BATCH,          # FROM_RING: the full batch size (batch k starts at k * BATCH of its epoch's order)
    ROUNDS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
    FROM_RING: tl.constexpr,
):
    """Program (t, pb): column t of batch rows pb * BLOCK_B + [0, BLOCK_B) (and their labels when t == 0),
    their ranks among the batch's tokens at position t, and a share of starts[t]; grid (T, cdiv(Bs, BLOCK_B)).
    The batch of s: the draw's (FROM_RING 0), or batch k = s - e K of epoch e = s // K, entries
    [k BATCH, k BATCH + Bs) of ring row e mod R (FROM_RING 1)."""
    t = tl.program_id(0)
    pb = tl.program_id(1)
    s = tl.load(counter_ptr)
    if FROM_RING:
        e = s // K
        row = (e % R) * n
        start = row + (s - e * K) * BATCH
        stop = row + n
        kseed = s
    else:
        kseed = _h32((seed ^ _h32((s & 0xFFFFFFFF) ^ 0x9E3779B9)) & 0xFFFFFFFF)
        start = s
        stop = s
    b = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    ok = b < Bs
    idx = _examples(b, ok, n, kseed, W, ring_ptr, start, stop, ROUNDS, FROM_RING)
    tok = tl.load(src_tok + idx * T + t, mask=ok, other=0)
    tl.store(dst_tok + b.to(tl.int64) * T + t, tok, mask=ok)
    if t == 0:
        tl.store(dst_lab + b, tl.load(src_lab + idx, mask=ok, other=0), mask=ok)
    # ranks: the stable sort position of (tok[b], b) among the batch's (tok[b'], b')
    rank = tl.zeros([BLOCK_B], dtype=tl.int32)
    for b0 in range(0, Bs, BLOCK_B):
        bq = b0 + tl.arange(0, BLOCK_B)
        okq = bq < Bs
        iq = _examples(bq, okq, n, kseed, W, ring_ptr, start, stop, ROUNDS, FROM_RING)
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
            iq = _examples(bq, okq, n, kseed, W, ring_ptr, start, stop, ROUNDS, FROM_RING)
            tq = tl.load(src_tok + iq * T + t, mask=okq, other=0)
            cnt += tl.sum(((tq[None, :] < v[:, None]) & okq[None, :]).to(tl.int32), axis=1)
        tl.store(starts_ptr + t * (V + 1) + v, cnt, mask=v <= V)


def half_width(n: int) -> int:
    """The Feistel half width w: the smallest w >= 1 with 4^w >= n."""
    w = 1
    while 4 ** w < n:
        w += 1
    return w


def _checked(src_tokens, src_labels, tokens_out, labels_out, index_out, counter, d_vocab: int) -> tuple[int, int, int]:
    """The checks both launches make; (n, T, Bs)."""
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
        raise ValueError("the batch launch: every tensor must be contiguous")
    return n, T, Bs


def _launch(src_tokens, src_labels, tokens_out, labels_out, index_out, counter, ring, n, T, Bs, d_vocab, seed=0,
            K=1, batch=1):
    perm, starts = index_out
    from_ring = ring is not None
    launch(batch_kernel, (T, triton.cdiv(Bs, BLOCK_B)),
           dict(src_tok=src_tokens, src_lab=src_labels, dst_tok=tokens_out, dst_lab=labels_out, perm_ptr=perm,
                starts_ptr=starts, counter_ptr=counter, ring_ptr=ring if from_ring else counter, n=n, Bs=Bs, T=T,
                V=int(d_vocab), seed=int(seed) & M32, W=half_width(n), K=int(K), R=ring.shape[0] if from_ring else 1,
                BATCH=int(batch)),
           dict(ROUNDS=ROUNDS, BLOCK_B=BLOCK_B, BLOCK_V=BLOCK_V, FROM_RING=int(from_ring)), num_warps=NUM_WARPS)


def draw_batch(src_tokens, src_labels, tokens_out, labels_out, index_out, counter, seed: int, d_vocab: int) -> None:
    """The batch of draw counter[0] (module docstring) into tokens_out [Bs, T], labels_out [Bs] and its
    token-scatter index index_out = (perm [1, T, Bs] int32, starts [1, T, d_vocab + 1] int32), from the split
    src_tokens [n, T], src_labels [n] (int64, contiguous, one device). One launch, no sync."""
    n, T, Bs = _checked(src_tokens, src_labels, tokens_out, labels_out, index_out, counter, d_vocab)
    _launch(src_tokens, src_labels, tokens_out, labels_out, index_out, counter, None, n, T, Bs, d_vocab, seed=seed)


def gather_epoch_batch(src_tokens, src_labels, tokens_out, labels_out, index_out, counter, ring, batch_size: int,
                       d_vocab: int) -> None:
    """Minibatches "epoch" on the device: with s = counter[0], K = ceil(n / batch_size), batch k = s mod K of epoch
    e = s // K, the examples ring[e mod R, k batch_size : k batch_size + Bs] (ring [R, n] int32, row e mod R the
    order of epoch e, filled by EpochRing), gathered into tokens_out [Bs, T], labels_out [Bs] with their
    token-scatter index, as draw_batch. Bs is batch_size, or the short last batch's n - (K - 1) batch_size for
    the epoch's last step (the caller launches that size on that step: a launch never reads past the epoch's
    row). One launch, no sync."""
    n, T, Bs = _checked(src_tokens, src_labels, tokens_out, labels_out, index_out, counter, d_vocab)
    check("ring", ring, torch.int32, shape=(None, n), device=src_tokens.device)
    K = triton.cdiv(n, batch_size)
    if not 1 <= batch_size <= n or Bs not in (batch_size, n - (K - 1) * batch_size):
        raise KernelConfigError(f"epoch batch of {Bs} rows with batch size {batch_size} of n = {n}: a launch gathers "
                                f"{batch_size} rows or the epoch's last {n - (K - 1) * batch_size}")
    if not ring.is_contiguous():
        raise ValueError("gather_epoch_batch: the ring must be contiguous")
    _launch(src_tokens, src_labels, tokens_out, labels_out, index_out, counter, ring, n, T, Bs, d_vocab, K=K,
            batch=batch_size)


RING_BYTES = 8 << 20   # the device ring of epoch orders (int32): 2 E epochs of n examples


class EpochRing:
    """The orders of the coming epochs of minibatches "epoch", on the device, for gather_epoch_batch. ``orders``
    (first, count) -> [count, n] integers (the host's permutations, grokfast.batches.epoch_orders) fills the
    ring [2E, n] int32 E rows at a time: chunk c = epochs [cE, (c + 1)E) into rows (c mod 2) E + [0, E), so row
    e mod 2E holds epoch e. ``ensure(step)`` before each step keeps the step's chunk and the next one there: one
    copy of E epochs every E epochs, from pinned memory without waiting for the device (the copy is queued
    behind the steps that read the rows it replaces, those of chunk c - 1); every other step does nothing on
    the host. E (``epochs``, default from RING_BYTES) is at least 1."""

    def __init__(self, n: int, batch_size: int, orders, device, epochs: int | None = None):
        if not 1 <= batch_size <= n:
            raise KernelConfigError(f"batch size {batch_size}: minibatches \"epoch\" take 1 to n = {n} examples")
        self.n, self.batch_size, self.orders = n, batch_size, orders
        self.K = triton.cdiv(n, batch_size)
        self.E = max(1, int(epochs) if epochs is not None else RING_BYTES // (2 * 4 * n))
        self.ring = torch.zeros((2 * self.E, n), dtype=torch.int32, device=device)
        self.chunks = ()       # the chunks in the ring
        self.uploads = 0

    def rows(self, step: int) -> int:
        """The batch size of 0-based ``step``: batch_size, or the short last batch of the epoch."""
        return min(self.batch_size, self.n - (step % self.K) * self.batch_size)

    def ensure(self, step: int) -> None:
        c = step // self.K // self.E
        if c + 1 in self.chunks:
            return
        for chunk in ((c + 1,) if c in self.chunks else (c, c + 1)):
            self._upload(chunk)
        self.chunks = (c, c + 1)

    def _upload(self, chunk: int) -> None:
        E, n = self.E, self.n
        orders = self.orders(chunk * E, E)
        if tuple(orders.shape) != (E, n) or orders.dtype not in (torch.int32, torch.int64):
            raise KernelConfigError(f"epoch orders must be [{E}, {n}] integers, got {list(orders.shape)} {orders.dtype}")
        if int(orders.min()) < 0 or int(orders.max()) >= n:
            raise KernelConfigError(f"epoch orders must index the {n} examples, got values in "
                                    f"[{int(orders.min())}, {int(orders.max())}]")
        src = orders.to(torch.int32)
        dst = self.ring[(chunk % 2) * E:(chunk % 2 + 1) * E]
        if dst.is_cuda:   # pinned: the copy is queued without waiting (torch keeps the pinned block until it ran)
            dst.copy_(src.pin_memory(), non_blocking=True)
        else:
            dst.copy_(src)
        self.uploads += 1


def aot_specs(n: int = 4656, batch_size: int = 512, n_ctx: int = 4, d_vocab: int = 99) -> list[dict]:
    """The batch kernel's compile specs for grokfast.kernels.aot at a split of n examples (default: the power
    preset's 4656, batch 512): the draw, and the epoch gather at the full and the short batch, specialised as
    the JIT specialises those values (_common.specialization)."""
    from ._common import record_launches, specialization
    meta = torch.device("meta")
    i64, i32 = torch.int64, torch.int32

    def buffers(bs):
        return (torch.empty((bs, n_ctx), dtype=i64, device=meta), torch.empty(bs, dtype=i64, device=meta),
                (torch.empty((1, n_ctx, bs), dtype=i32, device=meta), torch.empty((1, n_ctx, d_vocab + 1), dtype=i32, device=meta)),
                torch.empty(2, dtype=i64, device=meta))
    src = (torch.empty((n, n_ctx), dtype=i64, device=meta), torch.empty(n, dtype=i64, device=meta))
    short = n - (triton.cdiv(n, batch_size) - 1) * batch_size
    ring = torch.empty((2 * max(1, RING_BYTES // (8 * n)), n), dtype=i32, device=meta)
    with record_launches() as rec:
        draw_batch(*src, *buffers(batch_size), 7919, d_vocab)
        for bs in (batch_size, short):
            gather_epoch_batch(*src, *buffers(bs), ring, batch_size, d_vocab)
    names = [f"draw_batch[n={n},batch={batch_size}]", f"epoch_batch[n={n},batch={batch_size}]",
             f"epoch_batch[n={n},batch={short} of {batch_size}]"]
    return [dict(name=name, fn=kernel, num_warps=num_warps, num_stages=num_stages, **specialization(kernel, args, cx))
            for name, (kernel, grid, args, cx, num_warps, num_stages) in zip(names, rec)]
