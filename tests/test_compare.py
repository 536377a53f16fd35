"""`grokfast compare`: methods x seeds on one tiny task end to end, its table against the runs, resume after
an interruption, and bad input."""

import pytest

import grokfast
from grokfast import rundir
from grokfast.cli import main
from grokfast.compare import CompareSpec, expand, markdown_table, parse_method, summarize
from grokfast.config import ConfigError
from grokfast.sweep import sequential
from grokfast.train import Interrupted

TINY = ["--preset", "small", "--op", "x+y", "--p", "11", "--frac", "0.6", "--d-model", "32", "--n-heads", "2",
        "--d-head", "16", "--d-mlp", "64", "--steps", "40", "--eval-every", "5", "--lr", "1e-2", "--wd", "1"]
TINY_FIXED = dict(op="x+y", p=11, frac=0.6, d_model=32, n_heads=2, d_head=16, d_mlp=64, steps=40, eval_every=5,
                  lr=1e-2, wd=1.0)
QUIET = dict(log=lambda m: None, device="cpu")


def test_compare_end_to_end_on_a_tiny_task(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compare", *TINY, "--seeds", "0,1", "--method", "adamw", "--method", "orthograd:wd=0",
                 "--method", "lr-matched", "--method", "muon", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| method | grokked |") and "table: " in printed
    for f in ("compare.json", "results.json", "results.csv", "table.md", "table.csv", "table.json", "curves.png"):
        assert (out / f).exists(), f
    rows = rundir.read_json(out / "results.json")["rows"]
    assert [(r["point.method"], r["point.seed"]) for r in rows] == [
        (m, s) for m in ("adamw", "orthograd:wd=0", "lr-matched", "muon") for s in (0, 1)]
    # each run trained with its method's settings over the shared task settings
    for r in rows:
        cfg = rundir.read_json(out / "runs" / r["run_id"] / "config.json")
        t = cfg["train"]
        assert (cfg["task"]["p"], cfg["model"]["d_model"], t["steps"], t["lr"], t["seed"]) == (11, 32, 40, 1e-2,
                                                                                            r["point.seed"])
        m = r["point.method"]
        assert t["orthograd"] == (m == "orthograd:wd=0") and t["lr_matched"] == (m == "lr-matched")
        assert t["wd"] == (0.0 if m.startswith("orthograd") else 1.0)
        assert t["optimizer"] == ("muon" if m == "muon" else "adamw") and t["stop_at_grok"]
        # the row is the run's own summary
        s = rundir.read_json(out / "runs" / r["run_id"] / "summary.json")
        assert r["steps_to_grok"] == s["steps_to_grok"] and r["steps_to_memorize"] == s["steps_to_memorize"]
    # the table: per method, the lower median (not reached = infinity) and min/max of what was reached
    table = rundir.read_json(out / "table.json")["methods"]
    assert [t["method"] for t in table] == ["adamw", "orthograd:wd=0", "lr-matched", "muon"]
    for t in table:
        mine = [r for r in rows if r["point.method"] == t["method"]]
        assert t["runs"] == 2 and t["grokked"] == sum(r["steps_to_grok"] is not None for r in mine)
        for k in ("steps_to_memorize", "steps_to_grok", "seconds_to_grok"):
            vals = [r[k] for r in mine]
            got = [v for v in vals if v is not None]
            want_med = min(got) if got else None     # the lower median of two: the smaller (not reached = inf)
            assert t[k]["median"] == want_med, (t["method"], k)
            assert (t[k]["min"], t[k]["max"]) == ((min(got), max(got)) if got else (None, None))
    assert (out / "table.md").read_text() == markdown_table(table, CompareSpec.from_dict(
        rundir.read_json(out / "compare.json")))


def test_table_marks_runs_that_did_not_get_there():
    spec = CompareSpec("small", ["adamw", "ema"], [0, 1, 2], {})
    rows = []
    for m, grok in (("adamw", [None, None, 900]), ("ema", [300, 500, None])):
        for s, g in enumerate(grok):
            rows.append({"point.method": m, "steps": 1000, "steps_to_grok": g, "seconds_to_grok": g and g / 100,
                         "steps_to_memorize": 50, "seconds_to_memorize": 0.5})
    summ = summarize(spec, rows)
    assert summ[0]["steps_to_grok"] == {"median": None, "min": 900, "max": 900, "reached": 1, "runs": 3}
    assert summ[1]["steps_to_grok"] == {"median": 500, "min": 300, "max": 500, "reached": 2, "runs": 3}
    md = markdown_table(summ, spec).splitlines()
    assert md[2] == "| adamw | 1/3 | 50 [50, 50] | 0.5 [0.5, 0.5] | > 1000 [900, > 1000] | n/a [9.0, 9.0+] |"
    assert md[3] == "| ema | 2/3 | 50 [50, 50] | 0.5 [0.5, 0.5] | 500 [300, > 1000] | 5.0 [3.0, 5.0+] |"


def test_interrupted_compare_resumes_without_redoing_finished_runs(tmp_path, monkeypatch):
    methods = ["adamw", "ema"]
    whole = grokfast.compare(methods, [0, 1], preset="small", out=tmp_path / "whole", figures=False, **QUIET,
                             **TINY_FIXED)
    real, calls = sequential.train_one, []

    def stop_on_third(r, *a, **kw):
        calls.append(r.run_id)
        if len(calls) == 3:
            raise Interrupted(0, tmp_path / "part")
        return real(r, *a, **kw)

    monkeypatch.setattr(sequential, "train_one", stop_on_third)
    with pytest.raises(Interrupted):
        grokfast.compare(methods, [0, 1], preset="small", out=tmp_path / "part", figures=False, **QUIET, **TINY_FIXED)
    assert len(rundir.read_json(tmp_path / "part" / "results.json")["rows"]) == 2
    calls.clear()
    resumed = grokfast.compare(resume=tmp_path / "part", figures=False, **QUIET)
    assert calls == [r["run_id"] for r in whole.rows[2:]]          # only the unfinished runs trained again
    keys = ("run_id", "steps_to_grok", "steps_to_memorize", "final_test_acc", "final_train_loss", "steps_done")
    assert [[r[k] for k in keys] for r in resumed.rows] == [[r[k] for k in keys] for r in whole.rows]
    with pytest.raises(ConfigError, match="already holds a comparison"):
        grokfast.compare(methods, [0], preset="small", out=tmp_path / "part", **QUIET)


def test_methods_defaults_and_settings():
    assert parse_method("ema") == ("ema", {})
    assert parse_method("ema:lamb=5, alpha=0.9") == ("ema", {"lamb": 5.0, "alpha": 0.9})
    assert parse_method("orthograd:wd=0,lr=0.01") == ("orthograd", {"wd": 0.0, "lr": 0.01})
    runs = expand(CompareSpec("small", ["ema", "ma", "lr-matched", "stablemax", "muon", "ema:lamb=5"], [0],
                              {"steps": 10}))
    t = [r.train for r in runs]
    assert (t[0].grokfast, t[0].alpha, t[0].lamb) == ("ema", 0.98, 2.0)
    assert (t[1].grokfast, t[1].window, t[1].lamb) == ("ma", 100, 5.0)
    assert (t[2].grokfast, t[2].lr_matched, t[2].lamb) == ("none", True, 2.0)
    assert t[3].loss == "stablemax" and (t[4].optimizer, t[4].muon_lr, t[4].muon_momentum) == ("muon", 0.02, 0.95)
    assert t[5].lamb == 5.0 and len({r.run_id for r in runs}) == 6


@pytest.mark.parametrize("argv,msg", [
    (["--method", "sgd"], "unknown method 'sgd'"),
    (["--method", "ema:lamb"], "write settings as NAME:KEY=VALUE"),
    (["--method", "ema:p=7"], "'p' is not a training setting a method can change"),
    (["--method", "ema:lamb=x"], "lamb takes a number"),
    (["--method", "ema", "--method", "ema"], "is listed twice"),
    (["--method", "lr-matched:grokfast=ema"], "drop --grokfast ema"),
    (["--method", "muon", "--backend", "fused"], "muon"),
    (["--method", "adamw", "--seeds", "1,1"], "a seed is listed twice"),
])
def test_bad_input_is_one_line_with_status_2_before_any_work(argv, msg, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compare", *TINY, *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and msg in err, err
    assert not out.exists()


def test_resume_takes_no_other_settings(tmp_path, capsys):
    assert main(["compare", "--resume", str(tmp_path), "--method", "ema"]) == 2
    assert "drop --method" in capsys.readouterr().err
    assert main(["compare", "--resume", str(tmp_path)]) == 2
    assert "no compare.json" in capsys.readouterr().err


def test_batched_compare_runs_lr_matched_on_the_fused_kernels(tmp_path):
    """On the batched executor (fused kernels; the Triton interpreter on a CPU) an lr-matched run is AdamW at
    lr * (1 + lamb): the same bits as AdamW given that lr, trained beside it in one launch."""
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fixed = dict(op="x", p=7, frac=0.6, d_model=16, n_heads=2, d_head=8, d_mlp=32, steps=4, eval_every=4,
                 checkpoint_every=4, warmup=0, backend="fused", lr=1e-2)
    said = []
    res = grokfast.compare(["adamw:lr=0.03", "lr-matched"], [0], preset="small", out=tmp_path / "c", device=device,
                           executor="batched", figures=False, log=said.append, **fixed)
    assert res.executor == "batched" and [r["backend"] for r in res.rows] == ["fused", "fused"]
    assert "plan: launch 1: 2 runs batched on the fused kernels: adamw:lr=0.03 (seeds 0); lr-matched (seeds 0)" in said
    assert sum(m.startswith("batched launch: 2 runs") for m in said) == 1
    a, m = (rundir.load_checkpoint(rundir.list_checkpoints(tmp_path / "c" / "runs" / r["run_id"])[-1][1])[0]
            for r in res.rows)
    assert rundir.read_json(tmp_path / "c" / "runs" / res.rows[1]["run_id"] / "config.json")["train"]["lr"] == 1e-2
    assert res.rows[0]["steps_done"] == res.rows[1]["steps_done"]
    for k in a:
        if k.startswith("model."):
            assert torch.equal(a[k], m[k]), k


PLAN_METHODS = ["adamw", "lr-matched", "ema", "ema:lamb=5", "ma", "orthograd", "stablemax", "muon"]


def _gpu_plan(monkeypatch, tmp_path, methods, models_per_launch=64):
    """compare's launch plan as on a CUDA GPU with the fused kernels, planned on this CPU: only the device check
    (grokfast.backends.fused_status) is stood in; what the fused path refuses is still unsupported_training's."""
    import torch

    import grokfast.backends
    from grokfast.compare import launch_plan

    monkeypatch.setattr(grokfast.backends, "fused_status", lambda cfg, device, allow_interpreter=False:
                        (True, "stood in for a CUDA GPU"))
    runs = expand(CompareSpec("small", methods, [0, 1], dict(TINY_FIXED)))
    (launches, rest), lines = launch_plan(runs, torch.device("cuda"), "batched", tmp_path,
                                          models_per_launch=models_per_launch)
    return runs, launches, rest, lines


def _methods(rs):
    return sorted({r.point["method"] for r in rs})


def test_on_a_gpu_compare_batches_the_methods_the_fused_path_runs_and_runs_the_rest_in_turn(monkeypatch, tmp_path):
    from grokfast.kernels.optimizer import unsupported_training
    from grokfast.sweep import batch_key

    runs, launches, rest, lines = _gpu_plan(monkeypatch, tmp_path, PLAN_METHODS)
    fused = {r.run_id for r in runs if unsupported_training(r.train) is None}
    assert {r.run_id for _, rs in launches for r in rs} == fused and {r.run_id for r in rest} == {
        r.run_id for r in runs} - fused
    assert all(len({batch_key(r) for r in rs}) == 1 for _, rs in launches)
    # the fused path runs AdamW with or without a filter: one launch per filter kind, lr-matched (AdamW at a
    # larger lr) beside AdamW, ema with its own lamb beside ema, every seed of a method in the same launch; each
    # method the fused kernels learned (orthograd, StableMax) in a launch of its own; Muon (reference only) in turn
    fused_methods = {r.point["method"] for r in runs if r.run_id in fused}
    assert fused_methods == {"adamw", "lr-matched", "ema", "ema:lamb=5", "ma", "orthograd", "stablemax"}
    expected = [["adamw", "lr-matched"], ["ema", "ema:lamb=5"], ["ma"], ["orthograd"], ["stablemax"]]
    assert sorted(_methods(rs) for _, rs in launches) == expected
    assert all(len(rs) == 2 * len(_methods(rs)) for _, rs in launches)
    refused = ["muon"]
    assert _methods(rest) == refused
    assert sum(line.startswith("plan: launch ") for line in lines) == len(expected)
    said = {line.split(" (seeds")[0][len("plan: "):]: line for line in lines if "in turn" in line}
    assert set(said) == set(refused)
    assert "AdamW (decoupled weight decay) only" in said["muon"] and "backend is reference" in said["muon"]
    assert "plan: launch 1: 4 runs batched on the fused kernels: adamw (seeds 0,1); lr-matched (seeds 0,1)" in lines
    # a launch holds at most models_per_launch runs
    _, launches, _, _ = _gpu_plan(monkeypatch, tmp_path, ["adamw", "lr-matched"], models_per_launch=3)
    assert [len(rs) for _, rs in launches] == [3, 1]


def test_on_a_cpu_compare_plans_every_run_in_turn_and_says_why(tmp_path, capsys):
    assert main(["compare", *TINY, "--method", "adamw", "--method", "ema", "--seeds", "0,1", "--device", "cpu",
                 "--dry-run", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "4 runs; executor: sequential" in out
    assert "plan: 4 runs in turn, one after another (batched unavailable: it needs a CUDA GPU" in out
    assert not (tmp_path / "c").exists()


def test_runs_differing_in_a_setting_a_launch_shares_never_share_a_launch():
    """batch_key follows the batched stepper's own list of shared settings (SHARED_TRAIN_FIELDS) and keeps the
    kinds of step apart: change any one of them and the key changes; a per-model setting leaves it alone."""
    import dataclasses

    from grokfast.kernels.batched import SHARED_TRAIN_FIELDS
    from grokfast.sweep import batch_key
    from grokfast.sweep.batched import STEP_KIND_FIELDS

    r = expand(CompareSpec("small", ["adamw"], [0], dict(TINY_FIXED, warmup=5)))[0]
    other = dict(beta1=0.8, beta2=0.9, eps=1e-6, warmup=3, grokfast="ema", window=7, batch_size=8,
                 precision="tf32", optimizer="adam", loss="stablemax", orthograd=True, warmup_schedule="lambdalr")
    assert set(SHARED_TRAIN_FIELDS) | set(STEP_KIND_FIELDS) <= set(other)
    for k in sorted(set(SHARED_TRAIN_FIELDS) | set(STEP_KIND_FIELDS)):
        changed = dataclasses.replace(r, train=dataclasses.replace(r.train, **{k: other[k]}))
        assert batch_key(changed) != batch_key(r), k
    for k, v in dict(lr=0.5, wd=0.1, seed=3, lamb=4.0, lr_matched=True).items():
        assert batch_key(dataclasses.replace(r, train=dataclasses.replace(r.train, **{k: v}))) == batch_key(r), k
