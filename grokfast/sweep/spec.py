"""What to sweep: the axes a sweep can vary or fix (the `grokfast train` flags), ``SweepSpec`` (grid or
random samples, seeds, fixed settings) with its continuous ``Range``, and the parsing of the command
line's --grid and --seeds values."""
from __future__ import annotations

import math
import random as _random
import re
from dataclasses import dataclass, field
from typing import Optional

from ..config import ConfigError


# Axes a sweep can vary or fix, by where they go. Names are the `grokfast train` flags' (dashes as _).
TASK_AXES = ("op", "p", "frac", "data_seed", "layout")
MODEL_AXES = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "act", "layernorm", "attn_alpha")
TRAIN_AXES = ("seed", "lr", "wd", "beta1", "beta2", "warmup", "batch_size", "grokfast", "alpha", "lamb",
              "window", "steps", "eval_every", "checkpoint_every", "backend", "precision",
              "optimizer", "warmup_schedule", "minibatches", "eval_train", "rng",      # the papers' semantics
              "loss", "orthograd", "muon_lr", "muon_momentum", "lr_matched")            # grokfast compare's methods
AXES = TASK_AXES + MODEL_AXES + TRAIN_AXES
INT_AXES = {"p", "data_seed", "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "seed", "warmup",
            "batch_size", "window", "steps", "eval_every", "checkpoint_every"}
FLOAT_AXES = {"frac", "attn_alpha", "lr", "wd", "beta1", "beta2", "alpha", "lamb", "muon_lr", "muon_momentum"}
BOOL_AXES = {"layernorm", "eval_train", "orthograd", "lr_matched"}
# Filter settings that only matter for some filters (used to drop duplicate runs).
FILTER_USES = {"alpha": ("ema",), "lamb": ("ema", "ma"), "window": ("ma",)}


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
