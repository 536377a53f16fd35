"""Time to grok: ``grokfast.train`` with stop_at_grok on one of the trainer's backends, steps and wall
seconds until test accuracy first reaches 95% and 99% (``time_to_grok``)."""
from __future__ import annotations

import dataclasses

from ..config import preset as get_preset
from ..data import Task
from .plan import GrokSpec
from .steppers import TRAIN_BACKENDS, backend_status
from .timing import _progress
from .workload import Workload


def time_to_grok(spec: GrokSpec, backend: str, device, progress: bool = False) -> dict:
    """grokfast.train with stop_at_grok on one of the trainer's backends; steps and wall seconds to 95%
    and 99% test accuracy (wall from the trainer's clock: it includes the evaluations every eval_every
    steps)."""
    from ..train import train

    row = {"run": spec.label, "backend": backend, "preset": spec.preset, "max_steps": spec.max_steps,
           "eval_every": spec.eval_every, "overrides": dict(spec.overrides)}
    tb = TRAIN_BACKENDS.get(backend)
    if tb is None:
        why = ("grokfast.train's fused backend replays the step's CUDA graph: see the fused-cudagraph row"
               if backend == "fused" else
               "grokfast.train trains with the reference (eager) or the fused stepper; the compiled step is "
               "timed in the step table only")
        row.update(status="not available", reason=why)
        return row
    pre = get_preset(spec.preset)
    task = Task.from_spec(pre.task, seed=0, device=device)
    tcfg = dataclasses.replace(pre.train, steps=spec.max_steps, eval_every=spec.eval_every, stop_at_grok=True,
                               backend=tb, checkpoint_every=max(spec.max_steps, 1), **spec.overrides)
    wl = Workload(spec.label, task, pre.model.for_task(task), tcfg)
    ok, reason = backend_status(backend, wl, device)
    if not ok:
        row.update(status="not available", reason=reason)
        return row
    bar = _progress(spec.max_steps, f"grok: {spec.label} [{backend}]", progress)
    logs: list[str] = []
    try:
        run = train(task, wl.model, tcfg, device=device, progress=False, log=logs.append,
                    on_step=(lambda s: bar.update(1)) if bar is not None else None)
    except Exception as e:
        row.update(status="not available", reason=f"failed while training: {type(e).__name__}: {e}")
        return row
    finally:
        if bar is not None:
            bar.close()
    s = run.summary
    row.update(status="measured", reason=reason, trainer_log=logs,
               task=task.spec(), batch_size=tcfg.batch_size, grokfast=tcfg.grokfast, wd=tcfg.wd,
               steps_to_grok_95=s.get("steps_to_grok_95"), seconds_to_grok_95=s.get("seconds_to_grok_95"),
               steps_to_grok=s.get("steps_to_grok"), seconds_to_grok=s.get("seconds_to_grok"),
               steps_done=s["steps_done"], wall_seconds=s["wall_seconds"],
               final_test_acc=s.get("final_test_acc"), final_train_acc=s.get("final_train_acc"),
               history=run.history)
    return row
