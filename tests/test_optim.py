"""The reference optimizer: Grokfast filters against their formulas (Lee et al. 2024), AdamW against torch."""
import pytest
import torch

from grokfast.config import TrainConfig
from grokfast.optim import AdamW, GrokfastFilter, lr_at


def grads_sequence(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(3, 4, generator=g, dtype=torch.float64),
             "b": torch.randn(5, generator=g, dtype=torch.float64)} for _ in range(n)]


def test_ema_filter_is_the_papers_formula():
    alpha, lamb = 0.9, 2.5
    f = GrokfastFilter("ema", alpha=alpha, lamb=lamb)
    seq = grads_sequence(12)
    ema = None
    for grads in seq:
        raw = {k: v.clone() for k, v in grads.items()}
        out = f.apply(grads)
        # ema starts at the first gradient, then ema = alpha * ema + (1 - alpha) * g; g_hat = g + lamb * ema
        ema = {k: v.clone() for k, v in raw.items()} if ema is None else {k: alpha * ema[k] + (1 - alpha) * raw[k] for k in raw}
        for k in raw:
            assert torch.allclose(out[k], raw[k] + lamb * ema[k], rtol=1e-13, atol=1e-13)
            assert torch.equal(grads[k], raw[k])  # inputs untouched


@pytest.mark.parametrize("window", [1, 4])
def test_ma_filter_is_the_papers_formula(window):
    lamb = 5.0
    f = GrokfastFilter("ma", lamb=lamb, window=window)
    seq = grads_sequence(11, seed=1)
    for i, grads in enumerate(seq):
        out = f.apply(grads)
        for k in grads:
            if i + 1 < window:  # not applied until the window is full
                assert torch.equal(out[k], grads[k])
            else:
                mean = sum(seq[j][k] for j in range(i + 1 - window, i + 1)) / window
                assert torch.allclose(out[k], grads[k] + lamb * mean, rtol=1e-13, atol=1e-13)


def test_none_filter_passes_gradients_through():
    f = GrokfastFilter("none")
    g = grads_sequence(1)[0]
    assert f.apply(g) is g


def test_filter_state_round_trip():
    for kind in ("ema", "ma"):
        a, b = GrokfastFilter(kind, window=3), GrokfastFilter(kind, window=3)
        seq = grads_sequence(7, seed=2)
        for g in seq[:4]:
            a.apply(g)
        b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
        for g in seq[4:]:
            oa, ob = a.apply(g), b.apply(g)
            assert all(torch.equal(oa[k], ob[k]) for k in g)


@pytest.mark.parametrize("warmup,wd", [(0, 0.0), (0, 1.0), (5, 0.3)])
def test_adamw_matches_torch(warmup, wd):
    cfg = TrainConfig(lr=3e-3, wd=wd, beta1=0.9, beta2=0.98, warmup=warmup)
    g = torch.Generator().manual_seed(3)
    start = {"a": torch.randn(3, 4, generator=g, dtype=torch.float64), "b": torch.randn(5, generator=g, dtype=torch.float64)}
    mine = {k: v.clone() for k, v in start.items()}
    theirs = [torch.nn.Parameter(v.clone()) for v in start.values()]
    opt = AdamW(mine, cfg)
    topt = torch.optim.AdamW(theirs, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=wd, foreach=False)
    for t, grads in enumerate(grads_sequence(15, seed=4), start=1):
        opt.step(grads)
        for p, k in zip(theirs, grads):
            p.grad = grads[k].clone()
        topt.param_groups[0]["lr"] = lr_at(cfg, t)
        topt.step()
        for p, k in zip(theirs, start):
            assert torch.allclose(mine[k], p.data, rtol=1e-12, atol=1e-14)


def test_warmup_schedule():
    cfg = TrainConfig(lr=1e-3, warmup=10)
    assert lr_at(cfg, 1) == pytest.approx(1e-4)
    assert lr_at(cfg, 10) == lr_at(cfg, 500) == 1e-3
    assert lr_at(TrainConfig(lr=1e-3, warmup=0), 1) == 1e-3
