"""The trainer: run directory, checkpoints, resume (bit-identical on the CPU), faults, and a real grokking run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import grokfast
from grokfast import rundir
from grokfast.cli import main
from grokfast.config import ConfigError, ModelConfig, TrainConfig

TINY = ModelConfig(d_model=32, n_heads=2, d_head=16, d_mlp=64)


def tiny_task(**kw):
    args = dict(op="x+y", p=11, frac=0.5, seed=0)
    args.update(kw)
    return grokfast.Task(**args)


def tiny_train(out=None, task=None, **kw):
    task = task or tiny_task()
    args = dict(steps=40, lr=3e-3, wd=1.0, eval_every=5, checkpoint_every=10, progress=False, log=lambda m: None)
    args.update(kw)
    return grokfast.train(task, TINY.for_task(task), TrainConfig(), out=out, **args)


def final_tensors(run_dir):
    step, path = rundir.list_checkpoints(run_dir)[-1]
    return step, rundir.load_checkpoint(path)[0]


def assert_same_state(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def strip_wall(rows):
    return [{k: v for k, v in r.items() if k != "wall"} for r in rows]


def test_run_directory_contents(tmp_path):
    run = tiny_train(tmp_path / "run")
    d = tmp_path / "run"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model"]["d_model"] == 32 and cfg["task"]["p"] == 11 and cfg["train"]["eval_every"] == 5
    rows = rundir.read_metrics(d)
    assert [r["step"] for r in rows] == list(range(0, 41, 5))
    assert set(rows[0]) == {"step", "train_loss", "test_loss", "train_acc", "test_acc", "wall"}
    summary = json.loads((d / "summary.json").read_text())
    for k in ("steps_to_memorize", "seconds_to_memorize", "steps_to_grok", "seconds_to_grok", "steps_done"):
        assert k in summary
    assert summary["steps_done"] == 40 and run.history == rows
    assert [s for s, _ in rundir.list_checkpoints(d)] == [10, 20, 30, 40]
    png = (d / "grokking.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not [f for f in d.rglob("*.tmp")]  # atomic writes leave nothing behind


def test_summary_reads_the_history():
    hist = [dict(step=s, train_acc=a, test_acc=b, train_loss=0.0, test_loss=0.0, wall=s / 10)
            for s, a, b in [(0, 0.0, 0.0), (10, 0.96, 0.1), (20, 1.0, 0.5), (30, 1.0, 0.97), (40, 1.0, 0.995)]]
    s = grokfast.train.__globals__["summarize"](hist, 40, 4.0)
    assert (s["steps_to_memorize"], s["steps_to_memorize_95"], s["steps_to_grok"], s["steps_to_grok_95"]) == (20, 10, 40, 30)
    assert s["seconds_to_grok"] == 4.0 and s["grokked"]


def test_checkpoint_round_trip(tmp_path):
    t = {"model.a": torch.randn(3, 4), "opt.t": torch.tensor(7), "x": torch.arange(5, dtype=torch.uint8)}
    path = rundir.save_checkpoint(tmp_path, 12, t, {"step": 12, "wall": 1.5})
    back, meta = rundir.load_checkpoint(path)
    assert meta == {"step": 12, "wall": 1.5}
    assert_same_state(t, back)
    assert rundir.list_checkpoints(tmp_path) == [(12, path)]


def test_model_loads_back_from_a_run(tmp_path):
    run = tiny_train(tmp_path / "r")
    model, task, step = rundir.load_model(tmp_path / "r")
    assert step == 40 and task.p == 11
    for k, v in run.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


@pytest.mark.parametrize("filt,batch", [("ema", None), ("ma", 24)])
def test_resume_after_a_crash_is_bit_identical(tmp_path, filt, batch, default_threads):
    kw = dict(grokfast=filt, window=4, batch_size=batch)
    full = tiny_train(tmp_path / "full", **kw)

    def crash(step):
        if step == 27:
            raise RuntimeError("simulated crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_train(tmp_path / "cut", on_step=crash, **kw)
    assert rundir.list_checkpoints(tmp_path / "cut")[-1][0] == 20
    resumed = grokfast.train(resume=tmp_path / "cut", progress=False, log=lambda m: None)
    assert_same_state(final_tensors(tmp_path / "full")[1], final_tensors(tmp_path / "cut")[1])
    assert strip_wall(resumed.history) == strip_wall(full.history)
    assert strip_wall(rundir.read_metrics(tmp_path / "cut")) == strip_wall(rundir.read_metrics(tmp_path / "full"))


def test_resume_can_extend_the_step_budget(tmp_path):
    tiny_train(tmp_path / "a", steps=20)
    run = grokfast.train(resume=tmp_path / "a", steps=40, progress=False, log=lambda m: None)
    tiny_train(tmp_path / "b", steps=40)
    assert run.summary["steps_done"] == 40
    assert_same_state(final_tensors(tmp_path / "a")[1], final_tensors(tmp_path / "b")[1])


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    def poison(step):
        if step == 12:
            with torch.no_grad():
                run_model[0].unembed.W_U.fill_(float("nan"))
    run_model = []
    task = tiny_task()
    cfg = TINY.for_task(task)
    orig = grokfast.train.__globals__["Transformer"]

    class Spy(orig):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            run_model.append(self)
    grokfast.train.__globals__["Transformer"] = Spy
    try:
        with pytest.raises(grokfast.TrainingDiverged, match="step 13.*last good checkpoint is step 10"):
            grokfast.train(task, cfg, TrainConfig(steps=40, eval_every=5, checkpoint_every=10), out=tmp_path / "n",
                           on_step=poison, progress=False, log=lambda m: None)
    finally:
        grokfast.train.__globals__["Transformer"] = orig
    assert [s for s, _ in rundir.list_checkpoints(tmp_path / "n")] == [10]
    t, _ = rundir.load_checkpoint(rundir.list_checkpoints(tmp_path / "n")[0][1])
    assert all(torch.isfinite(v).all() for k, v in t.items() if v.is_floating_point())


def test_refuses_to_overwrite_a_run(tmp_path):
    tiny_train(tmp_path / "r", steps=10)
    with pytest.raises(ConfigError, match="--resume"):
        tiny_train(tmp_path / "r", steps=10)


def test_stop_at_grok_stops_and_checkpoints(tmp_path):
    run = tiny_train(tmp_path / "g", steps=2000, lr=1e-2, grokfast="ema", stop_at_grok=True, eval_every=10,
                     checkpoint_every=1000, task=tiny_task(frac=0.9))  # groks by ~120 steps
    assert run.summary["grokked"] and run.history[-1]["test_acc"] >= 0.99
    assert run.summary["steps_done"] == run.summary["steps_to_grok"] < 3000
    assert rundir.list_checkpoints(tmp_path / "g")[-1][0] == run.summary["steps_done"]


# --- the command line -------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,msg", [
    (["--op", "x**"], "operation"),
    (["--op", "frobnicate"], "operation"),
    (["--preset", "gpt"], "unknown preset"),
    (["--p", "1"], "--p"),
    (["--op", "x/y", "--p", "100"], "prime"),
    (["--frac", "0"], "--frac"),
    (["--frac", "1.2"], "--frac"),
    (["--lr", "-1"], "--lr"),
    (["--steps", "-5"], "--steps"),
    (["--batch-size", "100000"], "--batch-size"),
    (["--grokfast", "ema", "--alpha", "1.0"], "--alpha"),
    (["--backend", "fused", "--device", "cpu"], "fused"),
    (["--device", "cuda"], "cuda"),
])
def test_cli_bad_input_is_one_line_and_status_2(tmp_path, capsys, monkeypatch, argv, msg):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # under the interpreter, fused on a CPU is allowed
    code = main(["train", "--out", str(tmp_path / "x"), "--no-progress", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("grokfast: error:") and msg in err[-1]
    assert not (tmp_path / "x" / "checkpoints").exists()  # no work started


def test_cli_precision_is_recorded_and_validated(tmp_path, monkeypatch):
    """--precision (the fused kernels' float32 dot mode) lands in config.json; a bad value from the
    environment default is one ConfigError naming both spellings."""
    assert main(["train", *CLI_TINY, "--steps", "1", "--precision", "tf32x3", "--out", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "config.json").read_text())["train"]["precision"] == "tf32x3"
    monkeypatch.setenv("GROKFAST_DOT_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="GROKFAST_DOT_PRECISION"):
        TrainConfig()
    monkeypatch.setenv("GROKFAST_DOT_PRECISION", "tf32")
    assert TrainConfig().precision == "tf32" and grokfast.preset("nanda").train.precision == "tf32"


def test_cli_argparse_errors_exit_2():
    r = subprocess.run([sys.executable, "-m", "grokfast", "train", "--grokfast", "sgd"], capture_output=True, text=True)
    assert r.returncode == 2 and "grokfast: error:" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "grokfast", "train", "--p", "seven"], capture_output=True, text=True)
    assert r.returncode == 2 and "--p" in r.stderr


def test_cli_resume_refuses_config_changes(tmp_path, capsys):
    tiny_train(tmp_path / "r", steps=10)
    assert main(["train", "--resume", str(tmp_path / "r"), "--op", "x-y"]) == 2
    assert "--op" in capsys.readouterr().err


CLI_TINY = ["--op", "x+y", "--p", "11", "--frac", "0.5", "--d-model", "32", "--n-heads", "2", "--d-head", "16",
            "--d-mlp", "64", "--lr", "3e-3", "--grokfast", "ema", "--eval-every", "10", "--no-progress"]


def _cli(out, *extra):
    return [sys.executable, "-m", "grokfast", "train", *CLI_TINY, "--out", str(out), *extra]


def _wait_for_checkpoint(run_dir, proc, at_least):
    deadline = time.time() + 120
    while time.time() < deadline:
        ck = rundir.list_checkpoints(run_dir)
        if ck and ck[-1][0] >= at_least:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, unpinned_env):
    out = tmp_path_factory.mktemp("cli") / "full"
    subprocess.run(_cli(out, "--steps", "1200", "--checkpoint-every", "50"), check=True, capture_output=True,
                   env=unpinned_env)
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_cli_killed_run_resumes_bit_identical(tmp_path, uninterrupted, unpinned_env, sig):
    """At the machine's default thread count, as a user runs it (no OMP_NUM_THREADS)."""
    out = tmp_path / "cut"
    proc = subprocess.Popen(_cli(out, "--steps", "1200", "--checkpoint-every", "50"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=unpinned_env)
    _wait_for_checkpoint(out, proc, 100)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:  # Ctrl-C: a checkpoint at the step it stopped, and how to resume
        assert proc.returncode == 130, err
        assert "grokfast train --resume" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    stopped = rundir.list_checkpoints(out)[-1][0]
    assert stopped < 1200
    r = subprocess.run([sys.executable, "-m", "grokfast", "train", "--resume", str(out), "--no-progress"],
                       capture_output=True, text=True, env=unpinned_env)
    assert r.returncode == 0, r.stderr
    assert f"resuming {out} from step {stopped}" in r.stderr
    assert_same_state(final_tensors(uninterrupted)[1], final_tensors(out)[1])
    assert strip_wall(rundir.read_metrics(out)) == strip_wall(rundir.read_metrics(uninterrupted))


# --- the real thing ----------------------------------------------------------------------------------

def test_reference_groks_a_small_task_on_the_cpu(tmp_path):
    """Grokking for real: x+y mod 23, 70% train, d_model 64, lr 1e-2, Grokfast-EMA (memorises by ~150 steps,
    groks by ~850)."""
    task = grokfast.Task("x+y", p=23, frac=0.7, seed=0)
    pre = grokfast.preset("small")
    cfg = ModelConfig(d_model=64, n_heads=4, d_head=16, d_mlp=256).for_task(task)
    run = grokfast.train(task, cfg, pre.train, steps=3000, lr=1e-2, eval_every=50, stop_at_grok=True,
                         out=tmp_path / "grok", progress=False, log=lambda m: None)
    s = run.summary
    assert s["grokked"] and run.history[-1]["test_acc"] >= 0.99
    # grokking, not just learning: training accuracy got there first
    assert s["steps_to_memorize"] < s["steps_to_grok"]
    assert (tmp_path / "grok" / "grokking.png").stat().st_size > 10_000


def test_measure_every_records_cheap_measures_in_the_metrics(tmp_path):
    run = tiny_train(tmp_path / "m", steps=20, measure_every=10)
    rows = rundir.read_metrics(tmp_path / "m")
    with_measures = [r["step"] for r in rows if "sum_sq_weights" in r]
    assert with_measures == [0, 10, 20]
    # the sum of squared weights is what it says
    assert rows[-1]["sum_sq_weights"] == pytest.approx(sum(float((p.detach().double() ** 2).sum()) for p in run.model.parameters()), rel=1e-9)
    with pytest.raises(ConfigError, match="--measure-every"):
        TrainConfig(eval_every=10, measure_every=15)
