"""The sweep's figures: the data of the phase diagram (steps to grok over two swept axes) and of the
overlaid curves, and ``draw_figures``, which has grokfast.plots draw them into the sweep directory."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from .. import rundir
from .spec import SweepSpec


def swept_axes(spec: SweepSpec) -> list[str]:
    return list(spec.grid) + (["seed"] if len(spec.seeds) > 1 else [])


def phase_data(rows: list[dict], x: str, y: str) -> dict:
    """Steps to grok over two axes, for plots.phase_diagram.

    Cells are (y value, x value); runs sharing a cell (other axes, seeds) are summarised by the median
    (the lower median) of their steps to grok with "did not grok" counted as infinity, so a cell's value
    is a step count when at least half its runs grokked (NaN otherwise: drawn as "did not grok").
    Returns {"x": name, "y": name, "x_values", "y_values", "steps" [ny][nx] (float, NaN = did not grok,
    None = no run), "grokked" [ny][nx], "runs" [ny][nx]}."""
    def get(r, a):
        return r.get(f"point.{a}", r.get(a))

    def key(v):
        return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))

    xs = sorted({get(r, x) for r in rows}, key=key)
    ys = sorted({get(r, y) for r in rows}, key=key)
    steps = [[None] * len(xs) for _ in ys]
    grokked = [[0] * len(xs) for _ in ys]
    total = [[0] * len(xs) for _ in ys]
    for j, yv in enumerate(ys):
        for i, xv in enumerate(xs):
            cell = [r for r in rows if get(r, x) == xv and get(r, y) == yv]
            if not cell:
                continue
            vals = [math.inf if r["steps_to_grok"] is None else float(r["steps_to_grok"]) for r in cell]
            med = statistics.median_low(vals)
            steps[j][i] = float("nan") if math.isinf(med) else med
            grokked[j][i] = sum(r["steps_to_grok"] is not None for r in cell)
            total[j][i] = len(cell)
    return {"x": x, "y": y, "x_values": xs, "y_values": ys, "steps": steps, "grokked": grokked, "runs": total}


def curves_data(sweep_dir, rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """(label, metrics history) of every run, for plots.sweep_curves."""
    out = []
    for r in rows:
        label = ", ".join(f"{k[6:]}={v:g}" if isinstance(v, float) else f"{k[6:]}={v}"
                          for k, v in r.items() if k.startswith("point."))
        out.append((label or r["run_id"], rundir.read_metrics(Path(sweep_dir) / "runs" / r["run_id"])))
    return out


def draw_figures(sweep_dir, spec: SweepSpec, rows: list[dict], phase_axes=None, log=None) -> list[Path]:
    """phase.png (when two axes vary) and curves.png in the sweep directory."""
    from .. import plots

    log = log or (lambda s: None)
    made = []
    try:
        axes = list(phase_axes) if phase_axes else swept_axes(spec)[:2]
        if len(axes) == 2:
            data = phase_data(rows, axes[0], axes[1])
            made.append(plots.phase_diagram(data, Path(sweep_dir) / "phase.png",
                                            title=f"steps to grok (test acc >= 99%), {len(rows)} runs"))
        made.append(plots.sweep_curves(curves_data(sweep_dir, rows), Path(sweep_dir) / "curves.png",
                                       title=f"{len(rows)} runs"))
    except Exception as e:  # a figure must never cost the sweep
        log(f"warning: could not draw the sweep figures: {type(e).__name__}: {e}")
    return made
