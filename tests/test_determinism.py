"""Same seed, same run, at the machine's default thread count (issue 11): the reference step gives the
same bits at any number of threads, and two fresh `grokfast train` processes write the same metrics.

These tests must not inherit the suite's one-thread pin (tests/conftest.py): in-process they restore
torch's default thread count, and child processes get an environment without OMP_NUM_THREADS.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import grokfast
from grokfast import rundir
from grokfast.config import ModelConfig
from grokfast.model import loss_and_grads_reference



def _grads(model, tokens, labels, threads):
    torch.set_num_threads(threads)
    loss, grads = loss_and_grads_reference(model, tokens, labels)
    return {"loss": loss, **grads}


def test_reference_gradients_are_the_same_bits_at_every_thread_count(default_threads):
    """Two layers with LayerNorm, 512 examples of x+y mod 97: big enough that the CPU kernels split their
    work between threads. With W_E[tokens] the W_E gradient changed from call to call at 2 threads, with
    F.layer_norm's own affine its weight gradients changed with the thread count, and without MKL_CBWR
    (grokfast/__init__.py) MKL's products changed at 8 threads: this test failed on each."""
    task = grokfast.Task("x+y", p=97, frac=0.3, seed=0)
    cfg = ModelConfig(n_layers=2, layernorm=True, act="gelu", d_model=64, n_heads=4, d_head=16,
                      d_mlp=256).for_task(task)
    model = grokfast.Transformer(cfg, seed=0)
    tokens, labels = task.train.tokens[:512], task.train.labels[:512]
    one = _grads(model, tokens, labels, 1)
    for threads in (default_threads, default_threads, 2, 3, 8):
        other = _grads(model, tokens, labels, threads)
        differ = [k for k in one if not torch.equal(one[k], other[k])]
        assert not differ, f"at {threads} threads: {differ}"


def _train(out, env):
    cmd = [sys.executable, "-m", "grokfast", "train", "--preset", "small", "--steps", "10", "--eval-every", "5",
           "--checkpoint-every", "10", "--no-progress", "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_two_fresh_processes_write_the_same_run(tmp_path, unpinned_env):
    """The README's first command (shortened to 30 steps), twice, at the default thread count: the same
    metrics apart from wall time, the same final weights and optimizer state; config.json says how many
    threads made it."""
    _train(tmp_path / "a", unpinned_env)
    _train(tmp_path / "b", unpinned_env)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall"} for r in rows]  # noqa: E731
    a, b = rundir.read_metrics(tmp_path / "a"), rundir.read_metrics(tmp_path / "b")
    assert [r["step"] for r in a] == [0, 5, 10] and strip(a) == strip(b)
    ta = rundir.load_checkpoint(rundir.list_checkpoints(tmp_path / "a")[-1][1])[0]
    tb = rundir.load_checkpoint(rundir.list_checkpoints(tmp_path / "b")[-1][1])[0]
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    env = json.loads((tmp_path / "a" / "config.json").read_text())["environment"]
    assert env["torch_threads"] >= 1 and env["torch"] == torch.__version__
    assert env["mkl_cbwr"] == os.environ.get("MKL_CBWR", "AUTO,STRICT")
