"""`grokfast reproduce`: the listing, argument errors, and the grokfast reproduction end to end on a tiny
stand-in for the preset (the real one takes minutes), with a stand-in for the paper's main.py that has
the two lines the side-by-side harness hooks into."""
import dataclasses
import importlib
import json

import pytest

import grokfast
from grokfast.cli import main
from grokfast.config import ConfigError, TaskSpec

R = importlib.import_module("grokfast.reproduce")   # the module; grokfast.reproduce is its function

FAKE_MAIN = '''
import argparse


class Valid:
    shape = [2]


def main(args):
    val_acc, i, valid_data = [], 0, Valid()
    for e in range(int(args.budget) // 10):
        i += 10
        total_acc = 0.5 * e
        val_acc.append(total_acc / valid_data.shape[-1])
    print("never reached")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    for a in ("--label", "--seed", "--budget", "--filter", "--alpha", "--lamb", "--weight_decay", "--window_size"):
        p.add_argument(a)
    main(p.parse_args())
'''


def test_list_names_each_reproduction_with_cpu_and_gpu_time(capsys):
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    for name in R.REPRODUCTIONS:
        assert f"{name}:" in out
    assert "CPU" in out and "GPU" in out


@pytest.mark.parametrize("argv,msg", [(["reproduce"], "name a reproduction"),
                                      (["reproduce", "nope"], "unknown reproduction"),
                                      (["reproduce", "grokfast", "--seeds", "a"], "--seeds"),
                                      (["reproduce", "grokfast", "--paper-code", "/nonexistent"], "--paper-code"),
                                      (["reproduce", "grokfast", "--filters", "ema,sgd"], "--filters"),
                                      (["reproduce", "pizza", "--filters", "ema"], "--filters")])
def test_bad_arguments_are_one_line_and_status_2(capsys, argv, msg):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("grokfast: error:") and msg in err[-1]


def test_paper_code_harness_adds_only_a_clock_and_a_stop(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "main.py").write_text(FAKE_MAIN)
    (tmp_path / "repo" / "grokfast.py").write_text("")
    patched = R._patched_paper_main(tmp_path / "repo", tmp_path / "run").read_text()
    added = set(patched.splitlines()) - set(FAKE_MAIN.splitlines())
    assert len(added) == 4 and all("_repro" in l or l.strip() in ("return",) or "0.95" in l for l in added)
    r = R._paper_one("ema", 0, tmp_path / "repo", 1, 100, log=lambda m: None)
    assert r["steps_to_95"] == 50 and r["seconds_to_95"] >= 0          # e = 4: 0.5 * 4 / 2 = 1.0, i = 50
    (tmp_path / "repo" / "main.py").write_text("print('hi')\n")
    with pytest.raises(ConfigError, match="does not look like"):
        R._patched_paper_main(tmp_path / "repo", tmp_path / "run2")


def test_reproduce_grokfast_end_to_end_on_a_tiny_stand_in(tmp_path, monkeypatch):
    real = grokfast.preset("grokfast")
    tiny = dataclasses.replace(
        real, task=TaskSpec("x*y | y!=0", 11, 0.5, "a op b ="),
        model=dataclasses.replace(real.model, d_model=32, n_heads=2, d_head=16, d_mlp=64),
        train=dataclasses.replace(real.train, batch_size=16))
    monkeypatch.setattr(R, "get_preset", lambda name: tiny)
    monkeypatch.setattr(R, "GROKFAST_CAP", 50)
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "main.py").write_text(FAKE_MAIN)
    (tmp_path / "repo" / "grokfast.py").write_text("")
    res = grokfast.reproduce("grokfast", seeds=[0], out=tmp_path / "out", paper_code=tmp_path / "repo", threads=1,
                             log=lambda m: None)
    out = tmp_path / "out"
    for f in ("report.txt", "result.json", "curves.png", "ema-seed0/config.json", "ma-seed0/metrics.jsonl",
              "baseline-seed0/summary.json"):
        assert (out / f).exists(), f
    saved = json.loads((out / "result.json").read_text())
    assert saved["paper_code_runs"]["ema"][0]["steps_to_95"] == 50
    assert json.loads((out / "ema-seed0" / "config.json").read_text())["train"]["optimizer"] == "adam"
    assert isinstance(res["verdict"], bool) and "paper's code, here" in res["report"]
    assert [r["what"].split(":")[0] for r in res["rows"]] == ["Grokfast-EMA", "Grokfast-MA", "baseline (no filter)"]
    with pytest.raises(ConfigError, match="already holds"):
        grokfast.reproduce("grokfast", seeds=[0], out=out)
    ema = grokfast.reproduce("grokfast", seeds=[0], out=tmp_path / "ema", paper_code=tmp_path / "repo", threads=1,
                             log=lambda m: None, filters=["ema"])                 # --filters ema: that row alone
    assert [r["what"].split(":")[0] for r in ema["rows"]] == ["Grokfast-EMA"]
    assert sorted(p.name for p in (tmp_path / "ema").iterdir() if p.is_dir()) == ["ema-seed0"]
    assert "seed 0: " in ema["rows"][0]["per_seed"] and "seed by seed" in ema["report"]


def test_reproduce_pizza_end_to_end_on_a_tiny_stand_in(tmp_path, monkeypatch):
    real = grokfast.preset("pizza")
    tiny = dataclasses.replace(real, task=TaskSpec("x+y", 13, 0.8, "a b"),
                               model=dataclasses.replace(real.model, d_model=32, n_heads=2, d_head=16, d_mlp=64))
    monkeypatch.setattr(R, "get_preset", lambda name: tiny)
    monkeypatch.setattr(R, "PIZZA_STEPS", {False: 20, True: 20})
    res = grokfast.reproduce("pizza", quick=True, out=tmp_path / "out", threads=1, log=lambda m: None)
    assert [r["what"].split(",")[0] for r in res["rows"]] == ["attention rate 0", "attention rate 1"]
    assert res["verdict"] is False and "NOT reproduced" in res["report"]      # 20 steps do not grok
    for f in ("report.txt", "result.json", "curves.png", "alpha0-seed0/metrics.jsonl", "alpha1-seed0/config.json"):
        assert (tmp_path / "out" / f).exists(), f
    assert json.loads((tmp_path / "out" / "alpha0-seed0" / "config.json").read_text())["model"]["attn_alpha"] == 0.0
