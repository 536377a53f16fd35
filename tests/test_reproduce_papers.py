"""`grokfast reproduce nanda|power|furuta`: each verdict function on made-up numbers both ways, and each
reproduction end to end on a tiny stand-in of its preset and task (the real ones take minutes)."""
import dataclasses
import importlib
import json

import pytest

import grokfast

N = importlib.import_module("grokfast.reproduce_nanda")
P = importlib.import_module("grokfast.reproduce_power")
F = importlib.import_module("grokfast.reproduce_furuta")

PHASES = ("memorisation", "circuit formation", "clean-up")


def ends(*steps):
    return dict(zip(PHASES, steps))


def test_nanda_verdicts_full_run_both_ways():
    v = N.nanda_verdicts(ends(1500, 9000, 15000), [14, 35, 41, 42, 52], quick=False)
    assert all(ok for ok, _ in v.values())
    v = N.nanda_verdicts(ends(1500, 9000, 40000), [3], quick=False)       # 40k > 2 x 14k; one frequency
    assert not v["grok"][0] and not v["key_freqs"][0] and not v["phases"][0]
    assert "clean-up" in v["phases"][1]
    v = N.nanda_verdicts(ends(1500, None, None), None, quick=False)
    assert not v["grok"][0] and not v["key_freqs"][0] and "circuit formation" in v["phases"][1]


def test_nanda_verdicts_quick_run_both_ways():
    v = N.nanda_verdicts(ends(50, 300, 400), [2, 5, 9], quick=True)
    assert all(ok for ok, _ in v.values())
    v = N.nanda_verdicts(ends(50, 300, 100), [2, 5, 9], quick=True)       # 2x memorisation: not delayed; out of order
    assert not v["grok"][0] and not v["phases"][0] and v["key_freqs"][0]
    assert not N.nanda_verdicts(ends(50, 40, 400), list(range(9)), quick=True)["key_freqs"][0]


def test_power_verdict_both_ways():
    assert P.power_verdict({0.3: None, 0.5: 4000, 0.7: 900})[0]
    assert P.power_verdict({0.3: 5000, 0.5: 5200, 0.7: 900})[0]            # within the 1.1x slack
    ok, why = P.power_verdict({0.3: 900, 0.5: 4000, 0.7: 1000})
    assert not ok and "0.5" in why
    assert not P.power_verdict({0.3: 900, 0.5: None})[0]                   # a larger fraction never generalised
    ok, why = P.power_verdict({0.3: None, 0.5: None, 0.7: 800})
    assert not ok and "only 1 of 3" in why


def test_furuta_verdicts_both_ways():
    good = {"x+y": dict(test_acc=1.0, ffs=0.1, fcr=0.5, gradient_symmetricity=0.9),
            "x-y": dict(test_acc=1.0, ffs=0.1, fcr=0.5, gradient_symmetricity=0.2),
            "x*y": dict(test_acc=0.995, ffs=0.8, fcr=0.7, gradient_symmetricity=0.9),
            "(x+y)^2": dict(test_acc=1.0, ffs=0.1, fcr=0.5, gradient_symmetricity=0.9)}
    assert all(ok for ok, _ in F.furuta_verdicts(good).values())
    bad = {k: dict(v) for k, v in good.items()}
    bad["x-y"]["gradient_symmetricity"] = 0.95                           # as symmetric as addition
    bad["x*y"]["fcr"] = 0.4                                               # sine-biased
    bad["(x+y)^2"]["test_acc"] = 0.5                                      # not grokked
    v = F.furuta_verdicts(bad)
    assert v["x+y"][0] and not v["x-y"][0] and not v["x*y"][0] and not v["(x+y)^2"][0]
    assert not F.furuta_verdicts(dict(good, **{"x*y": dict(good["x*y"], ffs=0.05)}))["x*y"][0]   # sparser than x+y


def tiny(name):
    real = grokfast.preset(name)
    return dataclasses.replace(real, model=dataclasses.replace(real.model, d_model=32, n_heads=2, d_head=16, d_mlp=64))


def check_written(out, files):
    for f in ("report.txt", "result.json", "curves.png", *files):
        assert (out / f).exists(), f
    saved = json.loads((out / "result.json").read_text())
    assert saved["rows"] and all({"what", "paper", "ours", "verdict"} <= set(r) for r in saved["rows"])
    return saved


def test_reproduce_nanda_end_to_end_on_a_tiny_stand_in(tmp_path, monkeypatch):
    monkeypatch.setattr(N, "get_preset", lambda name: tiny("nanda"))
    monkeypatch.setitem(N.NANDA_RUNS, True, dict(op="x+y", p=7, frac=0.6, steps=20, lr=3e-3, wd=2.0, eval_every=5,
                                                 checkpoint_every=10))
    drawn = []   # the figures are grokfast.analyze's (tested in test_analysis.py): recorded, not drawn here
    monkeypatch.setattr(N, "write_analysis", lambda a: drawn.append((a.run_dir.name, [r["step"] for r in a.measure_rows])))
    res = grokfast.reproduce("nanda", quick=True, out=tmp_path / "out", threads=1, log=lambda m: None)
    saved = check_written(tmp_path / "out", ("seed0/metrics.jsonl", "seed0/summary.json"))
    assert drawn == [("seed0", [10, 20])]                                # the measures of every checkpoint
    assert [r["what"].split(",")[0] for r in res["rows"]] == [
        "steps to grok (test accuracy >= 99%)", "key frequencies", "phase ends (memorisation"]
    assert res["verdict"] is False and "NOT reproduced" in res["report"]   # 20 steps do not grok
    assert "14, 35, 41, 42, 52" in res["report"] and saved["quick"] is True
    cfg = json.loads((tmp_path / "out" / "seed0" / "config.json").read_text())
    assert cfg["model"]["unembed_all_tokens"] and cfg["train"]["warmup_schedule"] == "lambdalr"


def test_reproduce_power_end_to_end_on_a_tiny_stand_in(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "get_preset", lambda name: tiny("power"))
    monkeypatch.setitem(P.POWER_RUNS, True, dict(op="x/y", p=7, fracs=(0.5, 0.8), steps=10, lr=1e-3, wd=1.0,
                                                 eval_every=5))
    res = grokfast.reproduce("power", quick=True, out=tmp_path / "out", threads=1, log=lambda m: None)
    saved = check_written(tmp_path / "out", ("frac0.5-seed0/metrics.jsonl", "frac0.8-seed0/summary.json"))
    assert [r["frac"] for r in saved["runs"]] == [0.5, 0.8] and saved["runs"][0]["batch_size"] == 11   # min(512, ceil(21 / 2))
    assert res["verdict"] is False and "only 0 of 2" in res["report"]
    assert json.loads((tmp_path / "out" / "frac0.5-seed0" / "config.json").read_text())["train"]["minibatches"] == "epoch"


def test_reproduce_furuta_end_to_end_on_a_tiny_stand_in(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "get_preset", lambda name: tiny("furuta"))
    monkeypatch.setitem(F.FURUTA_RUNS, True, dict(p=5, frac=0.6, steps=10, lr=3e-3, wd=2.0, eval_every=5))
    drawn = []   # the per-run figures are grokfast.analyze's (tested in test_analysis.py): recorded, not drawn here
    monkeypatch.setattr(F, "write_analysis", lambda a: drawn.append(a.run_dir.name))
    res = grokfast.reproduce("furuta", quick=True, out=tmp_path / "out", threads=1, log=lambda m: None)
    saved = check_written(tmp_path / "out", ("x+y-seed0/metrics.jsonl", "x*y-seed0/summary.json", "x+y2-seed0/config.json"))
    assert drawn == ["x+y-seed0", "x-y-seed0", "x*y-seed0", "x+y2-seed0"]
    assert [r["what"].split(" mod")[0] for r in res["rows"]] == list(F.FURUTA_OPS)
    assert {r["op"] for r in saved["runs"]} == set(F.FURUTA_OPS)
    assert all(0 <= r["ffs"] <= 1 and 0 <= r["fcr"] <= 1 for r in saved["runs"])
    cfg = json.loads((tmp_path / "out" / "x-y-seed0" / "config.json").read_text())
    assert not cfg["model"]["pos_embed"] and cfg["model"]["d_vocab"] == 5 + 5 and cfg["task"]["layout"] == "a op b"
