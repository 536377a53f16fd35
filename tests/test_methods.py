"""The other ways to grok faster, each against its formula: orthogonal gradient and StableMax (Prieto et
al. 2025), Muon, the learning-rate-matched baseline; their config errors and the fused backend's refusals."""
import math

import pytest
import torch

import grokfast
from grokfast.cli import main
from grokfast.config import ConfigError, ModelConfig, TrainConfig
from grokfast.model import stablemax_cross_entropy64, stablemax_s
from grokfast.optim import (AdamW, GrokfastFilter, Muon, as_matrix, from_matrix, lr_at, lr_gain, make_optimizer,
                            newton_schulz5, orthogonalize)

TINY = ModelConfig(d_model=32, n_heads=2, d_head=16, d_mlp=64)


def fresh(seed, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- orthogonal gradient ---------------------------------------------------------------------------

def test_orthogonalize_is_prieto_formula_per_tensor():
    params = {"a": fresh(0, 5, 7), "b": fresh(1, 9), "c": fresh(2, 2, 3, 4, dtype=torch.float32)}
    grads = {"a": fresh(3, 5, 7), "b": fresh(4, 9) + 0.7 * params["b"], "c": fresh(5, 2, 3, 4, dtype=torch.float32)}
    before = {k: v.clone() for k, v in grads.items()}
    out = orthogonalize(params, grads)
    for n in params:
        w, g = params[n].double().flatten().tolist(), grads[n].double().flatten().tolist()
        # the formula in plain Python floats: g - (w.g / (w.w + 1e-30)) w, scaled to |g| / (|g_perp| + 1e-30)
        wg, ww = sum(x * y for x, y in zip(w, g)), sum(x * x for x in w)
        perp = [gi - wg / (ww + 1e-30) * wi for gi, wi in zip(g, w)]
        scale = math.sqrt(sum(x * x for x in g)) / (math.sqrt(sum(x * x for x in perp)) + 1e-30)
        want = torch.tensor([x * scale for x in perp], dtype=torch.float64).view_as(params[n])
        # float64: rounding of a few sums (1e-12); float32: one rounding of the result (2^-24 relative)
        bound = 1e-12 if params[n].dtype == torch.float64 else 2 ** -23
        err = (out[n].double() - want).norm() / want.norm()
        assert err <= bound, (n, float(err))
        assert out[n].dtype == grads[n].dtype and out[n].shape == grads[n].shape
        # what it is for: no component along w, the gradient's norm kept
        cos = float(out[n].double().flatten() @ params[n].double().flatten()) / (
            out[n].double().norm() * params[n].double().norm())
        assert abs(cos) <= (1e-12 if params[n].dtype == torch.float64 else 1e-6)
        assert torch.allclose(out[n].double().norm(), grads[n].double().norm(), rtol=1e-6)
        assert torch.equal(grads[n], before[n])                  # inputs untouched


def test_orthograd_then_adamw_is_adamw_on_the_orthogonal_gradient():
    params_a = {"a": fresh(0, 4, 6), "b": fresh(1, 3)}
    params_b = {k: v.clone() for k, v in params_a.items()}
    cfg = TrainConfig(lr=1e-2, wd=0.5, warmup=0, orthograd=True)
    a, b = AdamW(params_a, cfg), AdamW(params_b, TrainConfig(lr=1e-2, wd=0.5, warmup=0))
    for s in range(4):
        g = {"a": fresh(10 + s, 4, 6), "b": fresh(20 + s, 3)}
        b.step(orthogonalize(params_b, g))                       # orthogonal to the weights before this step
        a.step(g)
        for k in params_a:
            assert torch.equal(params_a[k], params_b[k]), (s, k)


# ---- StableMax ---------------------------------------------------------------------------------------

def test_stablemax_s_is_the_papers_piecewise_function():
    x = torch.tensor([-1e6, -3.0, -0.5, -1e-300, 0.0, 1e-300, 0.5, 1.0, 3.0, 1e6], dtype=torch.float64)
    want = [1 / (1 - v) if v < 0 else v + 1 for v in x.tolist()]
    assert stablemax_s(x).tolist() == want


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_stablemax_cross_entropy_is_the_formula_in_float64(scale):
    logits = fresh(7, 6, 11, dtype=torch.float32) * scale
    logits[0, 3] = 1.0                                            # the point where 1 / (1 - x) has its pole
    labels = torch.tensor([3, 0, 10, 5, 5, 1])
    loss = stablemax_cross_entropy64(logits, labels)
    assert loss.dtype == torch.float64
    total = 0.0
    for row, y in zip(logits.double().tolist(), labels.tolist()):
        s = [v + 1 if v >= 0 else 1 / (1 - v) for v in row]
        total += -math.log(s[y] / sum(s))
    assert abs(float(loss) - total / 6) <= 1e-12 * abs(total / 6)   # float64 sums of 6 x 11 terms
    z = logits.clone().requires_grad_(True)
    stablemax_cross_entropy64(z, labels).backward()
    assert torch.isfinite(z.grad).all()                           # finite at x = 1 too
    # monotone, so it predicts as softmax does
    assert torch.equal(stablemax_s(logits.double()).argmax(-1), logits.argmax(-1))


def test_stablemax_run_evaluates_and_trains_on_stablemax():
    task = grokfast.Task("x+y", p=7, frac=0.6, seed=0)
    run = grokfast.train(task, TINY.for_task(task), TrainConfig(steps=3, eval_every=3, loss="stablemax", warmup=0),
                         progress=False, log=lambda m: None, figures=False)
    model = grokfast.Transformer(TINY.for_task(task), seed=0)
    with torch.no_grad():
        logits = model(task.train.tokens)
    want = float(stablemax_cross_entropy64(logits, task.train.labels))
    ce = float(grokfast.cross_entropy64(logits, task.train.labels))
    # the same float32 logits up to the evaluation's chunking (float32 rounding, ~1e-7 relative)
    assert run.history[0]["train_loss"] == pytest.approx(want, rel=1e-6)
    assert abs(ce - want) > 1e-3 * want


# ---- Muon --------------------------------------------------------------------------------------------

def test_newton_schulz5_is_the_quintic_iteration_and_near_orthogonal():
    G = fresh(3, 24, 40, dtype=torch.float32)
    for M in (G, G.T.contiguous()):
        X = M.double()
        tall = X.shape[0] > X.shape[1]
        X = X.T if tall else X
        X = X / (X.norm() + 1e-7)
        for _ in range(5):
            A = X @ X.T
            X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
        want = X.T if tall else X
        got = newton_schulz5(M)
        assert got.shape == M.shape and got.dtype == torch.float32
        assert (got.double() - want).norm() / want.norm() <= 1e-5     # float32 products, 5 rounds
        sv = torch.linalg.svdvals(got.double())
        assert sv.min() > 0.5 and sv.max() < 1.25                    # Muon's "roughly orthogonal"


def test_muon_matrix_views_are_how_the_model_multiplies():
    m = grokfast.Transformer(TINY.for_task(grokfast.Task("x+y", p=7, frac=0.5)), seed=0)
    x = fresh(1, 5, 32, dtype=torch.float32)
    attn = m.blocks[0].attn
    H, D, Dh = attn.W_Q.shape
    q_heads = torch.einsum("bd,hde->bhe", x, attn.W_Q).reshape(5, H * Dh)
    assert torch.allclose(x @ as_matrix("blocks.0.attn.W_Q", attn.W_Q), q_heads, atol=1e-6)
    z = fresh(2, 5, H * Dh, dtype=torch.float32)
    out = torch.einsum("bhe,hed->bd", z.view(5, H, Dh), attn.W_O)
    assert torch.allclose(z @ as_matrix("blocks.0.attn.W_O", attn.W_O), out, atol=1e-6)
    for n, p in m.named_parameters():
        assert torch.equal(from_matrix(n, as_matrix(n, p), p.shape), p)


def test_muon_step_is_its_formula():
    cfg = TrainConfig(optimizer="muon", lr=1e-2, wd=0.3, warmup=4, muon_lr=0.05, muon_momentum=0.9)
    params = {"blocks.0.mlp.W_in": fresh(0, 8, 12, dtype=torch.float32),
              "blocks.0.attn.W_K": fresh(1, 2, 8, 4, dtype=torch.float32),
              "embed.W_E": fresh(2, 5, 8, dtype=torch.float32)}
    ref = {k: v.clone() for k, v in params.items()}
    opt = make_optimizer(params, cfg)
    assert isinstance(opt, Muon) and set(opt.matrices) == {"blocks.0.mlp.W_in", "blocks.0.attn.W_K"}
    adam = AdamW({"embed.W_E": ref["embed.W_E"]}, cfg)
    buf = {k: torch.zeros_like(v) for k, v in ref.items()}
    for t in range(1, 4):
        g = {k: fresh(100 * t + i, *v.shape, dtype=torch.float32) for i, (k, v) in enumerate(params.items())}
        opt.step(g)
        adam.step(g)
        lr = 0.05 * min(1.0, t / 4)                    # muon_lr on the same warm-up
        for k in ("blocks.0.mlp.W_in", "blocks.0.attn.W_K"):
            buf[k] = 0.9 * buf[k] + 0.1 * g[k]
            u = as_matrix(k, 0.1 * g[k] + 0.9 * buf[k])
            step = newton_schulz5(u) * max(1.0, u.shape[1] / u.shape[0]) ** 0.5
            ref[k] = ref[k] * (1 - lr * 0.3) - lr * from_matrix(k, step, ref[k].shape)
        for k in params:                                # W_in's scale is sqrt(12 / 8); W_K's [8, 8] is 1
            assert torch.allclose(params[k], ref[k], rtol=0, atol=1e-6), (t, k)


def test_muon_resume_is_bit_identical(tmp_path):
    task = grokfast.Task("x+y", p=7, frac=0.6, seed=0)
    kw = dict(progress=False, log=lambda m: None, figures=False)
    tc = TrainConfig(steps=6, eval_every=3, checkpoint_every=3, optimizer="muon", orthograd=True, warmup=2)
    whole = grokfast.train(task, TINY.for_task(task), tc, out=tmp_path / "a", **kw)
    grokfast.train(task, TINY.for_task(task), TrainConfig(**{**tc.to_dict(), "steps": 3}), out=tmp_path / "b", **kw)
    resumed = grokfast.train(resume=tmp_path / "b", steps=6, **kw)
    for (n, p), (_, q) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n


# ---- the learning-rate-matched baseline ----------------------------------------------------------

@pytest.mark.parametrize("kind,lamb", [("ema", 2.0), ("ma", 5.0)])
def test_filters_steady_state_gain_on_a_constant_gradient_is_one_plus_lamb(kind, lamb):
    f = GrokfastFilter(kind, alpha=0.98, lamb=lamb, window=4)
    g = {"w": fresh(0, 3, 3)}
    for _ in range(6):
        out = f.apply(g)
    assert torch.allclose(out["w"], (1 + lamb) * g["w"], rtol=1e-14)
    assert lr_gain(TrainConfig(lr_matched=True, lamb=lamb)) == 1 + lamb
    assert lr_at(TrainConfig(lr=1e-3, lr_matched=True, lamb=lamb, warmup=10), 5) == pytest.approx(1e-3 * (1 + lamb) / 2)
    assert lr_gain(TrainConfig(lamb=lamb)) == 1.0


def test_lr_matched_run_is_adamw_at_the_matched_lr():
    task = grokfast.Task("x+y", p=7, frac=0.6, seed=0)
    kw = dict(progress=False, log=lambda m: None, figures=False)
    a = grokfast.train(task, TINY.for_task(task), TrainConfig(steps=4, lr=1e-3, lamb=2.0, lr_matched=True), **kw)
    b = grokfast.train(task, TINY.for_task(task), TrainConfig(steps=4, lr=3e-3), **kw)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n


# ---- bad input and the fused backend -------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [
    (dict(loss="softmax"), "--loss must be ce or stablemax"),
    (dict(optimizer="sgd"), "--optimizer must be adamw, adam or muon"),
    (dict(muon_lr=0.0), "--muon-lr must be positive"),
    (dict(muon_momentum=1.0), "--muon-momentum must lie in [0, 1)"),
    (dict(lr_matched=True, grokfast="ema"), "drop --grokfast ema"),
    (dict(lr_matched=True, optimizer="muon"), "use --optimizer adamw"),
    (dict(orthograd="yes"), "orthograd must be true or false"),
])
def test_bad_method_settings_are_one_line_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) as e:
        TrainConfig(**kw)
    assert "\n" not in str(e.value)


def test_train_cli_refuses_bad_method_flags_with_status_2(capsys, tmp_path):
    assert main(["train", "--preset", "small", "--lr-matched", "--grokfast", "ema", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--lr-matched" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kw,what", [(dict(optimizer="muon"), "AdamW"), (dict(optimizer="adam"), "AdamW")])
def test_fused_backend_refuses_reference_only_methods(kw, what):
    from grokfast.backends import resolve_backend
    cfg = TINY.for_task(grokfast.Task("x+y", p=7, frac=0.5))
    with pytest.raises(ConfigError, match=what) as e:
        resolve_backend("fused", cfg, "cpu", TrainConfig(**kw))
    assert "\n" not in str(e.value)
    assert resolve_backend("auto", cfg, "cpu", TrainConfig(**kw))[0] == "reference"


def test_fused_backend_takes_orthograd():
    """Orthograd runs on the fused optimizer (tests/test_kernels_orthograd.py checks it), so auto picks fused where
    the kernels run; models trained in one launch must share it."""
    from grokfast.backends import fused_training_gap
    from grokfast.kernels import KernelConfigError
    from grokfast.kernels.optimizer import FusedOptimizer
    assert fused_training_gap(TrainConfig(orthograd=True)) is None
    with pytest.raises(KernelConfigError, match="share orthograd"):
        FusedOptimizer.from_configs([TrainConfig(orthograd=True), TrainConfig()], 10, segments=[10])


def test_fused_backend_runs_stablemax():
    """The loss kernel computes StableMax (tests/test_kernels_stablemax.py): the fused backend takes it, and auto
    picks fused wherever it would for cross-entropy."""
    from grokfast.backends import fused_training_gap, resolve_backend
    from grokfast.kernels.optimizer import unsupported_training
    assert unsupported_training(TrainConfig(loss="stablemax")) is None
    assert fused_training_gap(TrainConfig(loss="stablemax")) is None
    cfg = TINY.for_task(grokfast.Task("x+y", p=7, frac=0.5))
    for name in ("fused", "auto"):
        assert (resolve_backend(name, cfg, "cpu", TrainConfig(loss="stablemax"))[0]
                == resolve_backend(name, cfg, "cpu", TrainConfig())[0])


def test_fused_optimizer_takes_the_matched_lr():
    from grokfast.kernels.optimizer import FusedOptimizer, unsupported_training
    cfgs = [TrainConfig(lr=1e-3, lamb=2.0, lr_matched=True), TrainConfig(lr=1e-3, lamb=5.0)]
    assert unsupported_training(cfgs[0]) is None
    opt = FusedOptimizer.from_configs(cfgs, 10)
    assert opt.lr.tolist() == pytest.approx([3e-3, 1e-3], rel=1e-7)


def test_sweeps_take_the_methods_as_axes_and_keep_old_run_ids():
    from grokfast import sweep as S
    from grokfast.sweep.runs import _identity
    runs = S.expand(S.SweepSpec(preset="small", grid={"orthograd": [False, True], "lr_matched": [False, True],
                                                      "lamb": [2.0, 5.0]}, fixed={"steps": 10}))
    assert len(runs) == 6      # lamb matters to lr-matched runs only: 1 + 1 + 2 + 2
    assert {(r.train.orthograd, r.train.lr_matched, r.train.lamb) for r in runs} == {
        (o, True, l) for o in (False, True) for l in (2.0, 5.0)} | {(o, False, 2.0) for o in (False, True)}
    assert S.parse_grid_arg("optimizer=adamw,muon") == ("optimizer", ["adamw", "muon"])
    assert S.parse_grid_arg("orthograd=true,false") == ("orthograd", [True, False])
    # a run that uses none of the new settings has the identity (and so the run id) it had before them
    # (optimizer was in the identity before: it stays)
    r = runs[0]
    new = {"loss", "orthograd", "lr_matched", "muon_lr", "muon_momentum"}
    assert not new & set(_identity(r.task, r.model, r.train)["train"])


def test_a_plain_runs_id_is_the_one_it_had_before_the_new_settings():
    """The run id of a sweep run that uses none of the settings added since (Furuta's model quirks, rng,
    compare's methods) is the id sweeps gave it before them (computed at commit c505683: small preset, steps
    10, seed 0), so an earlier sweep resumes instead of redoing its runs."""
    from grokfast import sweep as S
    run = S.expand(S.SweepSpec(preset="small", fixed={"steps": 10}))[0]
    assert run.run_id == "seed0-0dcacf7e"
    nanda = S.expand(S.SweepSpec(preset="nanda", fixed={"steps": 10, "lr": 3e-3}))[0]
    assert nanda.run_id == "seed0-7c40d954"
