"""The sequential executor: runs trained one after another with ``grokfast.train`` (``train_one``
continues a run that has a run directory and honours stop_at_grok / after_grok)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from .. import rundir
from .results import result_row
from .runs import RunSpec


GROK_ACC = 0.99  # the trainer's "grokked" threshold (grokfast.train.summarize)


class SequentialExecutor:
    """Trains runs one after another with grokfast.train (backend auto: the reference on a CPU).

    An executor's contract: ``run(runs, sweep_dir, on_row)`` trains every RunSpec (continuing any
    that has a run directory), calls ``on_row(row)`` as each finishes, and honours stop_at_grok /
    after_grok. The batched executor stacks the runs' parameters into the flat [M, N] layout and
    steps them together, retiring each model from the batch when it groks (BatchedExecutor)."""

    name = "sequential"

    def __init__(self, device, after_grok: int = 0, log: Callable[[str], None] | None = None):
        self.device, self.after_grok = device, after_grok
        self.log = log or (lambda s: None)

    def run(self, runs: list[RunSpec], sweep_dir: Path, on_row: Callable[[dict], None]) -> None:
        for r in runs:
            on_row(train_one(r, Path(sweep_dir) / "runs" / r.run_id, self.device, self.after_grok, self.log))


def _first_grok(run_dir: Path, upto: int) -> Optional[int]:
    for row in rundir.read_metrics(run_dir):
        if row["step"] <= upto and row["test_acc"] >= GROK_ACC:
            return row["step"]
    return None


def train_one(r: RunSpec, run_dir: Path, device, after_grok: int = 0, log=None) -> dict:
    """Train (or continue) one run in ``run_dir`` and return its row; writes run_dir/result.json."""
    from ..data import Task
    from ..train import train, TrainingDiverged

    log = log or (lambda s: None)
    tcfg = r.train
    kw = dict(device=device, progress=False, log=log)
    try:
        run = None
        if (run_dir / "config.json").exists():
            ckpts = rundir.list_checkpoints(run_dir)
            at = ckpts[-1][0] if ckpts else 0
            grok = _first_grok(run_dir, at) if tcfg.stop_at_grok else None
            if grok is None:  # still before grokking (or training to the end): continue as configured
                run = train(resume=run_dir, steps=tcfg.steps, stop_at_grok=tcfg.stop_at_grok, **kw)
        else:
            task = Task(**r.task, device=device)
            run = train(task, r.model, tcfg, out=run_dir, **kw)
        grok = run.summary["steps_to_grok"] if run is not None else grok
        if tcfg.stop_at_grok and grok is not None and (after_grok or run is None):
            target = min(grok + after_grok, tcfg.steps)
            run = train(resume=run_dir, steps=target, stop_at_grok=False, **kw)
        summary, outcome = run.summary, None
    except TrainingDiverged as e:
        summary, outcome = {}, f"diverged: {e}"
    return result_row(r, run_dir, summary, outcome)
