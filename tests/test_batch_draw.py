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
