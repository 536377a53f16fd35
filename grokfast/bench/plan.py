"""What one report measures: the backends, step counts, time-to-grok runs and scaling grids chosen from
the command line and the device (``make_plan``), and the workloads of the scaling points."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..config import ConfigError, preset as get_preset
from .steppers import BACKENDS, COMPILE_MODES, EAGER
from .workload import Workload, make_workload


SCALING_AXES = ("p", "frac", "d_model", "M")


@dataclass(frozen=True)
class GrokSpec:
    """One time-to-grok run: a preset with train-config overrides, capped at max_steps."""

    label: str
    preset: str
    max_steps: int
    eval_every: int
    overrides: dict = field(default_factory=dict)


@dataclass
class Plan:
    """Everything one report measures; ``make_plan`` builds it from the command line's choices."""

    quick: bool
    device: torch.device
    preset: str
    backends: tuple
    skipped: dict                 # backend -> reason it is not run in this plan
    warmup: int
    timed: int
    grok: tuple                   # GrokSpec, ...
    scaling: dict                 # axis -> values
    scaling_backends: tuple
    scaling_warmup: int
    scaling_timed: int
    ceilings: bool = True
    method: dict = dataclasses.field(default_factory=dict)   # TrainConfig overrides every workload takes:
                                                              # loss, orthograd (grokfast compare's fused methods)


def make_plan(quick: bool = False, device=None, preset: str | None = None, backends=None,
              scaling_backends=None, timed: int | None = None, warmup: int | None = None,
              grok: bool = True, scaling: bool = True, grok_max_steps: int | None = None,
              loss: str = "ce", orthograd: bool = False) -> Plan:
    """Validate the choices (ConfigError, before any work) and fill in the defaults for the device.

    Defaults: nanda on a GPU, small (x+y mod 31) on a CPU. --quick: fewer steps, small scaling grids, and
    the torch.compile backends left out unless named in ``backends`` (compiling takes tens of seconds to
    minutes: that is not a quick run). loss ("ce" | "stablemax") and orthograd: the training method every
    timed step, scaling point and time-to-grok run uses (Plan.method; the defaults add nothing)."""
    from ..train import default_preset_name, resolve_device

    device = resolve_device(device)
    preset = preset or default_preset_name(device)
    get_preset(preset)

    def parse(names, what):
        if names is None:
            return None
        if isinstance(names, str):
            names = [s.strip() for s in names.split(",") if s.strip()]
        bad = [n for n in names if n not in BACKENDS]
        if bad or not names:
            raise ConfigError(f"{what} {','.join(bad) or '(empty)'} unknown; choose from: {', '.join(BACKENDS)}")
        return tuple(dict.fromkeys(names))

    chosen = parse(backends, "--backends")
    skipped = {}
    if chosen is None:
        chosen = BACKENDS
        if quick:
            for b in COMPILE_MODES:
                skipped[b] = ("not run in --quick: torch.compile takes tens of seconds to minutes to compile; "
                              "run without --quick, or name it in --backends")
    else:
        for b in BACKENDS:
            if b not in chosen:
                skipped[b] = "not asked for (--backends)"
    if EAGER not in chosen:
        raise ConfigError(f"--backends must include {EAGER}: every ratio is taken against it")
    sb = parse(scaling_backends, "--scaling-backends") or tuple(b for b in (EAGER, "fused", "fused-cudagraph"))
    for name, v in (("--timed-steps", timed), ("--warmup-steps", warmup), ("--grok-max-steps", grok_max_steps)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    gpu = device.type == "cuda"

    if quick:
        w, n = (20, 200) if gpu else (2, 10)
        sw, sn = (10, 50) if gpu else (1, 3)
        axes = {"p": (11, 31) if not gpu else (31, 113, 257), "frac": (0.3, 0.7),
                "d_model": (32, 128) if not gpu else (64, 128, 256), "M": (1, 2) if not gpu else (1, 8)}
        if gpu:
            runs = (GrokSpec("nanda, Grokfast-EMA", "nanda", 5000, 10, {"grokfast": "ema"}),)
        else:
            runs = (GrokSpec("small (x+y mod 31), Grokfast-EMA, capped", "small", 100, 25, {}),)
    else:
        w, n = (50, 500) if gpu else (10, 100)
        sw, sn = (10, 100) if gpu else (3, 20)
        axes = {"p": (31, 59, 97, 113, 167, 211, 257), "frac": (0.1, 0.3, 0.5, 0.7, 0.9),
                "d_model": (32, 64, 128, 256), "M": (1, 4, 16, 64)}
        # Grokfast paper (Lee et al. 2024): x*y mod 97, EMA alpha 0.98, lamb 2.0, weight decay 0.005.
        runs = (GrokSpec("nanda, no filter", "nanda", 25000, 50, {"grokfast": "none"}),
                GrokSpec("nanda, Grokfast-EMA", "nanda", 25000, 10, {"grokfast": "ema"}),
                GrokSpec("Grokfast paper task (power), baseline", "power", 100000, 100, {"grokfast": "none"}),
                GrokSpec("Grokfast paper task (power), Grokfast-EMA", "power", 20000, 10,
                         {"grokfast": "ema", "alpha": 0.98, "lamb": 2.0, "wd": 0.005}))
        if not gpu:
            runs = (GrokSpec("small (x+y mod 31), Grokfast-EMA", "small", 3000, 25, {}),
                    GrokSpec("small (x+y mod 31), no filter", "small", 3000, 25, {"grokfast": "none"}))
    if grok_max_steps is not None:
        runs = tuple(dataclasses.replace(r, max_steps=grok_max_steps) for r in runs)
    if loss not in ("ce", "stablemax"):
        raise ConfigError(f"--loss must be ce or stablemax, got {loss!r}")
    if not isinstance(orthograd, bool):
        raise ConfigError(f"orthograd must be true or false, got {orthograd!r}")
    method = {k: v for k, v in (("loss", loss), ("orthograd", orthograd)) if v != {"loss": "ce", "orthograd": False}[k]}
    runs = tuple(dataclasses.replace(r, overrides={**r.overrides, **method}) for r in runs)
    if grok:
        for r in runs:
            get_preset(r.preset)
    return Plan(quick, device, preset, chosen, skipped, warmup or w, timed or n, runs if grok else (),
                axes if scaling else {}, sb, sw, sn, method=method)


def scaling_points(plan: Plan) -> list[tuple[str, object, Workload]]:
    out = []
    for axis, values in plan.scaling.items():
        for v in values:
            kw = {axis: v}
            out.append((axis, v, make_workload(plan.preset, plan.device, label=f"{plan.preset} {axis}={v}", **kw,
                                               **plan.method)))
    return out
