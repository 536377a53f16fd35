"""Progress measures (grokfast.fourier, grokfast.measures), `grokfast analyze` and its figures.

The proof of the measures is a model written by hand from the trigonometric identities: a clock at
chosen frequencies (and a pizza at the same ones), whose key frequencies, restricted and excluded loss,
gradient symmetricity and distance irrelevance are known in advance; a fresh model must read as no
structure; and a real run trained here is analysed end to end.
"""
import math
import struct

import pytest
import torch

import grokfast
from grokfast import ModelConfig, Task, Transformer, fourier, measures as M
from grokfast.cli import main


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes: one thread is faster than two fighting over a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- hand-built models

def hand_built(p: int, freqs, kind: str = "clock", phases: int = 6, scale: float = 10.0) -> Transformer:
    """A 1-layer model on layout "a b =" that computes logit_c = scale * C * sum_k cos(w_k (a + b - c))
    plus small harmonics, weights written from the identities (w_k = 2 pi k / p).

    Embedding: W_E[x] = r_k (cos w_k x, sin w_k x) in two dims per frequency, r_k distinct so that the
    top two principal components are the first frequency's plane.
    clock: head 0 attends only to a's position, head 1 only to b's (scores of 40 from one-hot positional
      embeddings), copying E[a] and E[b] into separate residual blocks. Neuron (k, u, v) computes
      ReLU(cos(w_k a + phi_u) + cos(w_k b + psi_v)) for phases on a 6 x 6 grid; its even part
      |cos(A)| |cos(B)|, A = (w_k (a + b) + phi + psi) / 2, holds (2/pi)(4/(3 pi)) cos(w_k (a + b) + phi + psi),
      which the readout W_L[n, c] = cos(phi + psi + w_k c) turns into cos(w_k (a + b - c)); every other
      term cancels over the phase grid up to harmonics of order >= 5.
    pizza: constant attention (attn_alpha 0) sums E[a] + E[b] + E[=] into the last position; neuron (k, u)
      computes ReLU(cos(w_k a + phi_u) + cos(w_k b + phi_u)), read out by cos(2 phi_u + w_k c): the logit
      is |cos(w_k (a - b) / 2)| cos(w_k (a + b - c)) (Zhong et al.'s pizza), symmetric in a and b.
    """
    K = len(freqs)
    E, A, B, U, P = 0, 2 * K, 4 * K, 6 * K, 8 * K
    n_mlp = K * phases * phases if kind == "clock" else K * phases
    cfg = ModelConfig(n_layers=1, d_model=8 * K + 3, n_heads=2, d_head=max(8, 2 * K), d_mlp=n_mlp,
                      n_ctx=3, d_vocab=p + 1, d_vocab_out=p, attn_alpha=1.0 if kind == "clock" else 0.0)
    m = Transformer(cfg)
    r = [1.0 - 0.1 * i for i in range(K)]
    x = torch.arange(p, dtype=torch.float64)
    with torch.no_grad():
        for prm in m.parameters():
            prm.zero_()
        for i, k in enumerate(freqs):
            w = 2 * math.pi * k / p
            m.embed.W_E[:p, E + 2 * i] = (r[i] * torch.cos(w * x)).float()
            m.embed.W_E[:p, E + 2 * i + 1] = (r[i] * torch.sin(w * x)).float()
            m.unembed.W_U[U + 2 * i] = (scale * torch.cos(w * x)).float()       # W_L = cos(theta + w c)
            m.unembed.W_U[U + 2 * i + 1] = (-scale * torch.sin(w * x)).float()
        for t in range(3):
            m.pos_embed.W_pos[t, P + t] = 1.0
        at, mlp = m.blocks[0].attn, m.blocks[0].mlp
        if kind == "clock":
            for h, (src, dst) in enumerate(((0, A), (1, B))):
                at.W_Q[h, P + 2, 0] = 40 * math.sqrt(cfg.d_head)
                at.W_K[h, P + src, 0] = 1.0
                for j in range(2 * K):
                    at.W_V[h, E + j, j] = 1.0
                    at.W_O[h, j, dst + j] = 1.0
        else:
            for j in range(2 * K):  # one head; alpha 0 sums the positions: block A gets E[a] + E[b]
                at.W_V[0, E + j, j] = 1.0
                at.W_O[0, j, A + j] = 1.0
        n = 0
        for i, k in enumerate(freqs):
            for u in range(phases):
                for v in range(phases if kind == "clock" else 1):
                    phi = 2 * math.pi * u / phases
                    psi = 2 * math.pi * v / phases if kind == "clock" else phi
                    # cos(w a + phi) = cos(phi) cos(w a) - sin(phi) sin(w a)
                    if kind == "clock":
                        mlp.W_in[A + 2 * i, n], mlp.W_in[A + 2 * i + 1, n] = math.cos(phi) / r[i], -math.sin(phi) / r[i]
                        mlp.W_in[B + 2 * i, n], mlp.W_in[B + 2 * i + 1, n] = math.cos(psi) / r[i], -math.sin(psi) / r[i]
                    else:
                        mlp.W_in[A + 2 * i, n], mlp.W_in[A + 2 * i + 1, n] = math.cos(phi) / r[i], -math.sin(phi) / r[i]
                    mlp.W_out[n, U + 2 * i], mlp.W_out[n, U + 2 * i + 1] = math.cos(phi + psi), math.sin(phi + psi)
                    n += 1
    return m.eval()


P, FREQS = 31, [4, 9, 13]


@pytest.fixture(scope="module")
def task31():
    return Task("x+y", P, 0.5, seed=0)


def test_hand_built_clock_reads_as_clock(task31):
    m = hand_built(P, FREQS, "clock")
    grid, why = M.full_grid(task31)
    assert grid is not None, why
    logits, neurons = M.grid_forward(m, grid)
    assert (logits.reshape(P * P, -1).argmax(-1) == grid.answers).all()   # it does compute a + b

    k, frac = fourier.neuron_frequencies(neurons)
    assert sorted(set(k.tolist())) == FREQS and frac.min() > 0.9           # ReLU harmonics hold < 10%
    r = M.all_measures(m, task31)
    assert r["key_freqs"] == FREQS
    assert r["restricted_loss"] < 1e-3                                      # the circuit alone does the task
    assert r["excluded_loss"] > math.log(P)                                 # without it: worse than a guess
    assert r["gradient_symmetricity"] < 0.5                                 # a and b enter asymmetrically
    assert r["distance_irrelevance"] > 0.9                                  # the correct logit ignores a - b
    assert M.clock_or_pizza(r["gradient_symmetricity"], r["distance_irrelevance"], r["n_key_freqs"]) == "clock"
    # the embedding: 3 of 15 frequencies, cos and sin balanced, a circle on its top principal components
    assert r["fourier_frequency_sparsity"] == pytest.approx(3 / 15)
    assert r["fourier_coefficient_ratio"] == pytest.approx(0.5, abs=1e-6)
    assert r["circularity"] > 0.999
    assert r["gini_W_E"] > 0.75 and r["gini_W_L"] > 0.75
    assert not r["skipped"]


def test_hand_built_pizza_reads_as_pizza(task31):
    m = hand_built(P, FREQS, "pizza")
    r = M.all_measures(m, task31)
    assert r["key_freqs"] == FREQS
    # a and b enter only as E[a] + E[b]: the two gradients are the same vector (float32 forward)
    assert r["gradient_symmetricity"] > 0.999
    assert r["distance_irrelevance"] < 0.5
    assert M.clock_or_pizza(r["gradient_symmetricity"], r["distance_irrelevance"], r["n_key_freqs"]) == "pizza"


@pytest.mark.parametrize("preset", ["nanda", "power", "pizza"])
def test_fresh_model_reads_as_no_structure(preset):
    pre = grokfast.preset(preset)
    p = {"nanda": 23, "power": 17, "pizza": 19}[preset]
    op = "x+y" if preset != "power" else "x-y"
    task = Task(op, p, 0.5, seed=1, layout=pre.task.layout)
    m = Transformer(pre.model.for_task(task), seed=3).eval()
    r = M.all_measures(m, task)
    assert r["key_freqs"] == [] and not r["skipped"]
    assert M.clock_or_pizza(r["gradient_symmetricity"], r["distance_irrelevance"], r["n_key_freqs"]) == "no circuit"
    assert r["gini_W_E"] < 0.15 and r["gini_W_L"] < 0.15
    assert r["fourier_frequency_sparsity"] > 0.6
    assert r["circularity"] < 0.4
    # no key frequencies: the restricted logits are the per-class means, the same for every input, and
    # with every class the answer of p of the p^2 inputs no input-blind guess beats ln p
    assert r["restricted_loss"] >= math.log(p) - 1e-9


# ----------------------------------------------------------------------------- the pieces, against references

@pytest.mark.parametrize("p", [7, 10, 31])
def test_fourier_basis_is_orthonormal_and_labelled(p):
    B, labels = fourier.fourier_basis(p)
    assert torch.allclose(B @ B.T, torch.eye(p, dtype=torch.float64), atol=1e-12)
    x = torch.arange(p, dtype=torch.float64)
    k = 2
    assert labels[fourier.cos_sin_rows(k)[0]] == "cos 2"
    c = torch.cos(2 * math.pi * k * x / p)
    assert torch.allclose(B[3], c / c.norm(), atol=1e-12)
    f = torch.randn(p, p, 5, dtype=torch.float64)
    F = fourier.transform_2d(f)
    assert torch.allclose(torch.einsum("ia,jb,ij...->ab...", B, B, F), f, atol=1e-10)  # B^T F B = f


def test_neuron_fractions_find_a_planted_frequency():
    p, k, N = 23, 7, 6
    g = torch.Generator().manual_seed(0)
    a = torch.arange(p, dtype=torch.float64)
    w = 2 * math.pi * k / p
    fa = torch.stack([torch.ones(p), torch.cos(w * a), torch.sin(w * a)], 1)   # [p, 3]
    coef = torch.randn(3, 3, N, generator=g, dtype=torch.float64)
    acts = torch.einsum("ai,bj,ijn->abn", fa, fa, coef)                       # lives in k's block only
    fr = fourier.neuron_frequency_fractions(acts)
    assert torch.allclose(fr[:, k - 1], torch.ones(N, dtype=torch.float64), atol=1e-12)
    assert fr.sum(1).max() <= 1 + 1e-12
    noise = fourier.neuron_frequency_fractions(torch.randn(p, p, 50, generator=g, dtype=torch.float64))
    assert noise.max() < 0.2                                                # 8 / p^2 of the variance per block
    parts = fourier.decompose_neuron(acts[:, :, 0], k)
    assert torch.allclose(sum(parts.values()), acts[:, :, 0], atol=1e-10)
    assert parts["rest"].abs().max() < 1e-10


def test_gini_matches_mean_absolute_difference():
    g = torch.Generator().manual_seed(1)
    for n in (2, 5, 40):
        x = torch.rand(n, generator=g, dtype=torch.float64)
        ref = (x[:, None] - x[None, :]).abs().sum() / (2 * n * n * x.mean())   # the textbook definition
        assert M.gini(x) == pytest.approx(float(ref), rel=1e-12)
    assert M.gini(torch.ones(9)) == pytest.approx(0.0, abs=1e-12)
    assert M.gini(torch.tensor([0.0, 0, 0, 4])) == pytest.approx(3 / 4)


def test_restricted_and_excluded_loss_against_explicit_projection(task31):
    grid, _ = M.full_grid(task31)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(P, P, P, generator=g, dtype=torch.float64) * 3
    freqs = [2, 11]
    a = torch.arange(P, dtype=torch.float64).repeat_interleave(P)
    b = torch.arange(P, dtype=torch.float64).repeat(P)
    L = logits.reshape(P * P, P)
    keep = L.mean(0, keepdim=True).expand_as(L).clone()
    for k in freqs:  # Nanda's directions cos(w (a + b)), sin(w (a + b)), projected one at a time
        for u in (torch.cos(2 * math.pi * k * (a + b) / P), torch.sin(2 * math.pi * k * (a + b) / P)):
            keep += u[:, None] * (u @ L)[None, :] / (u @ u)
    excl = L - (keep - L.mean(0, keepdim=True))
    y = grid.answers
    ref_r = torch.nn.functional.cross_entropy(keep, y)
    ref_e = torch.nn.functional.cross_entropy(excl[grid.train_mask], y[grid.train_mask])
    r, e = M.restricted_excluded_loss(logits, grid, freqs)
    assert r == pytest.approx(float(ref_r), rel=1e-10)
    assert e == pytest.approx(float(ref_e), rel=1e-10)
    assert int(grid.train_mask.sum()) == len(task31.train)
    # frequency P - 2 spans the same directions as 2 (cos equal, sin negated): counted once
    assert M.restricted_excluded_loss(logits, grid, [2, P - 2]) == pytest.approx(
        M.restricted_excluded_loss(logits, grid, [2]), rel=1e-10)


def test_gradient_symmetricity_against_embedding_row_gradients(task31):
    """The hook-captured input gradients against autograd on W_E itself, one example at a time: for
    a != b, row a of W_E's gradient comes from a's position alone (W_pos does not change it, and the
    '=' token is another row)."""
    m = Transformer(ModelConfig(d_model=32, n_heads=4, d_head=8, d_mlp=64).for_task(task31), seed=5)
    g_a, g_b, tokens, cls = M.embedding_gradients(m, task31, n=30, seed=7)
    checked = 0
    for i in range(30):
        a, b = int(tokens[i, 0]), int(tokens[i, 1])
        if a == b:
            continue
        (gW,) = torch.autograd.grad(m(tokens[i:i + 1])[0, cls[i]], m.embed.W_E)
        # float32 forward and backward on both sides, summed in different orders: 1e-5 relative
        assert torch.allclose(g_a[i], gW[a].double(), rtol=1e-5, atol=1e-6 * float(gW.abs().max()))
        assert torch.allclose(g_b[i], gW[b].double(), rtol=1e-5, atol=1e-6 * float(gW.abs().max()))
        checked += 1
    assert checked >= 25
    cos = torch.nn.functional.cosine_similarity(g_a, g_b, dim=-1).mean()
    assert M.gradient_symmetricity(m, task31, n=30, seed=7) == pytest.approx(float(cos), rel=1e-12)


def test_operations_without_a_full_grid_are_skipped_with_a_reason():
    t = Task("x/y", 13, 0.5, seed=0)
    grid, why = M.full_grid(t)
    assert grid is None and "no full p x p grid" in why
    m = Transformer(ModelConfig(d_model=16, n_heads=2, d_head=8, d_mlp=32).for_task(t))
    r = M.all_measures(m, t)
    assert set(r["skipped"]) == {"key_freqs", "restricted_loss", "excluded_loss", "distance_irrelevance"}
    assert "gini_W_E" in r and "gradient_symmetricity" in r
    s5 = Task("s5", 120, 0.5, seed=0)
    assert M.full_grid(s5)[0] is None and "S5" in M.full_grid(s5)[1]
    mix = Task("x+y,x-y", 11, 0.5, seed=0, layout="a op b =")              # the first operation's grid
    grid, _ = M.full_grid(mix)
    assert grid is not None and grid.op == "x+y"
    assert int(grid.train_mask.sum()) == int((mix.train.tokens[:, 1] == mix.op_tokens[0]).sum())


def test_cheap_measures_are_floats_and_fast_to_call(task31):
    m = hand_built(P, FREQS, "clock")
    c = M.cheap_measures(m, task31)
    assert all(isinstance(v, float) for v in c.values())
    assert {"sum_sq_weights", "gini_W_E", "gini_W_L", "circularity"} <= set(c)
    c = M.cheap_measures(m, task31, key_freqs=FREQS)
    assert c["restricted_loss"] < 1e-3
    assert c["sum_sq_weights"] == pytest.approx(sum(float((q.detach().double() ** 2).sum()) for q in m.parameters()))


def test_phases_from_history_and_measures():
    hist = [{"step": s, "train_acc": ta, "test_acc": te} for s, ta, te in
            [(0, 0.0, 0.0), (100, 0.5, 0.0), (200, 0.995, 0.05), (300, 1.0, 0.2), (400, 1.0, 0.999)]]
    rows = [{"step": 100, "excluded_loss": 5.0}, {"step": 200, "excluded_loss": 1.0},
            {"step": 300, "excluded_loss": 4.0}, {"step": 400, "excluded_loss": 9.0}]
    ends, how = M.phases(hist, rows, p=31)                                   # ln 31 = 3.43
    assert ends == {"memorisation": 200, "circuit formation": 300, "clean-up": 400}
    ends, how = M.phases(hist[:3], [], p=31)
    assert ends == {"memorisation": 200, "circuit formation": None, "clean-up": None}
    assert "not measured" in how["circuit formation"]


# ----------------------------------------------------------------------------- a real run, end to end

def _is_png(path) -> bool:
    data = open(path, "rb").read()
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 2000:
        return False
    w, h = struct.unpack(">II", data[16:24])
    return w > 100 and h > 100


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """x+y mod 19, 80% train, d_model 32, d_mlp 128, lr 1e-2, wd 2, Grokfast-EMA: memorises by about
    step 125 and groks by step 400-600 (measured on a 2-core CPU, about 5 s with one thread); the run
    stops at grokking, with room to spare in the step budget."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "p19"
    task = Task("x+y", 19, 0.8, seed=0)
    mc = ModelConfig(d_model=32, n_heads=4, d_head=8, d_mlp=128)
    tc = grokfast.preset("small").train
    run = grokfast.train(task, mc, tc, out=out, progress=False, log=lambda m: None, steps=2000, lr=1e-2,
                         wd=2.0, eval_every=25, checkpoint_every=100, stop_at_grok=True)
    assert run.summary["steps_to_grok"] is not None, run.summary
    return out


def test_analyze_a_trained_run_end_to_end(trained_run, capsys):
    assert main(["analyze", str(trained_run), "--quiet"]) == 0
    report = (trained_run / "report.md").read_text()
    figs = sorted((trained_run / "figures").glob("*.png"))
    names = {f.stem for f in figs}
    assert {"accuracy_loss_phases", "restricted_excluded_loss", "measures", "embedding_circle",
            "embedding_spectrum", "neuron_loops", "neuron_decomposition", "neuron_clusters",
            "logit_spectrum", "embedding_probes", "neuron_surface", "adding_units"} <= names
    assert all(_is_png(f) for f in figs)
    for f in figs:
        assert f"figures/{f.name}" in report                                # every figure is embedded

    model, task, step = grokfast.load_model(trained_run)
    r = M.all_measures(model, task)
    line = next(l for l in report.splitlines() if l.startswith("**Key frequencies:**"))
    listed = [int(x) for x in line.split(":**")[1].replace(",", " ").split()]
    assert listed == r["key_freqs"] and listed                              # the report says what the measures find
    assert r["restricted_loss"] < 0.1 < math.log(19) < r["excluded_loss"]   # a grokked circuit
    rows = [l for l in (trained_run / "measures.jsonl").read_text().splitlines() if l]
    assert len(rows) == len(grokfast.rundir.list_checkpoints(trained_run))
    assert "| memorisation |" in report and "| clean-up |" in report
    assert "**Verdict:** grokked (train accuracy 100.0%, test accuracy " in report
    readings = [l for l in report.splitlines() if l.split("|")[1:2] in ([" embedding probes "], [" neuron surface "],
                                                                        [" units that add "], [" logit spectrum "])]
    assert len(readings) == 4 and all(l.endswith("| grokked |") for l in readings), readings
    out = capsys.readouterr().out
    assert "key frequencies: " + ", ".join(map(str, listed)) in out


def test_analyze_at_one_step_and_bad_input(trained_run, tmp_path, capsys):
    assert main(["analyze", str(trained_run), "--at", "200", "--quiet"]) == 0
    rep = trained_run / "report_step_0000200.md"
    assert rep.exists() and "step 200" in rep.read_text()
    assert all(_is_png(f) for f in (trained_run / "figures" / "step_0000200").glob("*.png"))
    capsys.readouterr()
    for argv, words in ((["analyze", str(trained_run), "--at", "250"], "no checkpoint at step 250"),
                        (["analyze", str(trained_run), "--every", "0"], "--every"),
                        (["analyze", str(tmp_path / "nope")], "not a directory"),
                        (["analyze", str(tmp_path)], "not a run directory")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1
