"""Minibatches drawn on the device (kernels/batch_draw.py) against their specification, grokfast.batches.draw_indices
(torch), and the token-scatter index against embed_attn.token_index: equal bit for bit, on fresh random splits,
outputs poisoned first. The draw itself: distinct examples, a function of (seed, step), each example drawn about
batch_size / n of the time."""
from __future__ import annotations

import pytest
import torch

from grokfast.backends import interpreter_on
from grokfast.batches import draw_indices, half_width

DEVICE = "cuda" if torch.cuda.is_available() and not interpreter_on() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not interpreter_on(),
                                reason="the kernels need a CUDA GPU or TRITON_INTERPRET=1")


@pytest.mark.parametrize("n,bs,T,V,step", [(29, 16, 4, 9, 0), (100, 70, 3, 12, 5), (300, 33, 4, 99, 123456789),
                                           (5, 5, 2, 7, 1)])
def test_device_draw_is_the_specified_draw_with_its_token_index(n, bs, T, V, step):
    from grokfast.kernels.batch_draw import draw_batch
    from grokfast.kernels.embed_attn import token_index
    g = torch.Generator().manual_seed(n + step)
    src = torch.randint(0, V, (n, T), generator=g).to(DEVICE)
    lab = torch.randint(0, 97, (n,), generator=g).to(DEVICE)
    counter = torch.tensor([step, 3], dtype=torch.int64, device=DEVICE)   # (steps done, filter count)
    tok = torch.full((bs, T), -5, dtype=torch.int64, device=DEVICE)
    out_lab = torch.full((bs,), -5, dtype=torch.int64, device=DEVICE)
    perm = torch.full((1, T, bs), -7, dtype=torch.int32, device=DEVICE)
    starts = torch.full((1, T, V + 1), -7, dtype=torch.int32, device=DEVICE)
    draw_batch(src, lab, tok, out_lab, (perm, starts), counter, 8006, V)
    idx = draw_indices(n, bs, 8006, step, device=DEVICE)
    assert idx.unique().numel() == bs and 0 <= int(idx.min()) and int(idx.max()) < n
    assert torch.equal(tok, src[idx]) and torch.equal(out_lab, lab[idx])
    ref_perm, ref_starts = token_index(src[idx].unsqueeze(0), V)
    assert torch.equal(perm, ref_perm) and torch.equal(starts, ref_starts)
    assert counter.tolist() == [step, 3]        # read, never advanced: the optimizer owns it


def test_draw_is_a_function_of_seed_and_step_and_roughly_uniform():
    n, bs, draws = 29, 16, 2000
    a = draw_indices(n, bs, 3, 17)
    assert torch.equal(a, draw_indices(n, bs, 3, 17))
    assert not torch.equal(a, draw_indices(n, bs, 3, 18)) and not torch.equal(a, draw_indices(n, bs, 4, 17))
    counts = torch.zeros(n)
    first = torch.zeros(n)
    for s in range(draws):
        idx = draw_indices(n, bs, 0, s)
        assert idx.unique().numel() == bs
        counts[idx] += 1
        first[idx[0]] += 1
    # each example is in a batch with probability bs / n (1103 of 2000 draws): binomial sd ~22, bound ~5 sd
    assert (counts - draws * bs / n).abs().max() <= 110, counts
    # and leads it with probability 1 / n (69 of 2000): sd ~8, bound ~5 sd
    assert (first - draws / n).abs().max() <= 40, first
    assert [half_width(k) for k in (1, 4, 5, 16, 17, 4656)] == [1, 1, 2, 2, 3, 7]


def test_draw_refuses_a_batch_larger_than_the_split():
    from grokfast.kernels.batch_draw import draw_batch
    from grokfast.kernels.errors import KernelConfigError
    src, lab = torch.zeros((4, 3), dtype=torch.int64, device=DEVICE), torch.zeros(4, dtype=torch.int64, device=DEVICE)
    tok, out = torch.zeros((5, 3), dtype=torch.int64, device=DEVICE), torch.zeros(5, dtype=torch.int64, device=DEVICE)
    index = (torch.zeros((1, 3, 5), dtype=torch.int32, device=DEVICE),
             torch.zeros((1, 3, 8), dtype=torch.int32, device=DEVICE))
    with pytest.raises(KernelConfigError, match="batch size 5"):
        draw_batch(src, lab, tok, out, index, torch.zeros(2, dtype=torch.int64, device=DEVICE), 0, 7)


# --------------------------------------------------------------------------------------------------
# Minibatches "epoch": the host's orders in a device ring, each step's batch gathered from it


@pytest.mark.parametrize("n,bs,T,V,step,R,order", [(29, 12, 4, 9, 0, 2, "forward"), (29, 12, 3, 12, 8, 4, "forward"),
                                                   (200, 70, 4, 99, 7, 6, "forward"), (200, 70, 4, 99, 7, 6, "shuffled"),
                                                   (5, 5, 2, 7, 3, 2, "reversed")])
def test_epoch_gather_is_the_rings_batch_with_its_token_index(n, bs, T, V, step, R, order):
    """Step s gathers batch k = s mod K of epoch e = s // K, K = ceil(n / bs): entries [k bs, k bs + rows) of ring row
    e mod R (rows: bs, or the short last batch's n - (K - 1) bs), with its token-scatter index, bit for bit; the
    programs in any order give the same bits (n 200: four programs per position)."""
    from grokfast.kernels.batch_draw import gather_epoch_batch
    from grokfast.kernels.embed_attn import token_index
    from grokfast.kernels.interpret_order import program_order
    g = torch.Generator().manual_seed(n + step)
    src = torch.randint(0, V, (n, T), generator=g).to(DEVICE)
    lab = torch.randint(0, 97, (n,), generator=g).to(DEVICE)
    ring = torch.stack([torch.randperm(n, generator=g) for _ in range(R)]).to(torch.int32).to(DEVICE)
    K = -(-n // bs)
    e, k = divmod(step, K)
    rows = min(bs, n - k * bs)
    counter = torch.tensor([step, 3], dtype=torch.int64, device=DEVICE)
    tok = torch.full((rows, T), -5, dtype=torch.int64, device=DEVICE)
    out_lab = torch.full((rows,), -5, dtype=torch.int64, device=DEVICE)
    perm = torch.full((1, T, rows), -7, dtype=torch.int32, device=DEVICE)
    starts = torch.full((1, T, V + 1), -7, dtype=torch.int32, device=DEVICE)
    if order == "forward" or DEVICE == "cuda":
        gather_epoch_batch(src, lab, tok, out_lab, (perm, starts), counter, ring, bs, V)
    else:
        with program_order(order, seed=step):
            gather_epoch_batch(src, lab, tok, out_lab, (perm, starts), counter, ring, bs, V)
    idx = ring[e % R, k * bs:k * bs + rows].long()
    assert idx.numel() == rows and torch.equal(tok, src[idx]) and torch.equal(out_lab, lab[idx])
    ref_perm, ref_starts = token_index(src[idx].unsqueeze(0), V)
    assert torch.equal(perm, ref_perm) and torch.equal(starts, ref_starts)
    assert counter.tolist() == [step, 3]


def test_epoch_gather_refuses_a_batch_of_neither_size():
    from grokfast.kernels.batch_draw import gather_epoch_batch
    from grokfast.kernels.errors import KernelConfigError
    n, T = 29, 3
    src, lab = torch.zeros((n, T), dtype=torch.int64, device=DEVICE), torch.zeros(n, dtype=torch.int64, device=DEVICE)
    ring = torch.zeros((2, n), dtype=torch.int32, device=DEVICE)
    tok, out = torch.zeros((7, T), dtype=torch.int64, device=DEVICE), torch.zeros(7, dtype=torch.int64, device=DEVICE)
    index = (torch.zeros((1, T, 7), dtype=torch.int32, device=DEVICE), torch.zeros((1, T, 8), dtype=torch.int32, device=DEVICE))
    with pytest.raises(KernelConfigError, match="batch of 7 rows with batch size 12 .* 12 rows or the epoch's last 5"):
        gather_epoch_batch(src, lab, tok, out, index, torch.zeros(2, dtype=torch.int64, device=DEVICE), ring, 12, 7)


@pytest.mark.parametrize("rng", ["independent", "stream"])
def test_epoch_ring_holds_each_steps_epoch_and_copies_every_e_epochs(rng):
    """EpochRing with E = 3 on the host's orders (grokfast.batches.epoch_orders; rng "stream": EpochOrder's composed
    shuffles): over 40 steps (K = 3: 13 epochs, a short batch of 5 each) the ring's row e mod 2E, cut as the kernel
    cuts it, is epoch_batch's / EpochOrder's batch of every step, bit for bit; the orders are asked for only at the
    first step of each chunk of E epochs (and of the next chunk at once at the start); a ring built at step 22
    (a resume, mid-epoch and mid-chunk) holds the same batches from there."""
    from grokfast.batches import epoch_batch, epoch_orders, epoch_rows
    from grokfast.config import TrainConfig
    from grokfast.kernels.batch_draw import EpochRing
    from grokfast.stream import EpochOrder
    n, bs, E = 29, 12, 3
    tcfg = TrainConfig(batch_size=bs, minibatches="epoch", seed=11, rng=rng)
    state = torch.Generator().manual_seed(2).get_state()
    expected = EpochOrder(n, bs, state).batch if rng == "stream" else (lambda s: epoch_batch(n, tcfg, s))

    def ring_at(first):
        asked = []
        source = epoch_orders(n, tcfg, EpochOrder(n, bs, state) if rng == "stream" else None)
        ring = EpochRing(n, bs, lambda e0, count: (asked.append((first_step[0], e0, count)), source(e0, count))[1],
                         "cpu", epochs=E)
        first_step = [first]
        for s in range(first, 40):
            first_step[0] = s
            ring.ensure(s)
            e, k = divmod(s, 3)
            got = ring.ring[e % (2 * E), k * bs:k * bs + ring.rows(s)].long()
            assert ring.rows(s) == epoch_rows(n, bs, s) and torch.equal(got, expected(s)), s
        return asked
    assert ring_at(0) == [(0, 0, 3), (0, 3, 3), (9, 6, 3), (18, 9, 3), (27, 12, 3), (36, 15, 3)]
    assert ring_at(22) == [(22, 6, 3), (22, 9, 3), (27, 12, 3), (36, 15, 3)]
