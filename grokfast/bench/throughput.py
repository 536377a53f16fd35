"""Sweep throughput: runs per hour of the batched fused executor at M models per launch against M single
runs (``sweep_throughput``), and its Markdown table (``render_sweep_throughput``)."""
from __future__ import annotations

import dataclasses
import statistics

import torch

from ..data import Task
from ..model import Transformer
from .timing import time_steps
from .workload import Workload


SWEEP_MS = (1, 8, 64, 256)


def sweep_throughput(wl: Workload, device, Ms=SWEEP_MS, run_steps: int | None = None, warmup: int = 3,
                     timed: int = 20, allow_interpreter: bool = False) -> dict:
    """Runs per hour of the batched fused executor at M models per launch against M single runs.

    Single run: the trainer's fused stepper (CUDA graph) on one model, plus the trainer's evaluation
    (the reference model over the train and test splits) every ``eval_every`` steps: seconds per step
    t_1 = step median + eval median / eval_every. Batched: BatchedStepper.step over M models (distinct
    seeds, data seeds and learning rates) plus its eval_flat evaluation every eval_every steps:
    t_M = step median + eval median / eval_every. A run of ``run_steps`` steps (default: the workload's
    steps) then gives runs/hour = 3600 / (run_steps t_1) single, 3600 M / (run_steps t_M) batched, and
    the speed-up M t_1 / t_M (M single runs go one after another on the device). Runs that grok early
    and leave the batch make a real sweep faster than this fixed-M figure; file writing is left out
    of both sides. Needs a CUDA GPU (or, with allow_interpreter, TRITON_INTERPRET=1 for tests).
    Returns {"workload", "run_steps", "single": {...}, "rows": [{"M", "status", ...}]}."""
    from ..backends import interpreter_on
    from ..train import evaluate

    device = torch.device(device)
    if device.type != "cuda" and not (allow_interpreter and interpreter_on()):
        return {"status": "not available", "reason": "the sweep throughput benchmark needs a CUDA GPU"}
    from grokfast import kernels

    steps = run_steps or wl.train.steps
    k = wl.train.eval_every
    tcfg = dataclasses.replace(wl.train, batch_size=None, backend="fused")
    task = wl.task

    def stats(r):
        return statistics.median(r["times_s"])

    model = Transformer(wl.model, seed=0, device=device)
    st1 = kernels.make_stepper(model, tcfg)
    tr, te = task.train, task.test
    one = stats(time_steps(lambda: st1.step(tr.tokens, tr.labels), device, warmup, timed))
    ev1 = stats(time_steps(lambda: (evaluate(model, tr.tokens, tr.labels), evaluate(model, te.tokens, te.labels)),
                           device, 1, max(2, timed // 5)))
    t1 = one + ev1 / k
    single = {"step_s": one, "eval_s": ev1, "seconds_per_step": t1, "runs_per_hour": 3600 / (steps * t1)}
    del st1, model
    rows = []
    for M in Ms:
        row = {"M": M}
        try:
            tasks = [Task(task.op, task.p, task.frac, i, task.layout, device=device) for i in range(M)]
            models = [Transformer(wl.model, seed=i, device=device) for i in range(M)]
            tcfgs = [dataclasses.replace(tcfg, seed=i, lr=tcfg.lr * (1 + 0.01 * i)) for i in range(M)]
            st = kernels.make_batched_stepper(models, tcfgs, ([t.train.tokens for t in tasks],
                                                              [t.train.labels for t in tasks]),
                                              ([t.test.tokens for t in tasks], [t.test.labels for t in tasks]))
            del models, tasks
            sm = stats(time_steps(st.step, device, warmup, timed))
            ev = stats(time_steps(st.evaluate, device, 1, max(2, timed // 5)))
            tm = sm + ev / k
            row.update(status="measured", step_s=sm, eval_s=ev, seconds_per_step=tm,
                       runs_per_hour=3600 * M / (steps * tm), single_runs_per_hour=single["runs_per_hour"],
                       speedup=M * t1 / tm)
            del st
        except torch.OutOfMemoryError as e:
            row.update(status="not available", reason=f"out of memory at M={M}: {str(e).splitlines()[0]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    return {"status": "measured", "workload": wl.describe(), "run_steps": steps, "eval_every": k,
            "single": single, "rows": rows}


def render_sweep_throughput(res: dict) -> str:
    """The sweep throughput result as a markdown table."""
    if res.get("status") != "measured":
        return f"sweep throughput: not available ({res.get('reason')})\n"
    s = res["single"]
    lines = [f"Sweep throughput, {res['workload']['label']}, runs of {res['run_steps']} steps, evaluation every "
             f"{res['eval_every']}: single fused run {s['seconds_per_step'] * 1e6:.1f} us/step, "
             f"{s['runs_per_hour']:.1f} runs/hour", "",
             "| M | us per batched step | runs/hour | single runs/hour | speed-up |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        if r["status"] == "measured":
            lines.append(f"| {r['M']} | {r['seconds_per_step'] * 1e6:.1f} | {r['runs_per_hour']:.1f} | "
                         f"{r['single_runs_per_hour']:.1f} | {r['speedup']:.1f}x |")
        else:
            lines.append(f"| {r['M']} | not available: {r['reason']} | | | |")
    return "\n".join(lines) + "\n"
