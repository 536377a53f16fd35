"""The run list: a spec expanded into its runs (``expand``), each a ``RunSpec`` with its swept values, its
full task, model and train configs, and a run id that is the same in every process and rank."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import random as _random
import re
from dataclasses import dataclass

from ..config import ConfigError, ModelConfig, TrainConfig, preset as get_preset
from .spec import AXES, FILTER_USES, INT_AXES, MODEL_AXES, Range, SweepSpec


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
                "window": c.window, "optimizer": c.optimizer, "loss": c.loss, "orthograd": c.orthograd,
                "lr_matched": c.lr_matched, "steps": c.steps, "d_model": m.d_model, "d_mlp": m.d_mlp,
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
        if tcfg.grokfast not in uses and not (name == "lamb" and tcfg.lr_matched):
            t.pop(name)
    t.pop("checkpoint_every")  # where checkpoints land does not change the run
    if t["rng"] == "independent":
        t.pop("rng")           # the default before the field existed: earlier sweeps keep their run ids
    # the other methods' settings (grokfast compare) count only where they are not the defaults, so the
    # ids of runs made before they existed do not change; Muon's only with Muon
    defaults = TrainConfig()
    for name in ("loss", "orthograd", "lr_matched", "muon_lr", "muon_momentum"):
        unused = name.startswith("muon_") and tcfg.optimizer != "muon"
        if unused or t[name] == getattr(defaults, name):
            t.pop(name)
    m = mcfg.to_dict()
    # Furuta et al.'s and openai/grok's quirks: only where they are on, so runs made before them keep their ids
    for name in ("pos_embed", "mlp_bias", "extra_tokens", "ln_position"):
        if m[name] == getattr(ModelConfig(), name):
            m.pop(name)
    return {"task": task, "model": m, "train": t}


def expand(spec: SweepSpec) -> list[RunSpec]:
    """The sweep's runs, in order, every config checked (ConfigError on the first bad one, before any work).

    Order: grid points (in the order the axes were given, the last axis fastest), each with every seed."""
    from ..data import Task

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
    matched = spec.grid.get("lr_matched", [spec.fixed.get("lr_matched", pre.train.lr_matched)])
    for name, uses in FILTER_USES.items():
        if name == "lamb" and any(matched):
            continue  # lr_matched runs use lamb too
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
            if tcfg.rng == "stream" and "data_seed" in s:
                raise ConfigError("data_seed does nothing with rng stream (each run's split is drawn from its seed's "
                                  "generator): drop it, or pass --rng independent")
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
