"""The results table: a run's row (``result_row``, also written as its result.json), results.json and
results.csv (``write_results``, ``load_results``), the rows of the runs already finished (for resume),
and ``SweepResult``."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import rundir
from ..config import ConfigError
from .runs import RunSpec
from .spec import SweepSpec


RESULT_COLUMNS = ("outcome", "steps_to_memorize", "seconds_to_memorize", "steps_to_grok", "seconds_to_grok",
                  "final_train_acc", "final_test_acc", "final_train_loss", "final_test_loss", "steps_done",
                  "wall_seconds", "backend", "device")
CONFIG_COLUMNS = ("op", "p", "frac", "data_seed", "seed", "lr", "wd", "grokfast", "alpha", "lamb", "window",
                  "optimizer", "loss", "orthograd", "lr_matched", "steps", "d_model", "d_mlp", "n_layers")
TIME_COLUMNS = ("seconds_to_memorize", "seconds_to_grok", "wall_seconds", "seconds_to_memorize_95",
                "seconds_to_grok_95", "steps_per_second")


def result_row(r: RunSpec, run_dir: Path, summary: dict, outcome: Optional[str] = None) -> dict:
    """The run's row of the results table from its summary (grokfast.train.summarize); writes
    run_dir/result.json."""
    row = {"index": r.index, "run_id": r.run_id, **{f"point.{k}": v for k, v in r.point.items()},
           **r.config_row()}
    if outcome is None:
        if summary.get("steps_to_grok") is not None:
            outcome = "grokked"
        elif summary.get("steps_to_memorize") is not None:
            outcome = "did not grok"
        else:
            outcome = "did not memorise"
    row["outcome"] = outcome
    for k in RESULT_COLUMNS[1:]:
        row[k] = summary.get(k)
    rundir.write_json(run_dir / "result.json", row)
    return row


@dataclass
class SweepResult:
    dir: Path
    spec: SweepSpec
    rows: list                    # one dict per run, in run order
    executor: str = "sequential"

    def __repr__(self):
        g = sum(r["outcome"] == "grokked" for r in self.rows)
        return f"SweepResult(dir={str(self.dir)!r}, runs={len(self.rows)}, grokked={g})"


def columns(rows: list[dict]) -> list[str]:
    cols = ["index", "run_id"]
    for r in rows:
        for k in r:
            if k.startswith("point.") and k not in cols:
                cols.append(k)
    cols += [c for c in CONFIG_COLUMNS if c not in cols] + list(RESULT_COLUMNS)
    return cols


def write_results(sweep_dir: Path, spec: SweepSpec, rows: list[dict], n_runs: int) -> None:
    """results.json (spec, columns, rows) and results.csv, both atomically; in the CSV an empty
    steps_to_grok reads with its outcome ("did not grok")."""
    rows = sorted(rows, key=lambda r: r["index"])
    cols = columns(rows)
    rundir.write_json(Path(sweep_dir) / "results.json", {
        "sweep": spec.to_dict(), "n_runs": n_runs, "complete": len(rows) == n_runs, "columns": cols, "rows": rows})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    rundir.write_text(Path(sweep_dir) / "results.csv", buf.getvalue())


def load_results(sweep_dir) -> list[dict]:
    """The rows of a sweep's results table (results.json), in run order."""
    path = Path(sweep_dir) / "results.json"
    if not path.exists():
        raise ConfigError(f"{sweep_dir} has no results.json: pass the folder that `grokfast sweep --out` wrote")
    return rundir.read_json(path)["rows"]


def _finished(sweep_dir: Path, runs: list[RunSpec]) -> dict[str, dict]:
    """run_id -> row of every run with a result: results.json's rows and the runs' result.json."""
    ids = {r.run_id: r for r in runs}
    done = {}
    p = Path(sweep_dir) / "results.json"
    if p.exists():
        for row in rundir.read_json(p)["rows"]:
            if row["run_id"] in ids:
                done[row["run_id"]] = row
    for r in runs:
        f = Path(sweep_dir) / "runs" / r.run_id / "result.json"
        if r.run_id not in done and f.exists():
            done[r.run_id] = rundir.read_json(f)
    for rid, row in done.items():
        row["index"] = ids[rid].index
    return done
