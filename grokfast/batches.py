"""Which training examples each step of minibatch training sees (TrainConfig.minibatches).

- "draw": the batch of step s (0-based) is ``draw_indices(n, batch_size, seed, s)``: batch_size distinct
  examples, a pseudorandom draw without replacement that depends only on (seed, s). Both backends use it:
  the reference computes it here with torch, the fused step on the device inside its captured graph
  (grokfast.kernels.batch_draw, tested bit for bit against this function). Being a function of the step,
  a resumed run draws the same batches with no generator state to save.
- "epoch": ``epoch_batch``: each epoch a fresh shuffle (torch's CPU randperm, as the papers' code; with
  TrainConfig.rng "stream", grokfast.stream.EpochOrder), cut into consecutive batches with a short last one.
  The permutations are always drawn on the host by torch, but not per step: ``epoch_orders`` gives the
  steppers whole epochs, and the fused stepper copies the next E epochs' permutations to the device in one
  copy every E epochs (kernels/batch_draw.py EpochRing), gathering each step's batch on the device inside
  its captured graph (the same examples, bit for bit, as ``epoch_batch`` / EpochOrder.batch).

The draw, with every value a 32-bit unsigned integer (products mod 2^32):
    h(x)     = lowbias32: x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16
    k_r      = h((h(seed ^ h(s ^ 0x9e3779b9)) + r * 0x9e3779b9) mod 2^32), r = 0 .. ROUNDS - 1
    pi       a Feistel permutation of [0, 4^w) (4^w >= n, w smallest): x = (L, R) of w bits each,
             (L, R) <- (R, L ^ (h(R ^ k_r) & (2^w - 1))) for each r
    perm(j)  = pi(j), then pi again while >= n (cycle walking: a permutation of [0, n))
    batch    = [perm(0), ..., perm(batch_size - 1)]
(Before 2026-12-02 "draw" took torch.randperm(n)[:batch_size] from a CPU generator on the host: the
batches of minibatch "draw" runs differ from that version's.)
"""
from __future__ import annotations

import math

import torch

ROUNDS = 6
BATCH_SEED_OFFSET = 7919      # the batch seed is the run's seed + this (the model init uses the seed itself)
_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _h32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 values in [0, 2^32): int64 products wrap, and the mask keeps their low 32 bits."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _h32_int(x: int) -> int:
    return int(_h32(torch.tensor([x & _M32], dtype=torch.int64))[0])


def half_width(n: int) -> int:
    """The Feistel half width w: the smallest w >= 1 with 4^w >= n."""
    w = 1
    while 4 ** w < n:
        w += 1
    return w


def draw_indices(n: int, batch_size: int, seed: int, step: int, device=None) -> torch.Tensor:
    """The examples (int64 [batch_size], on ``device``) of minibatch "draw" at 0-based ``step`` (module docstring)."""
    w = half_width(n)
    kseed = _h32_int((seed & _M32) ^ _h32_int((step & _M32) ^ _GOLDEN))
    keys = [_h32_int((kseed + r * _GOLDEN) & _M32) for r in range(ROUNDS)]
    half = (1 << w) - 1

    def pi(x):
        L, R = x >> w, x & half
        for k in keys:
            L, R = R, L ^ (_h32(R ^ k) & half)
        return (L << w) | R

    x = pi(torch.arange(batch_size, dtype=torch.int64, device=device))
    while bool((x >= n).any()):
        x = torch.where(x >= n, pi(x), x)
    return x


def epoch_perm(n: int, tcfg, epoch: int) -> torch.Tensor:
    """The order (int64 [n], a permutation of range(n)) of 0-based ``epoch`` with minibatches "epoch" and rng
    "independent": torch's CPU randperm from a generator seeded by (seed, epoch) alone."""
    g = torch.Generator().manual_seed((tcfg.seed + BATCH_SEED_OFFSET) * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def epoch_batch(n: int, tcfg, step: int, cache: dict | None = None) -> torch.Tensor:
    """Indices of the minibatch for 0-based `step` with minibatches "epoch": epoch e = step // k of
    k = ceil(n / batch_size) steps is a permutation of range(n) that depends only on (seed, e), cut
    into consecutive batches, the last one short. Being a function of the step, it resumes exactly."""
    bs = tcfg.batch_size
    epoch, k = divmod(step, math.ceil(n / bs))
    perm = cache.get(epoch) if cache is not None else None
    if perm is None:
        perm = epoch_perm(n, tcfg, epoch)
        if cache is not None:
            cache.clear()
            cache[epoch] = perm
    return perm[k * bs:(k + 1) * bs]


def epoch_rows(n: int, batch_size: int, step: int) -> int:
    """How many examples 0-based `step` of minibatches "epoch" trains on: batch_size, or fewer on the short
    last batch of an epoch (n - (k - 1) batch_size of k = ceil(n / batch_size) steps)."""
    return min(batch_size, n - (step % math.ceil(n / batch_size)) * batch_size)


def epoch_orders(n: int, tcfg, stream_order=None):
    """The steppers' source of minibatches "epoch": a function (first, count) -> int64 [count, n] whose row i is
    the order of epoch first + i, which epoch_batch (rng "independent") or ``stream_order``
    (a grokfast.stream.EpochOrder, rng "stream") cuts into the epoch's batches: batch j of epoch e is
    row[j * batch_size:(j + 1) * batch_size]."""
    order = stream_order.order if stream_order is not None else (lambda e: epoch_perm(n, tcfg, e))
    return lambda first, count: torch.stack([order(e) for e in range(first, first + count)])
