"""`grokfast import`: the pizza repo's saved models and HookedTransformer state dicts become run directories
that `grokfast analyze` reads. The tests write such files themselves, in the papers' layouts (the pizza
model restated in tests/test_paper_presets.py), and check the conversion by the logits on every pair
(float64) and the accuracy; report.md's verdict is checked on a fresh, a memorising and a grokked model."""
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

import grokfast
from grokfast import ModelConfig, Task, Transformer, importers, measures as M
from grokfast.analyze import analyze_run, _report_text
from grokfast.cli import main
from test_analysis import hand_built
from test_paper_presets import PizzaPaper

TOL = 1e-10


def pizza_files(tmp_path, state: dict, p: int, alpha: float, rid="t3st", **cfg_over):
    """model_<rid>.pt (their key names) and config_<rid>.json as code/save holds them."""
    cfg = {"name": f"modadd_{p}", "funcs": f"lambda x: (x[0]+x[1])%{p}", "C": p, "n_heads": 4, "d_model": 16,
           "n_layers": 1, "attention_dir": "casual", "act_fn": "ReLU", "epoch": 20000, "batch_size": p * p,
           "lr": 0.001, "weight_decay": 2.0, "frac": 0.8, "attn_coeff": alpha, "runid": rid, "diff_vocab": 0,
           "eqn_sign": 0, "func": None, **cfg_over}
    torch.save(state, tmp_path / f"model_{rid}.pt")
    (tmp_path / f"config_{rid}.json").write_text(json.dumps(cfg))
    return tmp_path / f"model_{rid}.pt"


def theirs_state(t: PizzaPaper) -> dict:
    s = {"embed.W_E": t.W_E, "pos_embed.W_pos": t.W_pos, "blocks.0.attn.W_K": t.W_K, "blocks.0.attn.W_Q": t.W_Q,
         "blocks.0.attn.W_V": t.W_V, "blocks.0.attn.W_O": t.W_O, "blocks.0.attn.mask": torch.tril(torch.ones(2, 2)),
         "blocks.0.mlp.W_in": t.W_in, "blocks.0.mlp.b_in": t.b_in, "blocks.0.mlp.W_out": t.W_out,
         "blocks.0.mlp.b_out": t.b_out, "unembed.W_U": t.W_U}
    return {k: v.detach().float().clone() for k, v in s.items()}


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_pizza_file_imports_as_the_same_function(tmp_path, alpha):
    p = 11
    torch.manual_seed(3)
    theirs = PizzaPaper(alpha, p=p, d=16, heads=4, d_mlp=64)
    with torch.no_grad():
        theirs.b_in.normal_(), theirs.b_out.normal_()
    f = pizza_files(tmp_path, theirs_state(theirs), p, alpha)
    model, task, acc, out = importers.import_model("pizza", f, tmp_path / "run")
    theirs = theirs.float().double()     # the file's float32 values, both sides in float64
    allp = task.all_pairs()
    with torch.no_grad():
        want = theirs(allp.tokens)[:, -1]
        got = model.double()(allp.tokens)
    assert (got - want).abs().max().item() < TOL
    assert acc == pytest.approx(float((want.argmax(-1) == allp.labels).double().mean()), abs=0)
    assert model.cfg.attn_alpha == alpha and task.layout == "a b" and task.op == "x+y"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["imported"]["split_known"] is False and cfg["imported"]["accuracy_all_pairs"] == acc
    assert grokfast.load_model(out)[2] == 20000


def to_theirs(m: Transformer) -> dict:
    """Our weights in the pizza repo's layout (the inverse of the importer's mapping)."""
    s = m.state_dict()
    H, D, Dh = s["blocks.0.attn.W_Q"].shape
    return {"embed.W_E": s["embed.W_E"].T.clone(), "pos_embed.W_pos": s["pos_embed.W_pos"].clone(),
            "blocks.0.attn.W_Q": s["blocks.0.attn.W_Q"].transpose(1, 2).clone(),
            "blocks.0.attn.W_K": s["blocks.0.attn.W_K"].transpose(1, 2).clone(),
            "blocks.0.attn.W_V": s["blocks.0.attn.W_V"].transpose(1, 2).clone(),
            "blocks.0.attn.W_O": s["blocks.0.attn.W_O"].reshape(H * Dh, D).T.clone(),
            "blocks.0.mlp.W_in": s["blocks.0.mlp.W_in"].T.clone(), "blocks.0.mlp.b_in": s["blocks.0.mlp.b_in"].clone(),
            "blocks.0.mlp.W_out": s["blocks.0.mlp.W_out"].T.clone(), "blocks.0.mlp.b_out": s["blocks.0.mlp.b_out"].clone(),
            "unembed.W_U": s["unembed.W_U"].clone()}


def test_a_grokked_pizza_imports_and_analyzes_as_grokked(tmp_path, capsys):
    """The hand-built pizza (constant attention) saved in their layout with their '=' token (eqn_sign):
    every pair right, and `grokfast analyze` reads it as a grokked pizza."""
    p = 23
    m = hand_built(p, [4, 9], "pizza")
    state = to_theirs(m)
    state["unembed.W_U"] = torch.cat([state["unembed.W_U"], torch.zeros(state["unembed.W_U"].shape[0], 1)], 1)
    f = pizza_files(tmp_path, state, p, 0.0, rid="gr0k", eqn_sign=1, d_model=m.cfg.d_model)
    assert main(["import", "pizza", str(f), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "accuracy on every pair: 1.00000" in out and "gradient symmetricity" in out
    assert main(["analyze", str(tmp_path / "run"), "--quiet"]) == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "**Verdict:** grokked (accuracy 100.0% over every pair (the train split is not known)" in report
    assert "**Algorithm (clock or pizza):** pizza" in report
    for fig in ("embedding_probes", "neuron_surface", "adding_units", "logit_spectrum"):
        assert f"figures/{fig}.png" in report


def test_pizza_refusals_are_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    state = theirs_state(PizzaPaper(0.0, p=7, d=16, heads=4, d_mlp=64))
    for over, words in (({"n_layers": 2}, "2 layers"), ({"diff_vocab": 1}, "diff_vocab"),
                        ({"funcs": "lambda x: (x[0]**2+x[1])%7"}, "funcs"), ({"act_fn": "Tanh"}, "act_fn")):
        d = tmp_path / words.replace(" ", "_")
        d.mkdir()
        f = pizza_files(d, state, 7, 0.0, **over)
        assert main(["import", "pizza", str(f), "--out", str(d / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1
        assert not (d / "run").exists()
    (tmp_path / "lin").mkdir()
    (tmp_path / "lin" / "config_x.json").write_text(json.dumps({"C": 59, "model_type": "D"}))
    torch.save(state, tmp_path / "lin" / "model_x.pt")
    assert main(["import", "pizza", str(tmp_path / "lin" / "model_x.pt"), "--out", str(tmp_path / "r")]) == 2
    assert "linear models" in capsys.readouterr().err


def tl_state(m: Transformer, b_U=None) -> dict:
    """A HookedTransformer state_dict as TransformerLens writes it: our names, plus its buffers and zero biases."""
    s = {k: v.clone() for k, v in m.state_dict().items()}
    c = m.cfg
    for l in range(c.n_layers):
        b = f"blocks.{l}.attn."
        s[b + "mask"] = torch.tril(torch.ones(c.n_ctx, c.n_ctx, dtype=torch.bool))
        s[b + "IGNORE"] = torch.tensor(-1e5)
        for n, shape in (("b_Q", (c.n_heads, c.d_head)), ("b_K", (c.n_heads, c.d_head)), ("b_V", (c.n_heads, c.d_head)),
                         ("b_O", (c.d_model,))):
            s.setdefault(b + n, torch.zeros(shape))
    s["unembed.b_U"] = torch.zeros(c.d_vocab_out) if b_U is None else b_U
    return s


@pytest.mark.parametrize("case", ["1 layer", "2 layers LayerNorm gelu"])
def test_transformer_lens_state_dict_imports_as_the_same_function(tmp_path, case):
    task = Task("x-y", 11, 0.5, 0)
    if case == "1 layer":
        mc, tl_cfg = ModelConfig(d_model=16, n_heads=2, d_head=8, d_mlp=32), {"act_fn": "relu", "normalization_type": None}
    else:
        mc = ModelConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, act="gelu", layernorm=True)
        tl_cfg = {"act_fn": "gelu", "normalization_type": "LN"}
    m = Transformer(mc.for_task(task), seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for q in m.parameters():
            q.add_(0.1 * torch.randn(q.shape, generator=g))
    b_U = 0.3 * torch.randn(11, generator=g)
    torch.save({"state_dict": tl_state(m, b_U), "config": tl_cfg}, tmp_path / "tl.pt")
    assert main(["import", "transformer_lens", str(tmp_path / "tl.pt"), "--op", "x-y", "--out", str(tmp_path / "run")]) == 0
    model, t2, _ = grokfast.load_model(tmp_path / "run")
    assert model.cfg.unembed_bias and not model.cfg.attn_bias and model.cfg.act == mc.act and t2.op == "x-y"
    allp = task.all_pairs()
    with torch.no_grad():
        want = m.double()(allp.tokens) + b_U.double()
        got = model.double()(allp.tokens)
    assert (got - want).abs().max().item() < TOL
    # the activation is not in a bare state dict: without the config, gelu must be asked for
    torch.save(tl_state(m.float(), b_U), tmp_path / "bare.pt")
    model2, _, _, _ = importers.import_model("transformer_lens", tmp_path / "bare.pt", tmp_path / "run2", op="x-y")
    assert model2.cfg.act == "relu"


def test_transformer_lens_round_trip_through_a_real_hooked_transformer(tmp_path):
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError as e:
        pytest.skip(f"optional extra [lens] not installed: {e}"[:120])
    task = Task("x+y", 13, 0.5, 0)
    m = Transformer(ModelConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, layernorm=True).for_task(task), seed=4)
    ht = grokfast.to_hooked_transformer(m)
    torch.save(ht.state_dict(), tmp_path / "ht.pt")
    (tmp_path / "cfg.json").write_text(json.dumps({"act_fn": ht.cfg.act_fn, "normalization_type": ht.cfg.normalization_type}))
    model, _, acc, _ = importers.import_model("transformer_lens", tmp_path / "ht.pt", tmp_path / "run",
                                              config=tmp_path / "cfg.json", op="x+y")
    allp = task.all_pairs()
    with torch.no_grad():
        assert (model.double()(allp.tokens) - m.double()(allp.tokens)).abs().max().item() < TOL


@pytest.fixture(scope="module")
def memorised_run(tmp_path_factory):
    """x+y mod 19, 30% train, weight decay 0: every train pair right by step 50, test accuracy about 2%
    (measured: 0.024 at steps 50-300 on this machine, 2026-12-02); 100 steps take about 1 s."""
    out = tmp_path_factory.mktemp("mem") / "run"
    task = Task("x+y", 19, 0.3, seed=0)
    run = grokfast.train(task, ModelConfig(d_model=32, n_heads=4, d_head=8, d_mlp=128), grokfast.preset("small").train,
                         out=out, progress=False, log=lambda m: None, steps=100, lr=1e-2, wd=0.0, eval_every=25,
                         checkpoint_every=100)
    assert run.history[-1]["train_acc"] == 1.0 and run.history[-1]["test_acc"] < 0.2
    return out


def _report(run_dir) -> str:
    """report.md's text as `grokfast analyze` writes it, without drawing the figures (the slow part; the
    grokked case above draws them)."""
    a = analyze_run(run_dir)
    return _report_text(a, {}, Path("figures"))


def _verdict(report: str) -> str:
    return next(l for l in report.splitlines() if l.startswith("**Verdict:**"))


def test_report_says_memorising_for_a_memorised_run(memorised_run):
    report = _report(memorised_run)
    assert _verdict(report).startswith("**Verdict:** memorising (train accuracy 100.0%")
    rows = [l for l in report.splitlines() if l.startswith("| embedding probes |") or l.startswith("| neuron surface |")
            or l.startswith("| units that add |") or l.startswith("| logit spectrum |")]
    assert len(rows) == 4 and all(r.endswith("| memorising |") for r in rows)


def test_report_says_untrained_for_a_fresh_model(tmp_path):
    task = Task("x+y", 19, 0.3, seed=0)
    importers.write_run_dir(tmp_path / "fresh", Transformer(ModelConfig(d_model=32, n_heads=4, d_head=8, d_mlp=128)
                                                            .for_task(task), seed=7), task)
    line = _verdict(_report(tmp_path / "fresh"))
    assert line.startswith("**Verdict:** untrained") and "grokked" not in line and "memorising" not in line
    with pytest.raises(grokfast.ConfigError, match="already holds a run"):
        importers.write_run_dir(tmp_path / "fresh", Transformer(ModelConfig(d_model=16, n_heads=2, d_head=8,
                                                                            d_mlp=16).for_task(task)), task)


MIRROR = "/work/.mirror/fjzzq2002+pizza/repo"


@pytest.mark.skipif(not os.path.isdir(MIRROR), reason="the pizza repo's mirror (its real saved models) is not here")
def test_the_papers_model_a_gives_its_published_measures(tmp_path):
    """code/save/model_p99zdpze5l.pt, the constant-attention model A of Zhong et al.: their notebook printed
    gradient symmetricity 0.99367, distance irrelevance 0.17174, circularity 0.99782 and L2 norm 22.854."""
    for kind, ext in (("model", "pt"), ("config", "json")):
        data = subprocess.run(["git", f"--git-dir={MIRROR}", "show", f"HEAD:code/save/{kind}_p99zdpze5l.{ext}"],
                              capture_output=True, check=True).stdout
        (tmp_path / f"{kind}_p99zdpze5l.{ext}").write_bytes(data)
    model, task, acc, _ = importers.import_model("pizza", tmp_path / "model_p99zdpze5l.pt", tmp_path / "run")
    assert acc == 1.0
    z = M.zhong_notebook_measures(model, task)
    assert round(z["gradient_symmetricity"], 5) == 0.99367
    assert round(z["distance_irrelevance"], 5) == 0.17174
    assert round(z["circularity"], 5) == 0.99782
    assert round(math.sqrt(sum(float((q.detach().double() ** 2).sum()) for q in model.parameters())), 3) == 22.854


def test_transformer_lens_refusals_are_one_line(tmp_path, capsys):
    torch.save({"embed.W_E": torch.zeros(8, 4)}, tmp_path / "no_blocks.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    m = Transformer(ModelConfig(d_model=16, n_heads=2, d_head=8, d_mlp=16).for_task(Task("x+y", 7, 0.5, 0)))
    torch.save(tl_state(m), tmp_path / "ok.pt")
    for argv, words in (([str(tmp_path / "no_blocks.pt")], "not a HookedTransformer state dict"),
                        ([str(tmp_path / "list.pt")], "not a state dict"),
                        ([str(tmp_path / "junk.pt")], "weights_only"),
                        ([str(tmp_path / "nope.pt")], "is not a file"),
                        ([str(tmp_path / "ok.pt"), "--p", "11"], "pass --p, --op or --layout"),
                        ([str(tmp_path / "ok.pt"), "--config", str(tmp_path / "c.json")], None)):
        if words is None:   # a config that asks for what grokfast's Transformer has not
            (tmp_path / "c.json").write_text(json.dumps({"positional_embedding_type": "rotary"}))
            words = "positional_embedding_type"
        assert main(["import", "transformer_lens", *argv, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
