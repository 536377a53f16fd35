"""Sweeps: many runs over seeds and hyperparameters, one results table, resumable, spread over ranks.

    from grokfast.sweep import SweepSpec, run_sweep
    spec = SweepSpec(preset="small", grid={"lr": [1e-3, 3e-3], "wd": [0.5, 1.0]}, seeds=[0, 1],
                     fixed={"steps": 2000})
    result = run_sweep(spec, out="sweeps/lr-wd")        # 8 runs
    result.rows[0]["steps_to_grok"]                    # None: "did not grok" by the step limit
    run_sweep(resume="sweeps/lr-wd")                   # after a kill: finished runs are kept

A sweep is the Cartesian product of its grid axes and its seeds (``--random N`` samples N points
of the grid instead, each crossed with every seed). Every point becomes one run: a Task, a
ModelConfig and a TrainConfig built exactly as ``grokfast train`` builds them from the same
flags (the preset, then the fixed settings, then the point's values; ``seed`` seeds the model
init and, unless ``data_seed`` is given, the train/test split too).

Sweep directory:

    SWEEP_DIR/sweep.json            the spec (what --resume reads)
    SWEEP_DIR/runs/<run_id>/        one run directory per run (grokfast.rundir), plus result.json:
                                    its row of the table, written atomically when the run finishes
    SWEEP_DIR/results.json|.csv     the table: one row per finished run (config, steps and seconds
                                    to memorise and to grok, final accuracies), in run order
    SWEEP_DIR/phase.png             steps to grok over two swept axes ("did not grok" marked)
    SWEEP_DIR/curves.png            test (and train) accuracy of every run, overlaid

A run id is the swept values plus a hash of the run's full config, so it is the same in every
process and rank. A resumed sweep never repeats a run that has a result (in results.json or in
its result.json) and continues an unfinished run from its last checkpoint (train(resume=...)).

Work: by default a run stops at its first evaluation with test accuracy >= 99% (``after_grok``
steps more may be asked for, e.g. to watch clean-up). Executors turn a list of runs into result
rows; the sequential executor trains them one after another with grokfast.train (the reference
backend on a CPU). The batched executor (BatchedExecutor: M models in one launch on the fused
kernels, grokfast.kernels.make_batched_stepper) groups runs that share a model config and split
sizes, retires each run from its launch when it ends, and writes the same run directories; ``auto``
picks it on a CUDA GPU (runs it cannot batch go sequential), and says why not otherwise. On a CPU
``--executor batched`` runs only under TRITON_INTERPRET=1 with --backend fused (tests).

Under torchrun (WORLD_SIZE > 1) the runs still to do are dealt out round robin (rank r takes
the i-th remaining run when i % world == r); rows are gathered on rank 0 (gloo, which also
carries Python objects between GPU ranks), which writes the table.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import random as _random
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import rundir
from .config import ConfigError, ModelConfig, TrainConfig, preset as get_preset

# Axes a sweep can vary or fix, by where they go. Names are the `grokfast train` flags' (dashes as _).
TASK_AXES = ("op", "p", "frac", "data_seed", "layout")
MODEL_AXES = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "act", "layernorm", "attn_alpha")
TRAIN_AXES = ("seed", "lr", "wd", "beta1", "beta2", "warmup", "batch_size", "grokfast", "alpha", "lamb",
              "window", "steps", "eval_every", "checkpoint_every", "backend", "precision")
AXES = TASK_AXES + MODEL_AXES + TRAIN_AXES
INT_AXES = {"p", "data_seed", "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "seed", "warmup",
            "batch_size", "window", "steps", "eval_every", "checkpoint_every"}
FLOAT_AXES = {"frac", "attn_alpha", "lr", "wd", "beta1", "beta2", "alpha", "lamb"}
BOOL_AXES = {"layernorm"}
# Filter settings that only matter for some filters (used to drop duplicate runs).
FILTER_USES = {"alpha": ("ema",), "lamb": ("ema", "ma"), "window": ("ma",)}
GROK_ACC = 0.99  # the trainer's "grokked" threshold (grokfast.train.summarize)

RESULT_COLUMNS = ("outcome", "steps_to_memorize", "seconds_to_memorize", "steps_to_grok", "seconds_to_grok",
                  "final_train_acc", "final_test_acc", "final_train_loss", "final_test_loss", "steps_done",
                  "wall_seconds", "backend", "device")
CONFIG_COLUMNS = ("op", "p", "frac", "data_seed", "seed", "lr", "wd", "grokfast", "alpha", "lamb", "window",
                  "steps", "d_model", "d_mlp", "n_layers")
TIME_COLUMNS = ("seconds_to_memorize", "seconds_to_grok", "wall_seconds", "seconds_to_memorize_95",
                "seconds_to_grok_95", "steps_per_second")


# ----------------------------------------------------------------------------------------- spec

@dataclass(frozen=True)
class Range:
    """A continuous axis for random sampling: uniform on [lo, hi], or log-uniform when ``log``;
    integer axes draw integers in [lo, hi]."""

    lo: float
    hi: float
    log: bool = False

    def sample(self, rng: _random.Random, is_int: bool):
        if self.log:
            v = math.exp(rng.uniform(math.log(self.lo), math.log(self.hi)))
        else:
            v = rng.uniform(self.lo, self.hi)
        return int(round(v)) if is_int else float(f"{v:.6g}")

    def to_dict(self):
        return {"range": [self.lo, self.hi], "log": self.log}


@dataclass
class SweepSpec:
    """What to sweep.

    preset: the base settings (grokfast.config presets). fixed: axis -> one value, applied over the
    preset (the `grokfast train` flags). grid: axis -> list of values (or a Range, with ``random``).
    seeds: model seeds, crossed with every point. random: sample this many points of the grid
    (without replacement where every axis is a list) with ``sample_seed``, instead of the product.
    stop_at_grok: stop a run at its first evaluation with test acc >= 99%, then train ``after_grok``
    steps more (never past ``steps``).
    """

    preset: str = "small"
    grid: dict = field(default_factory=dict)
    seeds: list = field(default_factory=lambda: [0])
    fixed: dict = field(default_factory=dict)
    random: Optional[int] = None
    sample_seed: int = 0
    stop_at_grok: bool = True
    after_grok: int = 0

    def to_dict(self) -> dict:
        grid = {k: (v.to_dict() if isinstance(v, Range) else list(v)) for k, v in self.grid.items()}
        return {"preset": self.preset, "grid": grid, "seeds": list(self.seeds), "fixed": dict(self.fixed),
                "random": self.random, "sample_seed": self.sample_seed, "stop_at_grok": self.stop_at_grok,
                "after_grok": self.after_grok}

    @classmethod
    def from_dict(cls, d: dict) -> "SweepSpec":
        grid = {k: (Range(v["range"][0], v["range"][1], v["log"]) if isinstance(v, dict) else list(v))
                for k, v in d["grid"].items()}
        return cls(d["preset"], grid, list(d["seeds"]), dict(d["fixed"]), d["random"], d["sample_seed"],
                   d["stop_at_grok"], d["after_grok"])


def parse_value(axis: str, text: str):
    """One value of an axis from its text ('1e-3', 'true', 'ema')."""
    text = text.strip()
    try:
        if axis in INT_AXES:
            v = float(text)
            if v != int(v):
                raise ValueError
            return int(v)
        if axis in FLOAT_AXES:
            return float(text)
    except ValueError:
        kind = "an integer" if axis in INT_AXES else "a number"
        raise ConfigError(f"{axis}={text!r}: {axis} takes {kind}") from None
    if axis in BOOL_AXES:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{axis}={text!r}: {axis} takes true or false")
    return text


def parse_grid_arg(text: str) -> tuple[str, object]:
    """'lr=1e-3,3e-3' -> ("lr", [0.001, 0.003]); 'lr=1e-4..1e-2:log' -> ("lr", Range(...)).

    Values are separated by commas, except for op, whose values are separated by ';' (a comma inside
    an operation makes a multi-task mixture: 'op=x+y;x-y;x+y,x-y' is three tasks)."""
    if "=" not in text:
        raise ConfigError(f"--grid {text!r}: write AXIS=V1,V2 (e.g. --grid lr=1e-3,3e-3)")
    axis, vals = text.split("=", 1)
    axis = axis.strip().replace("-", "_")
    if axis not in AXES:
        raise ConfigError(f"--grid: unknown axis {axis!r}; axes: {', '.join(AXES)}")
    vals = vals.strip()
    m = re.fullmatch(r"(.+?)\.\.(.+?)(:log)?", vals)
    if m and axis in INT_AXES | FLOAT_AXES:
        lo, hi = parse_value(axis, m.group(1)), parse_value(axis, m.group(2))
        if not lo < hi:
            raise ConfigError(f"--grid {text!r}: a range needs low < high")
        if m.group(3) and lo <= 0:
            raise ConfigError(f"--grid {text!r}: a log range needs positive bounds")
        return axis, Range(float(lo), float(hi), bool(m.group(3)))
    parts = vals.split(";") if axis == "op" else vals.split(",")
    parts = [s.strip() for s in parts if s.strip()]
    if not parts:
        raise ConfigError(f"--grid {text!r} lists no values: write {axis}=V1,V2")
    return axis, [parse_value(axis, s) for s in parts]


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-7' (inclusive) or a mix: '0-3,10'."""
    seeds = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        try:
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo:
                    raise ConfigError(f"--seeds {text!r}: the range {part} is empty (write low-high)")
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise ConfigError(f"--seeds {text!r}: write seeds as 0,1,2 or 0-7") from None
    if not seeds:
        raise ConfigError(f"--seeds {text!r} lists no seeds: write e.g. --seeds 0,1,2 or 0-7")
    return seeds


# ------------------------------------------------------------------------------------ expansion

@dataclass
class RunSpec:
    """One run of a sweep: its place, its swept values and its full configuration."""

    index: int
    run_id: str
    point: dict          # the swept values (axis -> value), seed included
    task: dict           # grokfast.data.Task arguments: op, p, frac, seed, layout
    model: ModelConfig
    train: TrainConfig
    n_train: int = 0
    n_test: int = 0

    def config_row(self) -> dict:
        t, m, c = self.task, self.model, self.train
        return {"op": t["op"], "p": t["p"], "frac": t["frac"], "data_seed": t["seed"], "seed": c.seed,
                "lr": c.lr, "wd": c.wd, "grokfast": c.grokfast, "alpha": c.alpha, "lamb": c.lamb,
                "window": c.window, "steps": c.steps, "d_model": m.d_model, "d_mlp": m.d_mlp,
                "n_layers": m.n_layers}


def _points(spec: SweepSpec) -> list[dict]:
    """The grid points (without seeds), in order: the product, or ``random`` samples of it."""
    axes = list(spec.grid)
    ranges = [a for a in axes if isinstance(spec.grid[a], Range)]
    if spec.random is None:
        if ranges:
            raise ConfigError(f"--grid {ranges[0]}=LO..HI is a range: ranges need --random N")
        return [dict(zip(axes, vals)) for vals in itertools.product(*(spec.grid[a] for a in axes))]
    rng = _random.Random(spec.sample_seed)
    if not ranges:
        total = math.prod(len(spec.grid[a]) for a in axes)
        if spec.random > total:
            raise ConfigError(f"--random {spec.random} asks for more points than the grid has ({total}): "
                              f"lower --random or drop it for the full grid")
        picks = rng.sample(range(total), spec.random)
        everything = list(itertools.product(*(spec.grid[a] for a in axes)))
        return [dict(zip(axes, everything[i])) for i in picks]
    out = []
    for _ in range(spec.random):
        pt = {}
        for a in axes:
            v = spec.grid[a]
            pt[a] = v.sample(rng, a in INT_AXES) if isinstance(v, Range) else rng.choice(v)
        out.append(pt)
    return out


def _label(point: dict) -> str:
    def fmt(v):
        return f"{v:g}" if isinstance(v, float) else str(v)
    text = "-".join(f"{k}{fmt(v)}" for k, v in point.items())
    text = re.sub(r"[^A-Za-z0-9.+=_-]+", "_", text)
    return text[:64]


def _identity(task: dict, mcfg: ModelConfig, tcfg: TrainConfig) -> dict:
    """What makes a run what it is, for its id: the config less the filter settings its filter ignores."""
    t = tcfg.to_dict()
    for name, uses in FILTER_USES.items():
        if tcfg.grokfast not in uses:
            t.pop(name)
    t.pop("checkpoint_every")  # where checkpoints land does not change the run
    return {"task": task, "model": mcfg.to_dict(), "train": t}


def expand(spec: SweepSpec) -> list[RunSpec]:
    """The sweep's runs, in order, every config checked (ConfigError on the first bad one, before any work).

    Order: grid points (in the order the axes were given, the last axis fastest), each with every seed."""
    from .data import Task

    pre = get_preset(spec.preset)
    for a, v in list(spec.fixed.items()) + [(a, None) for a in spec.grid]:
        if a not in AXES:
            raise ConfigError(f"unknown setting {a!r}; axes: {', '.join(AXES)}")
    both = sorted(set(spec.fixed) & set(spec.grid))
    if both:
        raise ConfigError(f"{both[0]} is both fixed (--{both[0].replace('_', '-')}) and swept (--grid): pass one")
    if "seed" in spec.grid or "seed" in spec.fixed:
        raise ConfigError("give model seeds with --seeds, not --grid seed= or --seed")
    for a, vals in spec.grid.items():
        if isinstance(vals, Range):
            continue
        if len(vals) == 0:
            raise ConfigError(f"--grid {a}= lists no values: give at least one")
        if len(set(map(repr, vals))) != len(vals):
            raise ConfigError(f"--grid {a}: a value is listed twice in {vals}")
    if not spec.seeds:
        raise ConfigError("--seeds lists no seeds: give at least one")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError(f"--seeds: a seed is listed twice in {spec.seeds}")
    if spec.random is not None and spec.random < 1:
        raise ConfigError(f"--random must be >= 1, got {spec.random}")
    if spec.after_grok < 0:
        raise ConfigError(f"--after-grok must be >= 0, got {spec.after_grok}")
    if spec.after_grok and not spec.stop_at_grok:
        raise ConfigError("--after-grok N keeps training N steps after grokking, which --no-stop-at-grok "
                          "already does until --steps: pass one")
    filters = spec.grid.get("grokfast", [spec.fixed.get("grokfast", pre.train.grokfast)])
    for name, uses in FILTER_USES.items():
        if name in spec.grid and not any(f in uses for f in filters):
            raise ConfigError(f"{name} is swept but no run uses it (grokfast {', '.join(map(str, filters))}): "
                              f"add --grokfast {uses[0]} or drop --grid {name}=")

    runs, seen, tasks = [], set(), {}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for point in _points(spec):
        for seed in spec.seeds:
            s = {**spec.fixed, **point, "seed": seed}
            op = s.get("op", pre.task.op)
            layout = s.get("layout", pre.task.layout)
            if "op" in s and "layout" not in s and "," in str(op) and "op" not in layout:
                layout = "a op b ="  # a mixture needs operation tokens, as in `grokfast train`
            task_args = {"op": op, "p": s.get("p", pre.task.p), "frac": s.get("frac", pre.task.frac),
                         "seed": s.get("data_seed", seed), "layout": layout}
            tkey = (op, task_args["p"], task_args["frac"], layout)
            if tkey not in tasks:  # validates op, p, frac, layout; the split's sizes do not depend on the seed
                tasks[tkey] = Task(op, task_args["p"], task_args["frac"], 0, layout)
            task = tasks[tkey]
            task_args["op"] = task.op
            mcfg = dataclasses.replace(pre.model, **{k: v for k, v in s.items() if k in MODEL_AXES}).for_task(task)
            tover = {k: v for k, v in s.items() if k in train_fields}
            tover["stop_at_grok"] = spec.stop_at_grok
            tcfg = dataclasses.replace(pre.train, **tover)
            if tcfg.batch_size is not None and tcfg.batch_size > len(task.train):
                raise ConfigError(f"batch_size {tcfg.batch_size} exceeds the {len(task.train)} training examples "
                                  f"of {task.op} mod {task.p}: lower it")
            ident = json.dumps(_identity(task_args, mcfg, tcfg), sort_keys=True)
            if ident in seen:
                continue  # e.g. alpha swept alongside grokfast none: the same run twice
            seen.add(ident)
            digest = hashlib.sha1(ident.encode()).hexdigest()[:8]
            label = _label({**point, "seed": seed})
            runs.append(RunSpec(len(runs), f"{label}-{digest}", {**point, "seed": seed}, task_args, mcfg, tcfg,
                                len(task.train), len(task.test)))
    return runs


# --------------------------------------------------------------------------------------- memory

def bytes_per_model(mcfg: ModelConfig, tcfg: TrainConfig, n_train: int, n_test: int) -> int:
    """Estimated device bytes to train one model (float32 unless stated).

    state: N parameters x (weights, gradients, AdamW m and v, filter state: 1 for EMA, window for MA);
    activations of one step over B = batch_size (or n_train) examples, kept for backward (x2 for their
    gradients): per example and layer, n_ctx x (8 d_model + 3 n_heads n_ctx + 2 d_mlp) floats, and the
    logits (float32, their float64 copy and its gradient: 5 floats per class); evaluation over chunks
    of up to 32768 examples without gradients; the token tensors (int64, n_ctx + 1 per example).
    An estimate with a margin, not a measurement: the caller adds its own headroom."""
    N = mcfg.n_params()
    filt = {"none": 0, "ema": 1, "ma": tcfg.window}[tcfg.grokfast]
    state = 4 * N * (4 + filt)
    per_ex = mcfg.n_layers * mcfg.n_ctx * (8 * mcfg.d_model + 3 * mcfg.n_heads * mcfg.n_ctx + 2 * mcfg.d_mlp)
    per_ex += 5 * mcfg.d_vocab_out
    B = tcfg.batch_size or n_train
    train_act = 4 * per_ex * B * 2
    eval_act = 4 * per_ex * min(32768, max(n_train, n_test))
    data = 8 * (n_train + n_test) * (mcfg.n_ctx + 1)
    return int(state + max(train_act, eval_act) + data)


def available_bytes(device) -> int:
    """Free memory of the device: CUDA's free bytes, or on the CPU the RAM the OS reports available,
    shared between the processes of this machine under torchrun (LOCAL_WORLD_SIZE)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return free // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def check_memory(runs: list[RunSpec], models_at_once: int, available: int, headroom: float = 0.8) -> int:
    """Raise ConfigError unless ``models_at_once`` of the largest run fit in ``headroom`` x ``available``
    bytes; the message says how many fit. Returns the bytes one model needs."""
    need = max((bytes_per_model(r.model, r.train, r.n_train, r.n_test) for r in runs), default=0)
    budget = headroom * available
    if need * models_at_once > budget:
        fit = int(budget // need)
        if fit == 0:
            raise ConfigError(f"one model needs about {_human(need)} but only {_human(available)} are free "
                              f"(0 models fit): use a smaller model, p or batch, or free memory")
        raise ConfigError(f"{models_at_once} models at once need about {_human(models_at_once * need)} but only "
                          f"{_human(available)} are free: {fit} models fit, pass --models-per-launch {fit}")
    return need


def _human(n: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} bytes"


# ------------------------------------------------------------------------------------ executors

def batchable(r: RunSpec, device) -> Optional[str]:
    """None when run ``r`` can train in a batched launch on ``device``, else why not (one line)."""
    from .backends import resolve_backend

    if r.train.batch_size is not None:
        return "it trains on minibatches (the batched stepper is full batch)"
    try:
        backend, why = resolve_backend(r.train.backend, r.model, device)
    except ConfigError as e:
        return str(e)
    if backend != "fused":
        return f"its backend is {backend} ({why})"
    return None


def batched_status(device, runs: Optional[list] = None, explicit: bool = False) -> tuple[bool, str]:
    """(usable, reason) for the batched fused executor (M models per launch).

    On a CPU it is usable only when asked for (``explicit``, i.e. --executor batched) under
    TRITON_INTERPRET=1 for runs with --backend fused (tests), as grokfast.backends does for the fused
    backend. With ``runs``, at least one of them must be batchable (see ``batchable``)."""
    import torch

    from .backends import interpreter_on

    try:
        from grokfast import kernels
    except Exception as e:
        return False, f"grokfast.kernels cannot be imported ({type(e).__name__}: {e})"
    if getattr(kernels, "make_batched_stepper", None) is None:
        return False, "grokfast.kernels has no batched stepper (make_batched_stepper)"
    if torch.device(device).type != "cuda" and not (explicit and interpreter_on()):
        return False, ("it needs a CUDA GPU (this sweep runs on the CPU; under TRITON_INTERPRET=1, "
                       "--executor batched --backend fused runs it slowly in the Triton interpreter)")
    if runs:
        whys = [batchable(r, device) for r in runs]
        n = sum(w is None for w in whys)
        if n == 0:
            return False, f"no run can use it: {runs[0].run_id}: {whys[0]}"
        if n < len(runs):
            return True, f"{n} of {len(runs)} runs batched on the fused kernels; the rest run one by one"
    if torch.device(device).type != "cuda":
        return True, "Triton interpreter on the CPU (TRITON_INTERPRET=1): correct but slow, for tests"
    return True, "fused kernels on a CUDA GPU, runs grouped by model config and shape"


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


def batch_key(r: RunSpec) -> tuple:
    """Runs with equal keys can train in one launch: one ModelConfig, equal split sizes, the shared
    optimizer settings (beta1, beta2, eps, warm-up, filter kind and window), the same dot precision and
    the same evaluation and checkpoint schedule. Seeds, data seeds, lr, wd, alpha, lamb and steps may differ."""
    t = r.train
    return (json.dumps(r.model.to_dict(), sort_keys=True), r.n_train, r.n_test, t.beta1, t.beta2, t.eps,
            t.warmup, t.grokfast, t.window, t.eval_every, t.checkpoint_every, getattr(t, "measure_every", None),
            t.stop_at_grok, t.precision)


class BatchedExecutor:
    """Trains runs M at a time in one launch on the fused kernels (grokfast.kernels.make_batched_stepper).

    Runs are grouped by ``batch_key`` and by the step they start from (0, or the last checkpoint of a
    run continued after a kill): all models of one launch share the optimizer's step counter, so a
    resumed sweep trains each group of runs checkpointed at the same step together. In a batched sweep
    every unfinished run of a launch checkpoints at the same steps, so after a kill the runs of a
    launch normally form one group again (two only if the kill fell between two runs' checkpoint
    writes). Groups are cut into launches of at most ``models_per_launch`` (default: as many as fit
    in 80% of the free device memory, see bytes_per_model).

    Every run keeps its own run directory with the files a single run writes (config.json,
    metrics.jsonl, summary.json, checkpoints with the single steppers' keys, result.json), evaluated
    and checkpointed on its own TrainConfig's schedule, so `grokfast analyze` and `grokfast train
    --resume` work on it. A run stops costing work when it ends: when it groks (stop_at_grok, plus
    ``after_grok`` steps), reaches its steps, or diverges, the launch is compacted to the runs still
    training (BatchedStepper.compact). Runs that cannot be batched (see ``batchable``), and continued
    runs that had already grokked, go to the sequential executor.

    Differences from a single run, by construction: losses are evaluated in float32 by the fused
    kernels (the trainer evaluates the reference model in float64; they agree to float32 rounding, so
    a threshold crossing can move only if an accuracy lands within rounding of 99%, which needs a
    logit tie); "wall" is the launch's clock (shared by its runs) plus the run's time before a resume.
    """

    name = "batched"

    def __init__(self, device, after_grok: int = 0, log: Callable[[str], None] | None = None,
                 models_per_launch: Optional[int] = None, cuda_graph: Optional[bool] = None):
        self.device, self.after_grok = device, after_grok
        self.log = log or (lambda s: None)
        self.models_per_launch, self.cuda_graph = models_per_launch, cuda_graph

    def _start_step(self, r: RunSpec, run_dir: Path) -> Optional[int]:
        """The step a run continues from (0 for a new one), or None when the sequential path must take it
        (it grokked or reached its steps before the kill: train_one finishes it)."""
        if not (run_dir / "config.json").exists():
            return 0
        ckpts = rundir.list_checkpoints(run_dir)
        at = ckpts[-1][0] if ckpts else 0
        if at >= r.train.steps or (r.train.stop_at_grok and _first_grok(run_dir, at) is not None):
            return None
        return at

    def plan_launches(self, runs: list[RunSpec], sweep_dir: Path) -> tuple[list[tuple[int, list]], list]:
        """([(start step, runs of one launch)], runs for the sequential executor)."""
        groups: dict = {}
        rest = []
        for r in runs:
            start = self._start_step(r, Path(sweep_dir) / "runs" / r.run_id)
            if start is None or batchable(r, self.device) is not None:
                rest.append(r)
                continue
            groups.setdefault((batch_key(r), start), []).append(r)
        launches = []
        for (key, start), rs in groups.items():
            cap = self.models_per_launch
            if cap is None:
                need = bytes_per_model(rs[0].model, rs[0].train, rs[0].n_train, rs[0].n_test)
                cap = max(1, int(0.8 * available_bytes(self.device) // max(1, need)))
            for i in range(0, len(rs), cap):
                launches.append((start, rs[i:i + cap]))
        return launches, rest

    def run(self, runs: list[RunSpec], sweep_dir: Path, on_row: Callable[[dict], None]) -> None:
        launches, rest = self.plan_launches(runs, sweep_dir)
        for start, rs in launches:
            self._launch(rs, start, Path(sweep_dir), on_row)
        if rest:
            self.log(f"{len(rest)} runs cannot be batched here: training them one by one")
            SequentialExecutor(self.device, self.after_grok, self.log).run(rest, sweep_dir, on_row)

    def _launch(self, runs: list[RunSpec], start: int, sweep_dir: Path, on_row) -> None:
        import time

        import torch

        from grokfast import kernels
        from .data import Task
        from .model import Transformer
        from .train import Interrupted, _StopFlag, _environment, _rewrite_metrics, _title, summarize

        device = torch.device(self.device)
        M = len(runs)
        dirs = [sweep_dir / "runs" / r.run_id for r in runs]
        tasks = [Task(**r.task, device=device) for r in runs]
        models = [Transformer(r.model, seed=r.train.seed, device=device) for r in runs]
        st = kernels.make_batched_stepper(models, [r.train for r in runs],
                                          ([t.train.tokens for t in tasks], [t.train.labels for t in tasks]),
                                          ([t.test.tokens for t in tasks], [t.test.labels for t in tasks]),
                                          cuda_graph=self.cuda_graph)
        wall0 = [0.0] * M
        hist: list[list[dict]] = [[] for _ in range(M)]
        for i, d in enumerate(dirs):
            if start > 0:
                tensors, meta = rundir.load_checkpoint(rundir.checkpoint_path(d, start))
                st.load_state_dict(i, {k: v.to(device) for k, v in tensors.items()})
                wall0[i] = float(meta["wall"])
                hist[i] = [row for row in rundir.read_metrics(d) if row["step"] <= start]
            rundir.write_json(d / "config.json", {
                "model": runs[i].model.to_dict(), "task": tasks[i].spec(), "train": runs[i].train.to_dict(),
                "backend": "fused", "device": str(device), "environment": _environment()})
            _rewrite_metrics(d, hist[i])
        self.log(f"batched launch: {M} runs on the fused kernels from step {start} ({runs[0].model.d_model}-wide "
                 f"model, {runs[0].n_train} training examples each)")
        end = [r.train.steps for r in runs]       # the step each run stops at (moved at grokking)
        grokked = [False] * M
        measure = getattr(runs[0].train, "measure_every", None)
        scratch = Transformer(runs[0].model, device=device) if measure else None
        batch_rng = [torch.Generator().manual_seed(r.train.seed + 7919).get_state() for r in runs]
        t_start = time.perf_counter()

        def wall(i):
            return wall0[i] + (time.perf_counter() - t_start)

        def eval_rows(step, rows_wanted):
            """{model: metrics row} for the rows (batch positions) in rows_wanted; one host read."""
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            vals = torch.stack([v.double() for v in st.evaluate()]).cpu()   # [4, M']
            out = {}
            for row in rows_wanted:
                i = int(st.ids[row])
                tr_l, tr_a, te_l, te_a = (float(x) for x in vals[:, row])
                out[i] = {"step": step, "train_loss": tr_l, "test_loss": te_l, "train_acc": tr_a,
                          "test_acc": te_a, "wall": round(wall(i), 4)}
                if measure and step % measure == 0:
                    from .measures import cheap_measures
                    with torch.no_grad():
                        for n, v in st.layout.views(st.flat).items():
                            dict(scratch.named_parameters())[n].copy_(v[row])
                    out[i].update(cheap_measures(scratch, tasks[i]))
            return out

        def append(i, row):
            hist[i].append(row)
            with open(dirs[i] / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

        def save(row, step):
            i = int(st.ids[row])
            tensors = st.state_dict(row)
            tensors["rng.batch"] = batch_rng[i]
            rundir.save_checkpoint(dirs[i], step, tensors, {"step": step, "wall": wall(i), "backend": "fused"})

        def finish(i, step, outcome=None):
            if outcome is None:
                summary = summarize(hist[i], step, wall(i))
                w = summary["wall_seconds"]
                summary.update(backend="fused", device=str(device),
                               steps_per_second=round(step / w, 2) if w > 0 else None)
                rundir.write_json(dirs[i] / "summary.json", summary)
                try:
                    from .plots import grokking_figure
                    grokking_figure(hist[i], dirs[i] / "grokking.png",
                                    title=_title(tasks[i], runs[i].model, runs[i].train))
                except Exception as e:  # a figure must never cost the run
                    self.log(f"warning: could not draw the figure: {e}")
            else:
                summary = {}
            on_row(result_row(runs[i], dirs[i], summary, outcome))

        step = start
        if start == 0:
            for i, row in eval_rows(0, range(st.M)).items():
                append(i, row)
        eval_every, ckpt_every = runs[0].train.eval_every, runs[0].train.checkpoint_every
        ids = st.ids.tolist()
        min_end = min(end)
        with _StopFlag() as stop:
            while st.M > 0:
                st.step()
                step += 1
                if step % eval_every and step % ckpt_every and step < min_end and stop.signum is None:
                    continue  # nothing to read or write at this step: no host work per model
                rows = range(st.M)
                is_end = [end[i] == step for i in ids]
                evals = [k for k in rows if step % eval_every == 0 or is_end[k]]
                ckpts = [k for k in rows if step % ckpt_every == 0 or is_end[k] or stop.signum is not None]
                if not evals and not ckpts:
                    continue
                bad = st.first_bad.cpu()
                diverged = {}
                for k in sorted(set(evals) | set(ckpts)):
                    if int(bad[k]) >= 0:
                        i = ids[k]
                        c = rundir.list_checkpoints(dirs[i])
                        where = f"; the last good checkpoint is step {c[-1][0]} in {dirs[i]}" if c else ""
                        diverged[k] = (f"diverged: loss became NaN or inf at step {int(bad[k])}{where}: "
                                       f"lower --lr or --lamb")
                done, just_grokked = set(diverged), set()
                wanted = [k for k in evals if k not in diverged]
                for i, row in (eval_rows(step, wanted) if wanted else {}).items():
                    append(i, row)
                    if runs[i].train.stop_at_grok and not grokked[i] and row["test_acc"] >= GROK_ACC:
                        grokked[i] = True
                        just_grokked.add(i)
                        end[i] = min(step + self.after_grok, runs[i].train.steps)
                        if end[i] == step:
                            self.log(f"{runs[i].run_id}: test accuracy {row['test_acc']:.4f} >= 0.99 at step "
                                     f"{step}: stopping (--stop-at-grok)")
                for k in rows:
                    i = ids[k]
                    if k in diverged:
                        continue
                    if k in ckpts or end[i] == step or i in just_grokked:
                        save(k, step)
                    if end[i] == step:
                        done.add(k)
                for k in sorted(done):
                    i = ids[k]
                    finish(i, step, diverged.get(k))
                if stop.signum is not None:
                    raise Interrupted(step, sweep_dir)
                if done:
                    keep = [k for k in rows if k not in done]
                    if not keep:
                        break
                    st.compact(keep)
                    ids = st.ids.tolist()
                min_end = min(end[i] for i in ids)


def _first_grok(run_dir: Path, upto: int) -> Optional[int]:
    for row in rundir.read_metrics(run_dir):
        if row["step"] <= upto and row["test_acc"] >= GROK_ACC:
            return row["step"]
    return None


def train_one(r: RunSpec, run_dir: Path, device, after_grok: int = 0, log=None) -> dict:
    """Train (or continue) one run in ``run_dir`` and return its row; writes run_dir/result.json."""
    from .data import Task
    from .train import train, TrainingDiverged

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


# ---------------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    """This process's place under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_here: bool = False

    def gather(self, obj) -> list:
        """obj from every rank, in rank order (every rank gets the list)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as td
        out = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world > 1:
            import torch.distributed as td
            td.barrier()

    def close(self):
        if self.started_here:
            import torch.distributed as td
            td.destroy_process_group()


def dist_from_env() -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo; a long timeout, since ranks wait at the
    final gather for the slowest rank's runs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import datetime
    import torch.distributed as td

    started = False
    if not td.is_initialized():
        td.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        started = True
    return Dist(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), started)


# -------------------------------------------------------------------------------- results table

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


# ------------------------------------------------------------------------------------- the sweep

def plan(spec: SweepSpec, device=None, executor: str = "auto", models_per_launch: Optional[int] = None,
         memory_bytes: Optional[int] = None):
    """Check everything before work: (runs, executor name, bytes per model). ConfigError on bad input."""
    import torch
    from .train import default_device

    device = torch.device(device) if device is not None else default_device()
    runs = expand(spec)
    if executor not in ("auto", "sequential", "batched"):
        raise ConfigError(f"--executor must be auto, sequential or batched, got {executor!r}")
    ok, why = batched_status(device, runs, explicit=(executor == "batched"))
    if executor == "batched" and not ok:
        raise ConfigError(f"batched fused executor: not available ({why}); use --executor sequential")
    chosen = "batched" if executor == "batched" or (executor == "auto" and ok) else "sequential"
    if models_per_launch is not None:
        if models_per_launch < 1:
            raise ConfigError(f"--models-per-launch must be >= 1, got {models_per_launch}")
        if chosen == "sequential" and models_per_launch > 1:
            raise ConfigError(f"--models-per-launch {models_per_launch} needs the batched executor, which is not "
                              f"available ({why}); the sequential executor trains one model at a time")
    from .backends import resolve_backend
    checked = set()
    for r in runs:  # e.g. --backend fused on a CPU: refused here, not at the first run
        if (r.train.backend, r.model) not in checked:
            resolve_backend(r.train.backend, r.model, device)
            checked.add((r.train.backend, r.model))
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
            spec, sweep_dir = _open(spec, out, resume)
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

        run_log = _once_log(log) if dist.rank == 0 else (lambda s: None)
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


def _open(spec, out, resume) -> tuple[SweepSpec, Path]:
    """(spec, sweep directory) of a new sweep (``out``) or of one to continue (``resume``)."""
    if resume is not None:
        if spec is not None or out is not None:
            raise ConfigError("--resume continues a sweep with its own spec: drop the grid and --out")
        sweep_dir = Path(resume)
        if not (sweep_dir / "sweep.json").exists():
            raise ConfigError(f"{sweep_dir} is not a sweep directory (no sweep.json): pass the folder "
                              f"that `grokfast sweep --out` wrote")
        return SweepSpec.from_dict(rundir.read_json(sweep_dir / "sweep.json")), sweep_dir
    if spec is None or out is None:
        raise ConfigError("a sweep needs a spec and --out SWEEP_DIR (or --resume SWEEP_DIR)")
    sweep_dir = Path(out)
    if (sweep_dir / "sweep.json").exists():
        raise ConfigError(f"{sweep_dir} already holds a sweep: continue it with --resume {sweep_dir}, "
                          f"or pick another --out")
    return spec, sweep_dir


def _once_log(log):
    """Pass the trainer's messages through, except its per-run backend line after the first."""
    seen = [False]

    def f(msg: str):
        if msg.startswith("backend:"):
            if seen[0]:
                return
            seen[0] = True
        log(msg)
    return f


# -------------------------------------------------------------------------------------- figures

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
    from . import plots

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
