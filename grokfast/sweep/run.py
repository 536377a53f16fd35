"""Running a sweep: ``plan`` checks everything before work (runs, executor, memory), and ``run_sweep`` runs
or resumes a sweep, deals the runs out over torchrun ranks, writes the table as runs finish and draws the
figures."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

from .. import rundir
from ..config import ConfigError
from .batched import BatchedExecutor, batched_status
from .dist import Dist, dist_from_env
from .figures import draw_figures
from .memory import _human, available_bytes, check_memory
from .results import SweepResult, _finished, write_results
from .runs import expand
from .sequential import SequentialExecutor
from .spec import SweepSpec


def choose_executor(runs: list, device, executor: str) -> tuple[str, str]:
    """(executor name, why) for ``runs`` on ``device``: ``batched`` when asked for, or for ``auto`` where
    batched_status allows it, else ``sequential``. ConfigError for an unknown name or a batched executor
    that cannot run here."""
    if executor not in ("auto", "sequential", "batched"):
        raise ConfigError(f"--executor must be auto, sequential or batched, got {executor!r}")
    ok, why = batched_status(device, runs, explicit=(executor == "batched"))
    if executor == "batched" and not ok:
        raise ConfigError(f"batched fused executor: not available ({why}); use --executor sequential")
    return ("batched" if executor == "batched" or (executor == "auto" and ok) else "sequential"), why


def check_backends(runs: list, device) -> None:
    """Resolve the backend of every distinct run config on ``device``, so that one it cannot run (e.g.
    --backend fused on a CPU, or with muon) is refused here, before the first run (ConfigError)."""
    from ..backends import resolve_backend

    checked = set()
    for r in runs:
        if (r.train.backend, r.model, r.train) not in checked:
            resolve_backend(r.train.backend, r.model, device, r.train)
            checked.add((r.train.backend, r.model, r.train))


def plan(spec: SweepSpec, device=None, executor: str = "auto", models_per_launch: Optional[int] = None,
         memory_bytes: Optional[int] = None):
    """Check everything before work: (runs, executor name, bytes per model). ConfigError on bad input."""
    import torch
    from ..train import default_device

    device = torch.device(device) if device is not None else default_device()
    runs = expand(spec)
    chosen, why = choose_executor(runs, device, executor)
    if models_per_launch is not None:
        if models_per_launch < 1:
            raise ConfigError(f"--models-per-launch must be >= 1, got {models_per_launch}")
        if chosen == "sequential" and models_per_launch > 1:
            raise ConfigError(f"--models-per-launch {models_per_launch} needs the batched executor, which is not "
                              f"available ({why}); the sequential executor trains one model at a time")
    check_backends(runs, device)
    at_once = models_per_launch or 1
    free = memory_bytes if memory_bytes is not None else available_bytes(device)
    need = check_memory(runs, at_once, free)
    return runs, chosen, need


def run_sweep(spec: SweepSpec | None = None, out=None, *, resume=None, device=None, executor: str = "auto",
              models_per_launch: Optional[int] = None, memory_bytes: Optional[int] = None,
              figures: bool = True, phase_axes: Optional[tuple] = None, log: Callable[[str], None] | None = None,
              dist: Optional[Dist] = None) -> SweepResult:
    """Run (or resume) a sweep and return its table; see the module docstring.

    ``out``: a new sweep directory. ``resume``: a sweep directory to continue (its sweep.json is the
    spec). ``dist``: this process's rank (default: from the torchrun environment). Every rank returns
    the full table."""
    import torch

    log = log or (lambda msg: print(msg, file=sys.stderr))
    own_dist = dist is None
    dist = dist or dist_from_env()
    try:
        # Every rank checks the input; if any rank refuses, all raise (none waits at a barrier forever).
        err = None
        try:
            spec, sweep_dir = open_sweep_dir(spec, out, resume)
            if device is None:
                device = torch.device(f"cuda:{dist.local_rank % torch.cuda.device_count()}"
                                      if torch.cuda.is_available() else "cpu")
            runs, chosen, need = plan(spec, device, executor, models_per_launch, memory_bytes)
        except ConfigError as e:
            err = e
        errors = dist.gather(None if err is None else str(err))
        if err is not None:
            raise err
        bad = next((i for i, e in enumerate(errors) if e), None)
        if bad is not None:
            raise ConfigError(f"rank {bad}: {errors[bad]}")
        dist.barrier()  # every rank has checked the input before rank 0 writes anything
        if dist.rank == 0 and resume is None:
            rundir.write_json(sweep_dir / "sweep.json", spec.to_dict())
        dist.barrier()

        done = {}
        for part in dist.gather(_finished(sweep_dir, runs)):
            done.update(part)
        todo = [r for r in runs if r.run_id not in done]
        mine = todo[dist.rank::dist.world]
        if dist.rank == 0:
            where = f" on {dist.world} ranks" if dist.world > 1 else ""
            why = batched_status(device, runs, explicit=(executor == "batched"))[1]
            why = f" ({'batched unavailable: ' if chosen == 'sequential' else ''}{why})" if executor != "sequential" else ""
            log(f"sweep: {len(runs)} runs ({len(done)} finished, {len(todo)} to do{where}); executor: {chosen}{why}; "
                f"device: {device}; about {_human(need)} per model; {sweep_dir}")
        rows = dict(done)
        count = [len(done)]

        def on_row(row):
            rows[row["run_id"]] = row
            count[0] += 1
            g = row["steps_to_grok"]
            what = (f"grokked at step {g}" if g is not None else row["outcome"] if row["steps_done"] is None
                    else f"{row['outcome']} by step {row['steps_done']}")
            acc = row["final_test_acc"]
            acc = "" if acc is None else f", final test acc {acc:.4f}"
            where = (f"[{count[0]}/{len(runs)}]" if dist.world == 1
                     else f"[rank {dist.rank}] [{count[0] - len(done)}/{len(mine)}]")
            log(f"{where} {row['run_id']}: {what}{acc}")
            if dist.rank == 0:  # the table so far (with other ranks' runs finished on a shared disk)
                on_disk = _finished(sweep_dir, runs) if dist.world > 1 else {}
                write_results(sweep_dir, spec, list({**on_disk, **rows}.values()), len(runs))

        run_log = once_backend_line(log) if dist.rank == 0 else (lambda s: None)
        if chosen == "batched":
            BatchedExecutor(device, spec.after_grok, run_log, models_per_launch).run(mine, sweep_dir, on_row)
        else:
            SequentialExecutor(device, spec.after_grok, run_log).run(mine, sweep_dir, on_row)

        merged = {}
        for part in dist.gather(rows):
            merged.update(part)
        table = sorted(merged.values(), key=lambda r: r["index"])
        if dist.rank == 0:
            write_results(sweep_dir, spec, table, len(runs))
            if figures:
                draw_figures(sweep_dir, spec, table, phase_axes, log)
        dist.barrier()
        return SweepResult(sweep_dir, spec, table, chosen)
    finally:
        if own_dist:
            dist.close()


def open_sweep_dir(spec, out, resume) -> tuple[SweepSpec, Path]:
    """(spec, sweep directory) of a new sweep (``out``) or of one to continue (``resume``)."""
    return rundir.open_spec_dir(spec, out, resume, "sweep.json", SweepSpec, command="sweep", kind="sweep",
                                needs="a spec", drop="the grid")


def once_backend_line(log):
    """Pass the trainer's messages through, except its per-run backend line after the first."""
    seen = [False]

    def f(msg: str):
        if msg.startswith("backend:"):
            if seen[0]:
                return
            seen[0] = True
        log(msg)
    return f
