"""Sweeps (grokfast.sweep, `grokfast sweep`): spec and expansion, bad input before any work, the same
per-run results as training the runs one by one, torchrun with two gloo processes giving the same table
as one process, kill and resume, stop at grokking, figures.

Tiny models (d_model 32, d_mlp 64, p 7) and few steps; one thread per process, because tiny models
gain nothing from more and the 2-core CI machine is shared.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import grokfast
from grokfast import rundir
from grokfast.cli import main as cli_main
from grokfast.config import ConfigError, preset
from grokfast.data import Task
from grokfast import sweep as S

TINY = {"p": 7, "frac": 0.6, "d_model": 32, "d_mlp": 64, "n_heads": 2, "d_head": 16, "steps": 30,
        "eval_every": 10, "checkpoint_every": 10}
TINY_FLAGS = ["--preset", "small", "--p", "7", "--frac", "0.6", "--d-model", "32", "--d-mlp", "64", "--n-heads",
              "2", "--d-head", "16", "--steps", "30", "--eval-every", "10", "--checkpoint-every", "10"]
GRID_FLAGS = ["--grid", "lr=3e-3,1e-2", "--seeds", "0,1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def tiny_spec(**kw) -> S.SweepSpec:
    d = dict(preset="small", grid={"lr": [3e-3, 1e-2]}, seeds=[0, 1], fixed=dict(TINY))
    d.update(kw)
    return S.SweepSpec(**d)


def quiet(msg):
    pass


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The 4-run sweep (lr x seeds) run once, uninterrupted, in this process."""
    d = tmp_path_factory.mktemp("baseline") / "sweep"
    res = S.run_sweep(tiny_spec(), out=d, log=quiet, figures=False)
    return res


def without_times(rows):
    return [{k: v for k, v in r.items() if k not in S.TIME_COLUMNS} for r in rows]


# ------------------------------------------------------------------------------ spec, expansion

def test_parse_grid_and_seeds():
    assert S.parse_grid_arg("lr=1e-3, 3e-3") == ("lr", [1e-3, 3e-3])
    assert S.parse_grid_arg("d-model=32,64") == ("d_model", [32, 64])
    assert S.parse_grid_arg("op=x+y;x-y;x+y,x-y") == ("op", ["x+y", "x-y", "x+y,x-y"])
    assert S.parse_grid_arg("layernorm=true,false") == ("layernorm", [True, False])
    assert S.parse_grid_arg("lr=1e-4..1e-2:log") == ("lr", S.Range(1e-4, 1e-2, True))
    assert S.parse_grid_arg("wd=0..2") == ("wd", S.Range(0.0, 2.0, False))
    assert S.parse_seeds("0-3,10") == [0, 1, 2, 3, 10]
    for bad, says in [("lr=", "lists no values"), ("lr", "AXIS=V1,V2"), ("speed=1,2", "unknown axis"),
                      ("p=7.5", "integer"), ("lr=fast", "number"), ("lr=1e-2..1e-4", "low < high"),
                      ("lr=0..1:log", "positive")]:
        with pytest.raises(ConfigError, match=says):
            S.parse_grid_arg(bad)
    for bad in ("", "3-1", "a,b"):
        with pytest.raises(ConfigError, match="--seeds"):
            S.parse_seeds(bad)


def test_expand_order_ids_and_configs():
    spec = tiny_spec(grid={"lr": [3e-3, 1e-2], "wd": [0.5, 1.0]}, seeds=[0, 1, 2])
    runs = S.expand(spec)
    assert len(runs) == 12
    # the last axis fastest, seeds innermost
    assert [(r.point["lr"], r.point["wd"], r.point["seed"]) for r in runs[:4]] == [
        (3e-3, 0.5, 0), (3e-3, 0.5, 1), (3e-3, 0.5, 2), (3e-3, 1.0, 0)]
    r = runs[4]
    assert (r.train.lr, r.train.wd, r.train.seed, r.task["seed"]) == (3e-3, 1.0, 1, 1)
    assert r.train.grokfast == preset("small").train.grokfast and r.train.stop_at_grok  # the small preset's filter; sweeps stop at grok
    assert (r.model.d_model, r.model.d_vocab, r.model.d_vocab_out) == (32, 8, 7)
    assert r.run_id.startswith("lr0.003-wd1-seed1-")
    assert len({q.run_id for q in runs}) == 12
    assert [q.run_id for q in S.expand(spec)] == [q.run_id for q in runs]  # deterministic
    # a fixed data seed decouples the split from the model seed
    runs = S.expand(tiny_spec(fixed={**TINY, "data_seed": 5}))
    assert {q.task["seed"] for q in runs} == {5} and {q.train.seed for q in runs} == {0, 1}


def test_random_sampling_and_dedupe():
    spec = tiny_spec(grid={"lr": [1e-3, 3e-3, 1e-2], "wd": [0.5, 1.0]}, seeds=[0], random=4, sample_seed=3)
    pts = [(r.point["lr"], r.point["wd"]) for r in S.expand(spec)]
    assert len(set(pts)) == 4 and pts == [(r.point["lr"], r.point["wd"]) for r in S.expand(spec)]
    spec = tiny_spec(grid={"lr": S.Range(1e-4, 1e-2, True), "window": S.Range(2, 9)}, seeds=[0, 1], random=5,
                     fixed={**TINY, "grokfast": "ma"})
    runs = S.expand(spec)
    assert len(runs) == 10
    assert all(1e-4 <= r.train.lr <= 1e-2 and 2 <= r.train.window <= 9 and isinstance(r.train.window, int)
               for r in runs)
    # alpha only matters for EMA: with grokfast none the alpha values are one run, not two
    spec = tiny_spec(grid={"grokfast": ["none", "ema"], "alpha": [0.9, 0.98]}, seeds=[0])
    runs = S.expand(spec)
    assert [(r.train.grokfast, r.train.alpha) for r in runs] == [("none", 0.9), ("ema", 0.9), ("ema", 0.98)]


@pytest.mark.parametrize("kw, says", [
    (dict(grid={"lr": []}), "lists no values"),
    (dict(grid={"lr": [1e-3, 1e-3]}), "listed twice"),
    (dict(seeds=[]), "no seeds"),
    (dict(fixed={**TINY, "lr": 1e-3}), "both fixed .* and swept"),
    (dict(grid={"seed": [0, 1]}), "--seeds"),
    (dict(grid={"lr": [-1e-3]}), "--lr must be positive"),
    (dict(grid={"frac": [0.5, 1.5]}, fixed={k: v for k, v in TINY.items() if k != "frac"}), "--frac must lie"),
    (dict(grid={"op": ["x/y"]}, fixed={**TINY, "p": 8}), "prime"),
    (dict(grid={"alpha": [0.9, 0.98]}, fixed={**TINY, "grokfast": "none"}), "no run uses it"),
    (dict(random=9), "more points than the grid has"),
    (dict(grid={"lr": S.Range(1e-4, 1e-2)}), "need --random"),
    (dict(after_grok=-1), "--after-grok"),
    (dict(fixed={**TINY, "batch_size": 1000}), "exceeds"),
])
def test_bad_spec_is_refused(kw, says):
    with pytest.raises(ConfigError, match=says):
        S.expand(tiny_spec(**kw))


def test_memory_check_says_how_many_fit():
    runs = S.expand(tiny_spec())
    r = runs[0]
    need = S.bytes_per_model(r.model, r.train, r.n_train, r.n_test)
    # at least the float32 state: weights, grads, m, v and the EMA
    assert need >= 4 * r.model.n_params() * 5
    free = int(10.5 * need / 0.8)  # 10 models fit in the 80% we plan for
    assert S.check_memory(runs, 10, free) == need
    with pytest.raises(ConfigError, match="10 models fit, pass --models-per-launch 10"):
        S.check_memory(runs, 64, free)
    with pytest.raises(ConfigError, match="0 models fit"):
        S.check_memory(runs, 1, need // 2)


def test_cli_bad_input_exits_2_before_any_work(tmp_path, capsys):
    out = tmp_path / "s"
    cases = [
        (["--grid", "lr="], "lists no values"),
        (["--grid", "lr=1e-3", "--grid", "lr=3e-3"], "given twice"),
        (["--grid", "lr=1e-3", "--lr", "1e-3"], "both fixed"),
        (["--grid", "wd=-1"], "--wd must be >= 0"),
        (["--memory", "0.000001"], "0 models fit"),
        (["--executor", "batched"], "batched fused executor: not available"),
        (["--models-per-launch", "8"], "needs the batched executor"),
        (["--phase-axes", "lr"], "--phase-axes"),
    ]
    for extra, says in cases:
        code = cli_main(["sweep", *TINY_FLAGS, "--out", str(out), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, extra
        assert says in err[-1] and err[-1].startswith("grokfast: error:"), (extra, err)
        assert not out.exists(), extra  # nothing written
    assert cli_main(["sweep", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a sweep directory" in capsys.readouterr().err


def test_fused_backend_on_cpu_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # no interpreter: the fused kernels need a GPU
    out = tmp_path / "s"
    assert cli_main(["sweep", *TINY_FLAGS, "--backend", "fused", "--out", str(out)]) == 2
    assert "--backend fused cannot run here" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------ execution

def test_sweep_equals_runs_trained_one_by_one(baseline):
    runs = S.expand(baseline.spec)
    assert [r["run_id"] for r in baseline.rows] == [r.run_id for r in runs]
    for r, row in zip(runs, baseline.rows):
        run = grokfast.train(Task(**r.task), r.model, r.train, progress=False, log=quiet)
        s = run.summary
        for k in ("steps_to_memorize", "steps_to_grok", "steps_done", "final_train_acc", "final_test_acc",
                  "final_train_loss", "final_test_loss"):
            assert row[k] == s[k], (r.run_id, k)
        assert row["lr"] == r.train.lr and row["seed"] == r.train.seed
        hist = rundir.read_metrics(baseline.dir / "runs" / r.run_id)
        assert hist == [{**h, "wall": hist[i]["wall"]} for i, h in enumerate(run.history)]
    # the table on disk: JSON rows as returned, CSV one line per run, "did not grok" spelled out
    saved = json.loads((baseline.dir / "results.json").read_text())
    assert saved["complete"] and saved["rows"] == baseline.rows
    csv_lines = (baseline.dir / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(runs) and csv_lines[0].startswith("index,run_id,point.lr,point.seed")
    assert all(row["outcome"] in ("did not grok", "did not memorise") for row in baseline.rows)


def test_resume_of_a_finished_sweep_trains_nothing(baseline, tmp_path):
    import shutil
    d = tmp_path / "copy"
    shutil.copytree(baseline.dir, d)
    stamps = {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file() and p.name != "results.json"}
    res = S.run_sweep(resume=d, log=quiet, figures=False)
    assert without_times(res.rows) == without_times(baseline.rows)
    changed = [p for p in d.rglob("*") if p.is_file() and p in stamps and p.stat().st_mtime_ns != stamps[p]]
    assert changed == [p for p in changed if p.name == "results.csv"]  # no run touched
    with pytest.raises(ConfigError, match="already holds a sweep"):
        S.run_sweep(tiny_spec(), out=d, log=quiet)


def test_kill_and_resume(baseline, tmp_path):
    """SIGKILL a sweep while a run is between checkpoints; resume; finished runs are untouched, the
    unfinished one continues from its checkpoint, and the table equals the uninterrupted sweep's."""
    d = tmp_path / "killed"
    cmd = [sys.executable, "-m", "grokfast", "sweep", *TINY_FLAGS, *GRID_FLAGS, "--out", str(d), "--no-figures",
           "--quiet"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            runs_dir = d / "runs"
            if runs_dir.is_dir():
                dirs = list(runs_dir.iterdir())
                done = [x for x in dirs if (x / "result.json").exists()]
                midway = [x for x in dirs if not (x / "result.json").exists() and rundir.list_checkpoints(x)]
                if done and midway:
                    proc.send_signal(signal.SIGKILL)
                    killed_at = ({x.name: (x / "result.json").read_bytes() for x in done}, midway[0].name)
                    break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert killed_at is not None, "the sweep finished before it could be killed between checkpoints"
    finished, midway = killed_at
    assert len(finished) < len(baseline.rows)
    stamps = {n: (d / "runs" / n / "result.json").stat().st_mtime_ns for n in finished}
    finished_ckpts = {n: [p.stat().st_mtime_ns for _, p in rundir.list_checkpoints(d / "runs" / n)] for n in finished}

    logged = []
    res = S.run_sweep(resume=d, log=logged.append, figures=False)
    assert without_times(res.rows) == without_times(baseline.rows)
    for n, blob in finished.items():  # never repeated
        assert (d / "runs" / n / "result.json").read_bytes() == blob
        assert (d / "runs" / n / "result.json").stat().st_mtime_ns == stamps[n]
        assert [p.stat().st_mtime_ns for _, p in rundir.list_checkpoints(d / "runs" / n)] == finished_ckpts[n]
    assert not any(n in m for m in logged for n in finished)  # no line for a finished run
    assert any(m.startswith(f"resuming {d / 'runs' / midway} from step") for m in logged), logged
    assert f"({len(finished)} finished, {len(baseline.rows) - len(finished)} to do" in logged[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_gives_the_same_table(baseline, tmp_path, unpinned_env, default_threads):
    """At default thread counts: this process at the machine's, torchrun's two at what it sets (one
    thread each when OMP_NUM_THREADS is unset); the table is the same as the baseline's (one thread)."""
    here = S.run_sweep(tiny_spec(), out=tmp_path / "here", log=quiet, figures=False)
    assert without_times(here.rows) == without_times(baseline.rows)
    d = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "grokfast", "sweep", *TINY_FLAGS, *GRID_FLAGS,
           "--out", str(d), "--no-figures"]
    p = subprocess.run(cmd, env={**unpinned_env, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "on 2 ranks" in p.stderr
    # each rank trained its own half (runs i % 2 == rank), none twice
    for rank in (0, 1):
        assert p.stderr.count(f"[rank {rank}] [") == 2, p.stderr[-3000:]
    rows = json.loads((d / "results.json").read_text())["rows"]
    assert without_times(rows) == without_times(baseline.rows)
    assert p.stdout.count("sweep: ") == 1  # rank 0 alone reports


def test_stop_at_grok_and_after_grok(tmp_path):
    """p 7 with 95% train (2 test pairs) groks within 70 steps at lr 1e-2: the run stops there, or
    ``after_grok`` steps later; a run that does not grok trains to the step limit."""
    # x+y, wd 1, Grokfast-EMA: the task and filter this was measured with (the small preset's before 2026-12-01)
    fixed = {**TINY, "op": "x+y", "wd": 1.0, "grokfast": "ema", "frac": 0.95, "steps": 100, "lr": 1e-2}
    res = S.run_sweep(S.SweepSpec("small", {}, [0], fixed), out=tmp_path / "a", log=quiet, figures=False)
    (row,) = res.rows
    assert row["outcome"] == "grokked" and row["steps_done"] == row["steps_to_grok"] < 100
    res2 = S.run_sweep(S.SweepSpec("small", {}, [0], fixed, after_grok=20), out=tmp_path / "b", log=quiet,
                       figures=False)
    (row2,) = res2.rows
    assert row2["steps_to_grok"] == row["steps_to_grok"] and row2["steps_done"] == row["steps_to_grok"] + 20
    assert rundir.read_metrics(tmp_path / "b" / "runs" / row2["run_id"])[-1]["step"] == row2["steps_done"]


def test_figures(baseline, tmp_path):
    from grokfast import plots
    rows = [dict(r) for r in baseline.rows]
    rows[0]["steps_to_grok"] = 20  # one cell of two runs: one grokked
    data = S.phase_data(rows, "lr", "seed")
    assert data["x_values"] == [3e-3, 1e-2] and data["y_values"] == [0, 1]
    assert data["runs"] == [[1, 1], [1, 1]] and data["grokked"][0][0] == 1 and data["steps"][0][0] == 20
    assert all(v != v for v in (data["steps"][0][1], data["steps"][1][0]))  # NaN: did not grok
    # runs sharing a cell: the lower median with "did not grok" as infinity (1 of 2 grokked: 20; 0 of 2: NaN)
    data2 = S.phase_data(rows, "lr", "op")
    assert data2["grokked"] == [[1, 0]] and data2["runs"] == [[2, 2]] and data2["steps"][0][0] == 20
    made = S.draw_figures(baseline.dir, baseline.spec, rows, log=quiet)
    assert [p.name for p in made] == ["phase.png", "curves.png"]
    for p in made:
        assert p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG"


def test_paper_optimizer_flags_reach_every_run(tmp_path, capsys):
    """`grokfast sweep` takes `grokfast train`'s paper-semantics flags, fixed or as --grid axes."""
    out = tmp_path / "s"
    flags = ["sweep", *TINY_FLAGS, "--steps", "4", "--batch-size", "8", "--optimizer", "adam", "--minibatches",
             "epoch", "--no-eval-train", "--rng", "stream", "--grid", "warmup_schedule=linear,lambdalr", "--quiet",
             "--no-figures"]
    assert cli_main(flags + ["--out", str(out)]) == 0
    trains = [rundir.load_config(d)["train"] for d in sorted((out / "runs").iterdir())]
    assert sorted(t.warmup_schedule for t in trains) == ["lambdalr", "linear"]
    assert all((t.optimizer, t.minibatches, t.eval_train, t.rng) == ("adam", "epoch", False, "stream") for t in trains)
    capsys.readouterr()
    for extra, says in ((["--grid", "optimizer=adam,sgd"], "--optimizer must be adamw, adam or muon"),
                        (["--data-seed", "3"], "data_seed does nothing with rng stream")):
        bad = [a for a in flags if a not in ("--optimizer", "adam")] + extra
        assert cli_main(bad + ["--out", str(tmp_path / "bad")]) == 2, extra
        assert says in capsys.readouterr().err, extra
        assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit) as e:
        cli_main(["sweep", *TINY_FLAGS, "--warmup-schedule", "cosine", "--out", str(tmp_path / "bad")])
    assert e.value.code == 2


def test_batched_executor_leaves_paper_semantics_to_the_reference(monkeypatch):
    """What the fused optimizer does not compute (Adam with coupled L2, the LambdaLR warm-up), and the
    reference-only --no-eval-train and --rng stream, train one by one instead of failing in the batched launch."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    r = S.expand(tiny_spec(fixed={**TINY, "backend": "fused"}))[0]
    assert S.batchable(r, "cpu") is None
    for change, says in ((dict(optimizer="adam"), "optimizer='adam'"), (dict(warmup_schedule="lambdalr"), "lambdalr"),
                         (dict(eval_train=False), "--no-eval-train"), (dict(rng="stream"), "--rng stream")):
        rr = dataclasses.replace(r, train=dataclasses.replace(r.train, **change))
        assert says in (S.batchable(rr, "cpu") or ""), change


def test_run_identity_names_openai_groks_quirks_only_where_they_are_on():
    """Sweep run ids hash _identity: a field added later (ln_position) must not change the ids of earlier runs."""
    import grokfast
    from grokfast.sweep.runs import _identity
    clean = _identity({}, grokfast.preset("nanda").model, grokfast.preset("nanda").train)["model"]
    assert "ln_position" not in clean and "pos_embed" not in clean
    grok = _identity({}, grokfast.preset("grok").model, grokfast.preset("grok").train)["model"]
    assert grok["ln_position"] == "post" and grok["pos_embed"] == "sinusoidal"
