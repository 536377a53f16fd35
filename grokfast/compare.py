"""`grokfast compare`: the ways to grok faster side by side on one task, N seeds each.

    import grokfast
    res = grokfast.compare(preset="small", methods=["adamw", "ema", "lr-matched", "orthograd:wd=0"],
                           seeds=[0, 1, 2], out="compare/small", steps=3000)
    print(res.markdown)                                   # the table; res.summary has its rows as dicts
    grokfast.compare(resume="compare/small")              # after a kill: finished runs are kept

A method is a name from METHODS, optionally with its own settings after a colon (any TrainConfig
setting a sweep can fix: ``ema:lamb=5``, ``orthograd:wd=0,lr=0.01``); the whole text is its label. Every
method starts from the same base (the preset, then the task, model and training settings given to
compare), adds its own defaults (its paper's, see METHODS), then its settings from the text. So a
method changes only what makes it that method unless told otherwise: the base lr and weight decay are
the task's, which is what "side by side on one task" means here. Each (method, seed) is one run,
trained until its first evaluation with test accuracy >= 99% or the step cap (``steps``).

The runs are a sweep's runs (grokfast.sweep.RunSpec) and go through the sweep's executors: in turn on a
CPU (reference backend); on a GPU, batched where the fused kernels run the method, in turn on the reference
where they refuse it. Which is which is the fused path's own answer (grokfast.sweep.batchable, from
grokfast.kernels.optimizer.unsupported_training), and which runs share a launch the sweep's rule
(grokfast.sweep.batch_key: e.g. adamw and lr-matched share one, each filter kind has its own); ``launch_plan``
says it, and compare prints it before the first run.

Compare directory:

    COMPARE_DIR/compare.json        the spec (what resume reads)
    COMPARE_DIR/runs/<run_id>/      one run directory per (method, seed), plus its result.json
    COMPARE_DIR/results.json|.csv   one row per finished run (the sweep's columns plus point.method)
    COMPARE_DIR/table.md|.csv|.json per method: runs, how many grokked, median [min, max] of steps and
                                    seconds to memorise (train acc >= 99%) and to grok (test acc >= 99%)
    COMPARE_DIR/curves.png          test accuracy per method: median over seeds, band min to max
"""
from __future__ import annotations

import csv
import io
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import rundir
from .config import ConfigError

# name -> (its own settings, where they come from). Base lr, wd and the rest are the task's.
METHODS = {
    "adamw": ({}, "plain AdamW at the task's lr and weight decay"),
    "ema": ({"grokfast": "ema", "alpha": 0.98, "lamb": 2.0}, "Grokfast-EMA, Lee et al. 2024: alpha 0.98, lamb 2"),
    "ma": ({"grokfast": "ma", "window": 100, "lamb": 5.0}, "Grokfast-MA, Lee et al. 2024: window 100, lamb 5"),
    "lr-matched": ({"lr_matched": True, "lamb": 2.0},
                   "AdamW at lr * (1 + lamb), lamb 2: Grokfast-EMA's steady-state gain as a learning rate, no filter"),
    "orthograd": ({"orthograd": True}, "orthogonal gradient, Prieto et al. 2025 (their runs: wd 0; add :wd=0)"),
    "stablemax": ({"loss": "stablemax"}, "StableMax cross-entropy, Prieto et al. 2025 (their runs: wd 0)"),
    "muon": ({"optimizer": "muon", "muon_lr": 0.02, "muon_momentum": 0.95},
             "Muon (Jordan et al.'s defaults: lr 0.02, momentum 0.95, Nesterov, 5 NS steps) on the hidden "
             "matrices, AdamW for the rest"),
}
DEFAULT_METHODS = ("adamw", "ema", "ma", "lr-matched", "orthograd", "stablemax", "muon")
GROK_ACC = 0.99


def parse_method(text: str) -> tuple[str, dict]:
    """'ema:lamb=5,alpha=0.9' -> ("ema", {"lamb": 5.0, "alpha": 0.9}); ConfigError on a bad name or setting."""
    from .sweep import AXES, TASK_AXES, MODEL_AXES, parse_value

    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if name not in METHODS:
        raise ConfigError(f"--method {text!r}: unknown method {name!r}; methods: {', '.join(METHODS)}")
    over = {}
    for part in filter(None, (s.strip() for s in rest.split(","))):
        if "=" not in part:
            raise ConfigError(f"--method {text!r}: write settings as NAME:KEY=VALUE,KEY=VALUE (e.g. ema:lamb=5)")
        k, v = (s.strip() for s in part.split("=", 1))
        k = k.replace("-", "_")
        if k not in AXES or k in TASK_AXES or k in MODEL_AXES or k == "seed":
            raise ConfigError(f"--method {text!r}: {k!r} is not a training setting a method can change "
                              f"(task and model settings are shared by all methods; seeds come from --seeds)")
        if k in over:
            raise ConfigError(f"--method {text!r}: {k} is given twice")
        over[k] = parse_value(k, v)
    return name, over


@dataclass
class CompareSpec:
    """What to compare: methods (texts, see parse_method) x seeds on one task.

    preset: the base settings; fixed: task, model and training settings over the preset (sweep axes,
    e.g. {"op": "x+y", "p": 113, "frac": 0.4, "steps": 1000, "eval_every": 20}); steps is the cap."""

    preset: str = "small"
    methods: list = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    fixed: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"preset": self.preset, "methods": list(self.methods), "seeds": list(self.seeds),
                "fixed": dict(self.fixed)}

    @classmethod
    def from_dict(cls, d: dict) -> "CompareSpec":
        return cls(d["preset"], list(d["methods"]), list(d["seeds"]), dict(d["fixed"]))


def expand(spec: CompareSpec) -> list:
    """The runs, method by method, seed by seed, each a grokfast.sweep.RunSpec with point {"method": label,
    "seed": s}; every config checked before any work (ConfigError)."""
    from .sweep import RunSpec, SweepSpec, expand as sweep_expand

    if not spec.methods:
        raise ConfigError("no methods to compare: give at least one --method (e.g. --method adamw --method ema)")
    labels = [m.strip() for m in spec.methods]
    dup = next((m for m in labels if labels.count(m) > 1), None)
    if dup:
        raise ConfigError(f"--method {dup!r} is listed twice: give each method once (or with different settings)")
    bad = sorted(k for k in spec.fixed if k == "seed" or k in ("stop_at_grok",))
    if bad:
        raise ConfigError(f"{bad[0]} cannot be fixed in a comparison: seeds come from --seeds")
    runs = []
    for label in labels:
        name, over = parse_method(label)
        own = {**METHODS[name][0], **over}
        fixed = {k: v for k, v in spec.fixed.items() if k not in own}
        fixed.update(own)
        try:
            part = sweep_expand(SweepSpec(preset=spec.preset, grid={}, seeds=list(spec.seeds), fixed=fixed,
                                          stop_at_grok=True))
        except ConfigError as e:
            raise ConfigError(f"method {label!r}: {e}") from None
        slug = re.sub(r"[^A-Za-z0-9.+=_-]+", "_", label)[:48]
        for r in part:
            digest = r.run_id.rsplit("-", 1)[1]
            seed = r.train.seed
            runs.append(RunSpec(len(runs), f"{slug}-seed{seed}-{digest}", {"method": label, "seed": seed},
                                r.task, r.model, r.train, r.n_train, r.n_test))
    return runs


@dataclass
class CompareResult:
    dir: Path
    spec: CompareSpec
    rows: list            # one per run (the sweep's result rows, with point.method)
    summary: list         # one per method (see summarize)
    executor: str = "sequential"

    @property
    def markdown(self) -> str:
        return markdown_table(self.summary, self.spec)

    def __repr__(self):
        return f"CompareResult(dir={str(self.dir)!r}, methods={len(self.summary)}, runs={len(self.rows)})"


def _median_spread(vals: list, cap) -> dict:
    """median (the lower one, None = not reached counted as +infinity), min and max of what was reached."""
    reached = sorted(v for v in vals if v is not None)
    med = statistics.median_low([math.inf if v is None else v for v in vals]) if vals else math.inf
    return {"median": None if math.isinf(med) else med, "min": reached[0] if reached else None,
            "max": reached[-1] if reached else None, "reached": len(reached), "runs": len(vals)}


def summarize(spec: CompareSpec, rows: list[dict]) -> list[dict]:
    """One dict per method (in the spec's order): label, runs, grokked, and for each of steps_to_memorize,
    seconds_to_memorize, steps_to_grok, seconds_to_grok the median over the method's runs (the lower
    median, a run that never got there counted as +infinity, so None when half or more did not), and the
    min and max over the runs that got there; cap (the step limit)."""
    out = []
    for label in spec.methods:
        mine = [r for r in rows if r.get("point.method") == label]
        s = {"method": label, "runs": len(mine), "grokked": sum(r["steps_to_grok"] is not None for r in mine),
             "cap": mine[0]["steps"] if mine else None, "description": METHODS[parse_method(label)[0]][1]}
        for k in ("steps_to_memorize", "seconds_to_memorize", "steps_to_grok", "seconds_to_grok"):
            s[k] = _median_spread([r.get(k) for r in mine], s["cap"])
        out.append(s)
    return out


def _fmt(d: dict, cap, secs: bool) -> str:
    def num(v):
        return f"{v:.1f}" if secs else f"{int(v)}"
    if d["runs"] == 0:
        return ""
    med = num(d["median"]) if d["median"] is not None else (f"> {cap}" if not secs else "n/a")
    if d["reached"] == 0:
        return med if not secs else "n/a"
    hi = num(d["max"]) if d["reached"] == d["runs"] else (f"> {cap}" if not secs else f"{num(d['max'])}+")
    return f"{med} [{num(d['min'])}, {hi}]"


def markdown_table(summary: list[dict], spec: CompareSpec) -> str:
    """The table as markdown: median [min, max] over seeds; '> cap' where a run did not get there by the
    step cap (seconds: 'n/a', or 'max+' when some runs did not get there)."""
    head = ("| method | grokked | steps to memorise | seconds to memorise | steps to grok | seconds to grok |\n"
            "| --- | --- | --- | --- | --- | --- |\n")
    lines = []
    for s in summary:
        cap = s["cap"]
        lines.append(f"| {s['method']} | {s['grokked']}/{s['runs']} | {_fmt(s['steps_to_memorize'], cap, False)} | "
                     f"{_fmt(s['seconds_to_memorize'], cap, True)} | {_fmt(s['steps_to_grok'], cap, False)} | "
                     f"{_fmt(s['seconds_to_grok'], cap, True)} |")
    return head + "\n".join(lines) + "\n"


def write_table(compare_dir: Path, spec: CompareSpec, summary: list[dict]) -> None:
    """table.md, table.csv (flat columns) and table.json in the compare directory, atomically."""
    d = Path(compare_dir)
    rundir.write_json(d / "table.json", {"compare": spec.to_dict(), "methods": summary})
    rundir.write_text(d / "table.md", markdown_table(summary, spec))
    cols = ["method", "runs", "grokked", "cap"]
    for k in ("steps_to_memorize", "seconds_to_memorize", "steps_to_grok", "seconds_to_grok"):
        cols += [f"{k}_median", f"{k}_min", f"{k}_max"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for s in summary:
        row = [s["method"], s["runs"], s["grokked"], s["cap"]]
        for k in ("steps_to_memorize", "seconds_to_memorize", "steps_to_grok", "seconds_to_grok"):
            row += ["" if s[k][q] is None else s[k][q] for q in ("median", "min", "max")]
        w.writerow(row)
    rundir.write_text(d / "table.csv", buf.getvalue())


def curves_data(compare_dir, spec: CompareSpec, rows: list[dict]) -> list[dict]:
    """Per method: {"method", "steps", "median", "lo", "hi", "runs"}: test accuracy at every evaluation step
    of any of its runs, median and min/max over its seeds. A run that stopped (it grokked) holds its last
    value from then on, so the band shows where each seed has got to."""
    out = []
    for label in spec.methods:
        hists = [rundir.read_metrics(Path(compare_dir) / "runs" / r["run_id"])
                 for r in rows if r.get("point.method") == label]
        hists = [h for h in hists if h]
        if not hists:
            continue
        steps = sorted({row["step"] for h in hists for row in h})
        med, lo, hi = [], [], []
        for s in steps:
            vals = []
            for h in hists:
                before = [row["test_acc"] for row in h if row["step"] <= s]
                vals.append(before[-1] if before else h[0]["test_acc"])
            med.append(statistics.median(vals))
            lo.append(min(vals))
            hi.append(max(vals))
        out.append({"method": label, "steps": steps, "median": med, "lo": lo, "hi": hi, "runs": len(hists)})
    return out


def open_compare_dir(spec, out, resume) -> tuple[CompareSpec, Path]:
    """(spec, compare directory) of a new comparison (``out``) or of one to continue (``resume``)."""
    return rundir.open_spec_dir(spec, out, resume, "compare.json", CompareSpec, command="compare",
                                kind="comparison", needs="methods", drop="the methods")


def plan(spec: CompareSpec, device=None, executor: str = "auto", memory_bytes: Optional[int] = None):
    """Check everything before work: (runs, executor name). ConfigError on bad input."""
    import torch

    from .sweep import available_bytes, check_memory
    from .sweep.run import check_backends, choose_executor
    from .train import default_device

    device = torch.device(device) if device is not None else default_device()
    runs = expand(spec)
    chosen = choose_executor(runs, device, executor)[0]
    check_backends(runs, device)   # e.g. --backend fused with muon: refused here, before the first run
    check_memory(runs, 1, memory_bytes if memory_bytes is not None else available_bytes(device))
    return runs, chosen


def launch_plan(runs: list, device, chosen: str, compare_dir, executor: str = "auto",
                models_per_launch: Optional[int] = None) -> tuple[Optional[tuple], list[str]]:
    """(the batched executor's plan, or None when the runs go in turn; lines that say it): which runs train
    batched on the fused kernels, grouped into which launches (methods and seeds), and which in turn and why.
    The plan is BatchedExecutor.plan_launches' own, so what is printed is what runs."""
    import torch

    from .sweep import BatchedExecutor, batchable, batched_status

    if chosen != "batched":
        why = "asked for" if executor == "sequential" else f"batched unavailable: {batched_status(device, runs)[1]}"
        return None, [f"plan: {len(runs)} runs in turn, one after another ({why})"]
    ex = BatchedExecutor(torch.device(device), models_per_launch=models_per_launch)
    launches, rest = ex.plan_launches(runs, compare_dir)
    lines = []
    for k, (start, rs) in enumerate(launches, 1):
        methods = {}
        for r in rs:
            methods.setdefault(r.point["method"], []).append(str(r.point["seed"]))
        what = "; ".join(f"{m} (seeds {','.join(seeds)})" for m, seeds in methods.items())
        since = f" from step {start}" if start else ""
        lines.append(f"plan: launch {k}: {len(rs)} runs batched on the fused kernels{since}: {what}")
    alone = {}
    for r in rest:
        why = batchable(r, device) or "continued after it had ended: finished on its own"
        alone.setdefault((r.point["method"], why), []).append(str(r.point["seed"]))
    for (m, why), seeds in alone.items():
        lines.append(f"plan: {m} (seeds {','.join(seeds)}): in turn, one by one: {why}")
    return (launches, rest), lines


def compare(methods=None, seeds=None, *, preset: Optional[str] = None, out=None, resume=None, device=None,
            executor: str = "auto", figures: bool = True, log: Callable[[str], None] | None = None,
            memory_bytes: Optional[int] = None, **fixed) -> CompareResult:
    """Run (or resume) a comparison and return its result; see the module docstring.

    methods: texts (default DEFAULT_METHODS); seeds (default 0, 1, 2); preset (default: nanda on a GPU,
    small on a CPU); ``fixed``: task, model and training settings for every method (op, p, frac, steps,
    lr, wd, eval_every, ...). ``resume``: a compare directory to continue (nothing else may be given)."""
    from .sweep import BatchedExecutor, SequentialExecutor, write_results
    from .sweep.run import once_backend_line
    from .sweep.results import _finished
    from .train import default_preset_name, resolve_device

    log = log or (lambda msg: print(msg, file=sys.stderr))
    dev = resolve_device(device)
    spec = None
    if resume is None:
        spec = CompareSpec(preset or default_preset_name(dev),
                           list(methods) if methods is not None else list(DEFAULT_METHODS),
                           list(seeds) if seeds is not None else [0, 1, 2], dict(fixed))
    elif methods is not None or seeds is not None or preset is not None or fixed:
        raise ConfigError("resume continues a comparison with its own spec: drop the methods, seeds and settings")
    spec, cdir = open_compare_dir(spec, out, resume)
    runs, chosen = plan(spec, dev, executor, memory_bytes)
    if resume is None:
        rundir.write_json(cdir / "compare.json", spec.to_dict())
    done = _finished(cdir, runs)
    todo = [r for r in runs if r.run_id not in done]
    log(f"compare: {len(spec.methods)} methods x {len(spec.seeds)} seeds = {len(runs)} runs ({len(done)} finished, "
        f"{len(todo)} to do); executor: {chosen}; device: {dev}; {cdir}")
    rows = dict(done)

    def on_row(row):
        rows[row["run_id"]] = row
        g = row["steps_to_grok"]
        what = f"grokked at step {g}" if g is not None else f"{row['outcome']} by step {row['steps_done']}"
        log(f"[{len(rows)}/{len(runs)}] {row['point.method']}, seed {row['point.seed']}: {what}")
        write_results(cdir, spec, list(rows.values()), len(runs))

    quiet = once_backend_line(log)
    launches, lines = launch_plan(todo, dev, chosen, cdir, executor)
    for line in lines:
        log(line)
    if chosen == "batched":
        BatchedExecutor(dev, 0, quiet).run(todo, cdir, on_row, plan=launches)
    else:
        SequentialExecutor(dev, 0, quiet).run(todo, cdir, on_row)
    table = sorted(rows.values(), key=lambda r: r["index"])
    write_results(cdir, spec, table, len(runs))
    summary = summarize(spec, table)
    write_table(cdir, spec, summary)
    if figures:
        try:
            from .plots import compare_figure
            t = runs[0].task
            compare_figure(curves_data(cdir, spec, table), cdir / "curves.png",
                           title=f"{t['op']} mod {t['p']}, {round(t['frac'] * 100)}% train: test accuracy, "
                                 f"median and min-max over {len(spec.seeds)} seeds")
        except Exception as e:  # a figure must never cost the comparison
            log(f"warning: could not draw the figure: {type(e).__name__}: {e}")
    return CompareResult(cdir, spec, table, summary, chosen)

