"""One row of the step-time tables: a backend's step on a workload, timed with telemetry around the
timed steps, or 'not available' with the reason (``measure_backend``); then the speed-ups, floor fractions
and weight differences across the rows (``attach_ratios_and_floor``)."""
from __future__ import annotations

import math
import traceback

import torch

from .floor import floors
from .steppers import COMPILE_MODES, EAGER, backend_status, make_steppers
from .telemetry import Telemetry
from .timing import _progress, time_stats, time_steps
from .workload import Workload


def measure_backend(name: str, wl: Workload, device, warmup: int, timed: int, telemetry: Telemetry,
                    skip_reason: str | None = None, progress: bool = False) -> dict:
    """One row: the backend's step on the workload, measured, or 'not available' with the reason."""
    ok, reason = backend_status(name, wl, device, skip_reason=skip_reason)
    row = {"backend": name, "workload": wl.label, "M": wl.M}
    if not ok:
        row.update(status="not available", reason=reason)
        return row
    tok, lab = wl.task.train.tokens, wl.task.train.labels
    bar = _progress(warmup + timed, f"{name} {wl.label}", progress)
    try:
        models: list = []
        steppers = make_steppers(name, wl, device, models)

        def step():
            for s in steppers:
                s.step(tok, lab)

        mark = {}
        res = time_steps(step, device, warmup, timed, on_timed_start=lambda: mark.update(t=telemetry.begin()),
                         progress=bar.update if bar is not None else None)
        tel = telemetry.end(mark.get("t"), timed)
    except Exception as e:  # an honest failure is a result too: say what broke
        first_line = str(e).splitlines()[0] if str(e) else ""
        row.update(status="not available", reason=f"failed while running: {type(e).__name__}: {first_line}",
                   error=traceback.format_exc())
        return row
    finally:
        if bar is not None:
            bar.close()
    row.update(status="measured", reason=reason, stats=time_stats(res["times_s"], res["wall_s"]),
               first_step_s=res["first_step_s"], warmup_s=res["warmup_s"], warmup=warmup, times_s=res["times_s"])
    if name in COMPILE_MODES:
        row["compile_s_note"] = "first_step_s includes compiling forward, backward and the optimizer"
    if name.startswith("fused"):
        # how the timed steps ran: "cuda-graph" (captured and replayed) or "eager" (a failed capture raises)
        row["step_mode"] = getattr(steppers[0], "mode", "eager")
        row["cuda_graph_captured"] = row["step_mode"] == "cuda-graph"
    if tel is not None:
        row["telemetry"] = tel
    # every backend took the same steps from the same weights: compare the first model's at the end
    row["_final_params"] = {n: p.detach().to("cpu", torch.float64, copy=True) for n, p in models[0].named_parameters()}
    return row


def attach_ratios_and_floor(rows: list[dict], cost: dict, ceilings: dict) -> None:
    """speedup_vs_eager (eager median / median) and floor fractions (floor / median) on measured rows."""
    eager = next((r for r in rows if r["backend"] == EAGER and r["status"] == "measured"), None)
    fl = floors(cost, ceilings)
    ref = eager.get("_final_params") if eager else None
    for r in rows:
        if r["status"] != "measured":
            continue
        med = r["stats"]["median_s"]
        r["speedup_vs_eager"] = eager["stats"]["median_s"] / med if eager else None
        r["speedup_vs"] = {o["backend"]: o["stats"]["median_s"] / med for o in rows
                           if o["status"] == "measured" and o is not r}
        r["fraction_of_floor"] = {k: v["floor_s"] / med for k, v in fl.items()}
        mine = r.get("_final_params")
        if ref is not None and mine is not None:
            # ||theta - theta_eager|| / ||theta_eager|| over all parameters after the same steps: the same
            # work was done (float32 rounding grows over many steps, so this is a figure, not a pass/fail)
            num = math.sqrt(sum(float((mine[n] - ref[n]).pow(2).sum()) for n in ref))
            den = math.sqrt(sum(float(ref[n].pow(2).sum()) for n in ref))
            r["params_rel_diff_vs_eager"] = num / den if den > 0 else None
    for r in rows:
        r.pop("_final_params", None)
