"""grokfast.probes: each probe against a direct computation on planted functions, and each reading on a model
whose answer is known: the hand-built clock (tests/test_analysis.py, the Fourier algorithm written from the
identities) reads as grokked everywhere, a fresh model as no structure."""
import math

import pytest
import torch

from grokfast import ModelConfig, Task, Transformer, fourier, measures as M, probes as PR
from test_analysis import hand_built

P, FREQS = 31, [4, 9, 13]
F64 = torch.float64


@pytest.fixture(scope="module")
def task31():
    return Task("x+y", P, 0.5, seed=0)


def test_sparse_probe_is_least_squares_on_its_directions():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(23, 40, generator=g, dtype=F64)
    y = torch.randn(23, generator=g, dtype=F64)
    m, r2, r2s, pred = PR.sparse_probe(X, y, max_dirs=3)
    assert m == 3 and r2 == r2s[-1] and r2s == sorted(r2s)
    # the same fit by least squares on the chosen directions (the prediction's span) with an intercept
    Xc = X - X.mean(0)
    U, S, _ = torch.linalg.svd(Xc, full_matrices=False)
    corr = U.T @ (y - y.mean())
    top = torch.argsort(corr.abs(), descending=True)[:3]
    A = torch.cat([torch.ones(23, 1, dtype=F64), U[:, top]], 1)
    sol = torch.linalg.lstsq(A, y[:, None]).solution
    ref = (A @ sol)[:, 0]
    assert torch.allclose(pred, ref, atol=1e-10)
    ref_r2 = 1 - float(((y - ref) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    assert r2 == pytest.approx(ref_r2, rel=1e-10)
    # a planted feature along one direction: found with one direction, R^2 = 1
    X[:, 5] = 7 * torch.cos(torch.arange(23, dtype=F64))
    X[:, :5] *= 1e-3
    X[:, 6:] *= 1e-3
    m, r2, _, pred = PR.sparse_probe(X, torch.cos(torch.arange(23, dtype=F64)))
    assert m == 1 and r2 > 0.999


def test_probes_find_the_clock_and_not_a_fresh_embedding(task31):
    clock = PR.embedding_probes(hand_built(P, FREQS, "clock"), task31, FREQS)
    assert len(clock) == 2 * 2 * len(FREQS)
    assert all(q.found and q.n_dirs <= 2 and q.r2 > 0.999 for q in clock)   # the circles are exact
    assert all(torch.allclose(q.prediction, q.target, atol=1e-3) for q in clock)
    fresh = Transformer(ModelConfig(d_model=32, n_heads=4, d_head=8, d_mlp=64).for_task(task31), seed=4).eval()
    qs = PR.embedding_probes(fresh, task31, [])
    assert len(qs) == 12 and not any(q.found for q in qs)                   # the strongest frequencies, none found
    assert max(q.r2_by_dirs[1] for q in qs) < 0.6


def test_surface_components_name_a_planted_neuron():
    p, k = 17, 3
    x = torch.arange(p, dtype=F64)
    c, s = torch.cos(2 * math.pi * k * x / p), torch.sin(2 * math.pi * k * x / p)
    act = 3 * torch.outer(c, c) + 1 * torch.outer(s, torch.ones(p, dtype=F64)) + 5.0
    comps, top = PR.surface_components(act, top=3)
    names = [n for n, _, _ in comps]
    assert names[:2] == ["cos 3a cos 3b", "sin 3a"]
    # energies: 9 ||c||^4 against 1 ||s||^2 p, with ||c||^2 = ||s||^2 = p / 2
    e1, e2 = 9 * (p / 2) ** 2, (p / 2) * p
    assert comps[0][1] == pytest.approx(e1 / (e1 + e2), rel=1e-10)
    assert comps[1][1] == pytest.approx(e2 / (e1 + e2), rel=1e-10)
    assert top == pytest.approx(1.0, abs=1e-12) and comps[2][1] < 1e-20


def test_answer_shares_against_a_groupby():
    p = 13
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    ans = (a + b) % p
    g = torch.Generator().manual_seed(1)
    f = torch.randn(p, generator=g, dtype=F64)
    units = torch.stack([f[ans], torch.randn(p * p, generator=g, dtype=F64), f[ans] + 0.5 * torch.randn(p * p, generator=g, dtype=F64)], 1)
    sh = PR.answer_shares(units.reshape(p, p, 3), ans)
    assert sh[0] == pytest.approx(1.0, abs=1e-12) and sh[1] < 0.2
    u = units[:, 2]
    means = torch.stack([u[ans == c].mean() for c in range(p)])
    ref = float(((means[ans] - u.mean()) ** 2).sum() / ((u - u.mean()) ** 2).sum())
    assert float(sh[2]) == pytest.approx(ref, rel=1e-10)
    au = PR.adding_units(units.reshape(p, p, 3), ans, "test")
    assert au.adding == [0] and int(au.preferred[0]) == int(f.argmax())


@pytest.mark.parametrize("kind", ["clock", "pizza"])
def test_the_last_layer_reads_cos_a_cos_b_minus_sin_a_sin_b(task31, kind):
    m = hand_built(P, FREQS, kind)
    grid, _ = M.full_grid(task31)
    logits, neurons = M.grid_forward(m, grid)
    for k in FREQS:
        d = PR.adding_decomposition(neurons, M.neuron_logit_map(m), grid.answers, k, "x+y")
        cc, ss = d.products["cos a cos b"][0], d.products["sin a sin b"][0]
        assert cc > 0 and ss == pytest.approx(-cc, rel=1e-3)                  # cos a cos b - sin a sin b
        assert abs(d.products["cos a sin b"][0]) < 1e-3 * cc and abs(d.products["sin a cos b"][0]) < 1e-3 * cc
        sc, cs = d.products["sin a cos b"][1], d.products["cos a sin b"][1]  # s_sin: sin a cos b + cos a sin b
        assert sc > 0 and cs == pytest.approx(sc, rel=1e-3)
        # the clock's s_cos is cos(w (a + b)) itself; the pizza's is |cos(w (a - b) / 2)| cos(w (a + b)), whose
        # share along cos(w (a + b)) is E|cos|^2 / E cos^2 = (2 / pi)^2 / (1 / 2) = 0.81 on the continuum
        assert d.target_share > (0.95 if kind == "clock" else 0.7) and "cos(w (a + b))" in d.identity
        assert torch.allclose(d.parts["sum"], d.parts["cos a cos b"] + d.parts["sin a sin b"])
    share = PR.key_product_share(fourier.logit_spectrum(logits), FREQS)
    assert share > (0.9 if kind == "clock" else 0.5), share   # the pizza's |cos(w (a - b) / 2)| has harmonics
    au = PR.adding_units(logits, grid.answers.cpu(), "logits")
    if kind == "clock":
        assert len(au.adding) == P                                              # every logit adds
    else:  # the hand-built pizza's logit keeps its |cos(w (a - b) / 2)| factor: mostly, not only, the answer
        assert float(au.shares.min()) > 0.7


def test_a_fresh_model_has_no_adding_units_and_no_key_spectrum(task31):
    m = Transformer(ModelConfig(d_model=32, n_heads=4, d_head=8, d_mlp=64).for_task(task31), seed=2).eval()
    grid, _ = M.full_grid(task31)
    logits, neurons = M.grid_forward(m, grid)
    assert PR.adding_units(logits, grid.answers.cpu(), "logits").adding == []
    d = PR.adding_decomposition(neurons, M.neuron_logit_map(m), grid.answers, 4, "x+y")
    assert d.target_share < 0.2
    assert PR.key_product_share(fourier.logit_spectrum(logits), []) == 0.0
    assert PR.key_product_share(fourier.logit_spectrum(logits), [4]) < 0.1


def test_verdict_words():
    assert PR.verdict(1.0, 1.0, [4], {}).word == "grokked"
    assert PR.verdict(1.0, 0.3, [], {}).word == "memorising"
    assert PR.verdict(0.05, 0.04, [], {}).word == "untrained"
    v = PR.verdict(0.995, None, [3], {})
    assert v.word == "grokked" and "split is not known" in v.why


def test_a_second_layers_neurons_are_read_as_units_too(tmp_path):
    """In a model with two layers the last MLP's neurons are candidates for adding, beside the logits."""
    from grokfast import importers
    from grokfast.analyze import analyze_run

    task = Task("x+y", 11, 0.5, seed=0)
    m = Transformer(ModelConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=24).for_task(task), seed=1)
    importers.write_run_dir(tmp_path / "run", m, task)
    d = analyze_run(tmp_path / "run").detail
    assert [u.kind for u in d["adding"]] == ["logits", "layer 1 neurons"]
    assert d["adding"][1].shares.shape == (24,)
    grid, _ = M.full_grid(task)
    _, neurons = M.grid_forward(m, grid)
    assert torch.allclose(d["adding"][1].shares, PR.answer_shares(neurons, grid.answers))


def test_every_figure_of_analyze_says_what_grokked_and_memorising_models_show():
    """grokfast analyze draws these; each docstring must say what both kinds of model show."""
    import inspect
    import re

    from grokfast import analyze, plots

    used = set(re.findall(r"plots\.(\w+_figure)", inspect.getsource(analyze)))
    assert {"probes_figure", "neuron_surface_figure", "adding_figure", "logit_spectrum_figure"} <= used
    for name in sorted(used):
        doc = getattr(plots, name).__doc__ or ""
        assert "Grokked:" in doc and "Memorising" in doc, name
