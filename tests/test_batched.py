"""The batched fused stepper (kernels/batched.py) and the sweep's batched executor, on DEVICE: a CUDA GPU
when there is one, else the CPU under the Triton interpreter. References (the float64 models and the
sequential reference-backend sweeps) run on the CPU, as on a machine without a GPU.

Bounds (float32 kernels against the float64 reference, per model, fresh random inits and splits):
  - parameters after 20 steps: max|theta_batched - theta_ref| / max|theta_ref| <= 1e-4 (the brief's bound;
    the fused optimizer alone measures ~2e-6 after 100 steps, the forward/backward adds float32
    rounding of the gradients, which AdamW's normalisation does not amplify at these sizes);
  - the per-step training loss: relative error <= 1e-5 (float32 logits, accurate log-softmax; measured 3e-7);
  - parameters measured 2e-6 after 20 steps (EMA and MA);
  - AdamW moments and filter state: <= 1e-4 relative to their max (float32 sums of float32 gradients;
    measured 9e-6);
  - a sweep's rows: steps to memorise and to grok, steps done and final accuracies equal the sequential
    executor's on the reference backend exactly (a crossing of 99% could only move on a logit tie);
    final losses within 1e-3 relative (float32 evaluation in the kernels, float64 in the reference:
    on confident data the loss is small and its float32 value has a few ulps of error).

Tiny shapes (p 7, d_model 16, d_mlp 32) because the interpreter runs about a millisecond per program.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import grokfast
from grokfast import rundir
from grokfast import sweep as S
from grokfast.kernels import KernelConfigError
from grokfast.backends import ReferenceStepper, interpreter_on
from grokfast.config import ConfigError, ModelConfig, TrainConfig
from grokfast.data import Task

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a GPU or TRITON_INTERPRET=1")

# Where the fused kernels run: the GPU when there is one (and the interpreter is off), else the CPU.
DEVICE = "cuda" if torch.cuda.is_available() and not interpreter_on() else "cpu"

HYPER = [dict(lr=1e-2, wd=1.0, alpha=0.9, lamb=2.0, seed=0),
         dict(lr=3e-3, wd=0.1, alpha=0.98, lamb=5.0, seed=1),
         dict(lr=2e-2, wd=0.5, alpha=0.5, lamb=0.5, seed=2)]


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def tiny(grokfast="ema", p=7):
    tasks = [Task("x+y", p, 0.6, seed=10 + i) for i in range(len(HYPER))]   # different splits, equal sizes
    cfg = ModelConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32).for_task(tasks[0])
    tcfgs = [TrainConfig(steps=20, warmup=3, grokfast=grokfast, window=3, backend="fused", **h) for h in HYPER]
    return tasks, cfg, tcfgs


def make(tasks, cfg, tcfgs):
    from grokfast.kernels import make_batched_stepper
    models = [grokfast.Transformer(cfg, seed=t.seed, device=DEVICE) for t in tcfgs]   # the stepper moves the splits
    return make_batched_stepper(models, tcfgs, ([t.train.tokens for t in tasks], [t.train.labels for t in tasks]),
                                ([t.test.tokens for t in tasks], [t.test.labels for t in tasks]))


def reference(task, cfg, tcfg):
    model = grokfast.Transformer(cfg, seed=tcfg.seed).double()
    return model, ReferenceStepper(model, tcfg)


@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_matches_float64_reference_and_compacts(kind):
    """M = 3 models with their own seed, split, lr, wd, alpha, lamb; after 10 steps model 1 retires
    (compact to rows [2, 0]: the order changes too) and the other two train 10 more."""
    tasks, cfg, tcfgs = tiny(kind)
    st = make(tasks, cfg, tcfgs)
    refs = [reference(t, cfg, c) for t, c in zip(tasks, tcfgs)]
    steps = 20 if kind == "ema" else 12
    for step in range(1, steps + 1):
        loss = st.step()
        for row, i in enumerate(st.ids.tolist()):
            tr = tasks[i].train
            ref_loss = refs[i][1].step(tr.tokens, tr.labels)
            assert abs(loss[row].item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), (step, i)
        if step == steps // 2:
            s1 = st.state_dict(1)
            st.compact([2, 0])
            assert st.ids.tolist() == [2, 0] and st.M == 2
            assert rel(s1["model.blocks.0.mlp.W_in"], refs[1][0].blocks[0].mlp.W_in.data) <= 1e-4
    assert st.steps_done == steps
    for row, i in enumerate(st.ids.tolist()):
        s, r = st.state_dict(row), refs[i][1].state_dict()
        assert set(s) == set(r), set(s) ^ set(r)   # the single steppers' checkpoint keys
        for k, v in r.items():
            if k.startswith("model."):
                assert rel(s[k], v) <= 1e-4, (i, k)
            elif k.startswith(("opt.m.", "opt.v.", "filter.")) and v.is_floating_point():
                assert rel(s[k], v) <= 1e-4, (i, k)
            else:
                assert int(s[k]) == int(v), k
        # evaluation: each model on its own test split, against the reference model
        tl, ta, sl, sa = st.evaluate()
        te = tasks[i].test
        logits = refs[i][0](te.tokens)
        assert abs(sa[row].item() - (logits.argmax(-1) == te.labels).double().mean().item()) <= 1 / len(te)
        ref_test_loss = grokfast.model.cross_entropy64(logits, te.labels).item()
        assert abs(sl[row].item() - ref_test_loss) <= 1e-4 * abs(ref_test_loss)


def test_orthograd_batch_keeps_its_tensor_blocks_when_compacted():
    """A batch shares orthograd: mixing it is one clear error, and the sweep groups runs by it (batch_key). The
    batched optimizer cuts each parameter tensor into its own blocks, and a compact rebuilds them; three models
    with their own seeds, splits and hyperparameters step with orthograd beside their float64 reference steppers
    (loss within 1e-5 every step, parameters within 1e-4 at the end), before and after the compact."""
    from grokfast.kernels.optimizer import BLOCK
    tasks, cfg, tcfgs = tiny("ema")
    tcfgs = [dataclasses.replace(c, orthograd=True) for c in tcfgs]
    with pytest.raises(KernelConfigError, match="share orthograd"):
        make(tasks, cfg, [tcfgs[0], dataclasses.replace(tcfgs[1], orthograd=False), tcfgs[2]])
    st = make(tasks, cfg, tcfgs)
    refs = [reference(t, cfg, c) for t, c in zip(tasks, tcfgs)]
    sizes = st.layout.sizes()
    blocks = [(sum(sizes[:i]) + b * BLOCK, min(sum(sizes[:i]) + (b + 1) * BLOCK, sum(sizes[:i + 1])))
              for i in range(len(sizes)) for b in range(-(-sizes[i] // BLOCK))]
    for keep in ([2, 0], None):
        assert st.opt.orthograd and st.opt._tab[:, :2].tolist() == [list(b) for b in blocks]
        assert st.opt._part.shape == (st.M, len(blocks), 3)
        for step in range(3):
            loss = st.step()
            for row, i in enumerate(st.ids.tolist()):
                ref_loss = refs[i][1].step(tasks[i].train.tokens, tasks[i].train.labels)
                assert abs(loss[row].item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), (keep, step, i)
        if keep:
            st.compact(keep)
    for row, i in enumerate(st.ids.tolist()):
        s = st.state_dict(row)
        for k, v in refs[i][1].state_dict().items():
            if k.startswith("model."):
                assert rel(s[k], v) <= 1e-4, (i, k)
    runs = S.expand(S.SweepSpec(preset="small", grid={"orthograd": [False, True]}, seeds=[0]))
    assert len({S.batch_key(r) for r in runs}) == 2


def test_checkpoint_round_trip_continues_identically():
    """state_dict(row) -> load_state_dict(row) into a new stepper: the next step is bit-identical."""
    tasks, cfg, tcfgs = tiny("ema")
    a = make(tasks, cfg, tcfgs)
    for _ in range(2):
        a.step()
    b = make(tasks, cfg, tcfgs)
    for row in range(3):
        b.load_state_dict(row, a.state_dict(row))
    assert b.steps_done == 2
    a.step(), b.step()
    assert torch.equal(a.flat, b.flat) and torch.equal(a.opt.ema, b.opt.ema)


def test_bad_input_is_one_clear_line():
    tasks, cfg, tcfgs = tiny("ema")
    with pytest.raises(KernelConfigError, match="must share grokfast"):
        make(tasks, cfg, [tcfgs[0], dataclasses.replace(tcfgs[1], grokfast="ma"), tcfgs[2]])
    with pytest.raises(KernelConfigError, match="full batch only"):
        make(tasks, cfg, [dataclasses.replace(c, batch_size=4) for c in tcfgs])
    other = [tasks[0], tasks[1], Task("x+y", 7, 0.8, seed=3)]
    with pytest.raises(KernelConfigError, match="splits of equal size"):
        make(other, cfg, tcfgs)


# ------------------------------------------------------------------------------------- the sweep

# op "x" (the answer is the first operand) groks within 10-30 steps at p 7: both executors see it.
FIXED = {"op": "x", "p": 7, "frac": 0.6, "d_model": 16, "n_heads": 2, "d_head": 8, "d_mlp": 32, "steps": 40,
         "eval_every": 5, "checkpoint_every": 10, "warmup": 0, "alpha": 0.9}


def spec(backend):
    return S.SweepSpec(preset="small", grid={"lr": [1e-2, 3e-2]}, seeds=[0, 1], fixed={**FIXED, "backend": backend})


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def batched_sweep(tmp_path_factory):
    d = tmp_path_factory.mktemp("batched") / "sweep"
    return S.run_sweep(spec("fused"), out=d, device=DEVICE, executor="batched", log=quiet, figures=False)


def test_batched_rows_equal_sequential_rows(batched_sweep, tmp_path):
    assert batched_sweep.executor == "batched"
    seq = S.run_sweep(spec("reference"), out=tmp_path / "seq", device="cpu", executor="sequential", log=quiet,
                      figures=False)
    assert len(seq.rows) == len(batched_sweep.rows) == 4
    assert any(r["steps_to_grok"] is not None for r in seq.rows)
    assert len({r["steps_to_grok"] for r in seq.rows}) > 1   # runs retire at different steps
    for b, s in zip(batched_sweep.rows, seq.rows):
        for k in ("outcome", "steps_to_memorize", "steps_to_grok", "steps_done", "final_train_acc",
                  "final_test_acc", "lr", "seed"):
            assert b[k] == s[k], (b["run_id"], k, b[k], s[k])
        for k in ("final_train_loss", "final_test_loss"):
            assert abs(b[k] - s[k]) <= 1e-3 * abs(s[k]) + 1e-7, (k, b[k], s[k])
        assert b["backend"] == "fused"
        # every run directory is a single run's: metrics at the same steps, a checkpoint the trainer reads
        run_dir = batched_sweep.dir / "runs" / b["run_id"]
        steps_b = [m["step"] for m in rundir.read_metrics(run_dir)]
        steps_s = [m["step"] for m in rundir.read_metrics(seq.dir / "runs" / s["run_id"])]
        assert steps_b == steps_s
        assert rundir.read_json(run_dir / "summary.json")["steps_to_grok"] == b["steps_to_grok"]
        model, task, step = rundir.load_model(run_dir)
        assert step == b["steps_done"]
        acc = (model(task.test.tokens).argmax(-1) == task.test.labels).double().mean().item()
        assert acc == pytest.approx(b["final_test_acc"], abs=1e-12)


def test_after_grok_keeps_training_like_the_sequential_executor(tmp_path):
    """--after-grok 5: a run leaves its launch 5 steps after grokking (the other keeps training)."""
    def sp(backend):
        return S.SweepSpec(preset="small", grid={"lr": [1e-2, 3e-2]}, seeds=[0], after_grok=5,
                           fixed={**FIXED, "backend": backend})
    b = S.run_sweep(sp("fused"), out=tmp_path / "b", device=DEVICE, executor="batched", log=quiet, figures=False)
    s = S.run_sweep(sp("reference"), out=tmp_path / "s", device="cpu", executor="sequential", log=quiet,
                    figures=False)
    for x, y in zip(b.rows, s.rows):
        assert x["steps_to_grok"] is not None
        assert x["steps_done"] == y["steps_done"] == x["steps_to_grok"] + 5
        for k in ("steps_to_memorize", "steps_to_grok", "final_test_acc"):
            assert x[k] == y[k], k
        steps = lambda d, r: [m["step"] for m in rundir.read_metrics(d / "runs" / r["run_id"])]  # noqa: E731
        assert steps(b.dir, x) == steps(s.dir, y)


def test_killed_batched_sweep_resumes_every_run(batched_sweep, tmp_path, monkeypatch):
    """Kill after the step-10 checkpoints, with one run's step-10 checkpoint lost (so runs resume from
    different steps: grouped by step into two launches); the resumed table equals the uninterrupted one."""
    d = tmp_path / "sweep"
    real_save = rundir.save_checkpoint
    saved = []

    def save_then_die(run_dir, step, tensors, meta):
        path = real_save(run_dir, step, tensors, meta)
        saved.append(step)
        if step == 10 and saved.count(10) == 4:
            path.unlink()            # the last run's checkpoint never reached the disk
            raise KeyboardInterrupt  # the kill
        return path

    monkeypatch.setattr(rundir, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        S.run_sweep(spec("fused"), out=d, device=DEVICE, executor="batched", log=quiet, figures=False)
    monkeypatch.setattr(rundir, "save_checkpoint", real_save)
    # an unfinished run continues from its checkpoint; runs that grokked by step 10 are finished
    logged = []
    res = S.run_sweep(resume=d, device=DEVICE, executor="batched", log=logged.append, figures=False)
    launches = sorted(m.split(" runs on")[0] + m.split("fused kernels")[1].split(" (")[0]
                      for m in logged if m.startswith("batched launch:"))
    # two unfinished runs at step 10, one whose step-10 checkpoint was lost (from 0); the run that grokked
    # at step 10 before its result was written is finished by the sequential path (train_one)
    assert launches == ["batched launch: 1 from step 0", "batched launch: 2 from step 10"], logged
    assert any("1 runs cannot be batched here" in m for m in logged), logged
    for a, b in zip(res.rows, batched_sweep.rows):
        for k in ("outcome", "steps_to_memorize", "steps_to_grok", "steps_done", "final_train_acc",
                  "final_test_acc", "final_train_loss", "final_test_loss"):
            assert a[k] == b[k], (a["run_id"], k)
        ma = [{k: v for k, v in m.items() if k != "wall"} for m in rundir.read_metrics(d / "runs" / a["run_id"])]
        mb = [{k: v for k, v in m.items() if k != "wall"}
              for m in rundir.read_metrics(batched_sweep.dir / "runs" / b["run_id"])]
        assert ma == mb


def test_executor_choice_and_refusal(tmp_path, monkeypatch):
    runs = S.expand(spec("fused"))
    if DEVICE == "cpu":   # interpreter-only: the CPU has a batched executor only under TRITON_INTERPRET=1
        # explicit batched on the CPU under the interpreter, for --backend fused runs
        assert S.plan(spec("fused"), "cpu", "batched")[1] == "batched"
        # auto never picks the interpreter; runs on the reference backend cannot be batched
        assert S.plan(spec("fused"), "cpu", "auto")[1] == "sequential"
        with pytest.raises(ConfigError, match="batched fused executor: not available .*backend is reference"):
            S.plan(spec("auto"), "cpu", "batched")
    else:                 # on a GPU: batched asked for or picked by auto; reference runs cannot be batched
        assert S.plan(spec("fused"), DEVICE, "batched")[1] == "batched"
        assert S.plan(spec("fused"), DEVICE, "auto")[1] == "batched"
        with pytest.raises(ConfigError, match="batched fused executor: not available .*backend is reference"):
            S.plan(spec("reference"), DEVICE, "batched")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # not set on a GPU machine
    ok, why = S.batched_status("cpu", runs, explicit=True)
    assert not ok and "needs a CUDA GPU" in why
    # minibatch runs go to the sequential executor
    mb = dataclasses.replace(runs[0], train=dataclasses.replace(runs[0].train, batch_size=4))
    assert "minibatches" in S.batchable(mb, "cpu")


def test_sweep_throughput_helper_runs_and_refuses_the_cpu(monkeypatch):
    """The benchmark's arithmetic on a tiny workload under the interpreter (numbers meaningless here);
    on a CPU without the interpreter it reports itself not available."""
    from grokfast.bench import Workload, render_sweep_throughput, sweep_throughput
    tasks, cfg, tcfgs = tiny("ema")
    wl = Workload("tiny", tasks[0].to(DEVICE), cfg, dataclasses.replace(tcfgs[0], eval_every=10), 1)
    res = sweep_throughput(wl, DEVICE, Ms=(1, 2), run_steps=1000, warmup=1, timed=1, allow_interpreter=True)
    single = res["single"]
    assert single["runs_per_hour"] == pytest.approx(3600 / (1000 * single["seconds_per_step"]))
    for r in res["rows"]:
        assert r["status"] == "measured"
        assert r["seconds_per_step"] == pytest.approx(r["step_s"] + r["eval_s"] / 10)
        assert r["speedup"] == pytest.approx(r["M"] * single["seconds_per_step"] / r["seconds_per_step"])
    assert "| 2 |" in render_sweep_throughput(res)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # not set on a GPU machine
    assert sweep_throughput(wl, "cpu", allow_interpreter=True)["status"] == "not available"
