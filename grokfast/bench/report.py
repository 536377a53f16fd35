"""The report: ``run_report`` measures everything a plan asks for (step time, the floor, time to grok,
scaling) and ``write_report`` writes report.json (every raw figure), the figures and report.md."""
from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Callable

import torch

from .floor import datasheet_ceilings, datasheet_for, floors, fused_launches, measure_ceilings, step_cost
from .grok import time_to_grok
from .markdown import render_markdown
from .measure import attach_ratios_and_floor, measure_backend
from .plan import Plan, scaling_points
from .steppers import BACKENDS, TRAIN_BACKENDS
from .telemetry import Telemetry, environment
from .workload import make_workload


def run_report(plan: Plan, out_dir, command: str | None = None, progress: bool = True,
               log: Callable[[str], None] | None = None) -> dict:
    """Measure everything the plan asks for and write report.json (every raw figure), report.md and the
    figures into ``out_dir``. Returns the report dict."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = plan.device
    command = command if command is not None else " ".join(shlex.quote(a) for a in sys.argv)
    tel = Telemetry(device)
    env = environment(device, tel, command)
    log(f"bench: {env['device']}; telemetry: {tel.reason}")

    part, peaks = datasheet_for(env["device"]) if device.type == "cuda" else (None, None)
    ceilings = datasheet_ceilings(part, peaks)
    measured_ceilings = {}
    if plan.ceilings:
        measured_ceilings = measure_ceilings(device, plan.quick)
        ceilings.update(measured_ceilings)

    # Step time, every backend on the same work.
    wl = make_workload(plan.preset, device, **plan.method)
    steps = []
    for b in BACKENDS:
        steps.append(measure_backend(b, wl, device, plan.warmup, plan.timed, tel,
                                     skip_reason=plan.skipped.get(b), progress=progress))
    cost = step_cost(wl.model, wl.train, wl.task.train.tokens, wl.task.train.labels, wl.M)
    attach_ratios_and_floor(steps, cost, ceilings)
    launches = fused_launches(wl, cost)

    # Time to grok.
    grok_rows = []
    for spec in plan.grok:
        for b in BACKENDS:
            if b in plan.skipped and b in TRAIN_BACKENDS:
                grok_rows.append({"run": spec.label, "backend": b, "status": "not available",
                                  "reason": plan.skipped[b]})
                continue
            grok_rows.append(time_to_grok(spec, b, device, progress=progress))
    for r in grok_rows:
        if r.get("status") == "measured" and r.get("steps_to_grok") is not None:
            row_med = next((s["stats"]["median_s"] for s in steps if s["backend"] == r["backend"]
                            and s["status"] == "measured"), None)
            if (row_med is not None and r["preset"] == plan.preset and r.get("batch_size") is None
                    and r.get("grokfast") == wl.train.grokfast):
                r["step_seconds_to_grok"] = r["steps_to_grok"] * row_med
                r["step_seconds_note"] = ("steps to 99% x the median step time measured above (same preset, "
                                          "filter and full batch)")

    # Scaling.
    scaling = {axis: [] for axis in plan.scaling}
    for axis, value, swl in scaling_points(plan):
        rows = []
        for b in BACKENDS:
            skip = plan.skipped.get(b)
            if skip is None and b not in plan.scaling_backends:
                skip = "not run in the scaling sweep (pass --scaling-backends to include it)"
            rows.append(measure_backend(b, swl, device, plan.scaling_warmup, plan.scaling_timed, tel,
                                        skip_reason=skip, progress=progress))
        c = step_cost(swl.model, swl.train, swl.task.train.tokens, swl.task.train.labels, swl.M)
        attach_ratios_and_floor(rows, c, ceilings)
        scaling[axis].append({"value": value, "workload": swl.describe(), "cost": c,
                              "floors": floors(c, ceilings), "rows": rows})

    report = {"environment": env,
              "plan": {"quick": plan.quick, "device": str(device), "preset": plan.preset,
                       "backends": list(plan.backends), "skipped": plan.skipped, "warmup": plan.warmup,
                       "timed": plan.timed, "scaling": {k: list(v) for k, v in plan.scaling.items()},
                       "scaling_backends": list(plan.scaling_backends), "scaling_warmup": plan.scaling_warmup,
                       "scaling_timed": plan.scaling_timed,
                       "grok": [dataclasses.asdict(g) for g in plan.grok], "method": dict(plan.method)},
              "timing_method": ("CUDA events around every step, recorded back to back" if device.type == "cuda"
                                else "time.perf_counter around every step"),
              "workload": wl.describe(), "cost": cost, "ceilings": ceilings, "floors": floors(cost, ceilings),
              "steps": steps, "launches": launches, "grok": grok_rows, "scaling": scaling}
    write_report(report, out)
    return report


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.device, Path)):
        return str(o)
    return repr(o)


def write_report(report: dict, out: Path) -> dict:
    """report.json, the figures, report.md; returns {what: file name} of the figures."""
    from .. import plots
    from ..rundir import write_text

    out = Path(out)
    env = report["environment"]
    stamp = f"{env['device']}, {env['date_utc']}"
    figures = {}
    try:
        figures["step time"] = plots.bench_step_figure(report["steps"], out / "step_time.png",
                                                       title=f"one training step: {report['workload']['label']} ({stamp})").name
        for axis, pts in report["scaling"].items():
            if pts:
                figures[f"scaling: {axis}"] = plots.bench_scaling_figure(
                    axis, pts, out / f"scaling_{axis}.png", title=f"step time against {axis} ({stamp})").name
    except Exception as e:  # the numbers must survive a figure that fails
        report.setdefault("figure_errors", []).append(f"{type(e).__name__}: {e}")
    report["figures"] = figures
    write_text(out / "report.json", json.dumps(report, indent=1, default=_json_default) + "\n")
    write_text(out / "report.md", render_markdown(report, figures))
    return figures
