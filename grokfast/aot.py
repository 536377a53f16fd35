"""Every fused kernel compiled ahead of time at the presets' shapes, on a machine with no GPU.

The compiling and the resource readings (registers, shared memory, spills) are grokfast.kernels.aot's;
this module gives it the presets' shapes (the model with its task's token layout, and the examples per
step) and holds the command line:

    python -m grokfast.aot [--arch 80 90] [--presets nanda power pizza] [--models 1 64] [--json]

prints one row per kernel and architecture and exits 1 if any kernel spills. Under TRITON_INTERPRET=1
(which makes kernels uncompilable) it runs the compilation in a fresh Python without that variable.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PRESETS = ("nanda", "power", "pizza")


def preset_shapes(name: str):
    """(ModelConfig, B) of a preset: the model with the task's token layout, and the examples per step
    (the minibatch size, or every training example for full batch)."""
    from .config import preset
    from .data import Task

    pre = preset(name)
    task = Task(pre.task.op, pre.task.p, pre.task.frac, 0, pre.task.layout)
    cfg = pre.model.for_task(task)
    B = pre.train.batch_size or len(task.train)
    return cfg, min(B, len(task.train))


def compile_presets(archs=None, presets=PRESETS, model_batch=None) -> dict:
    """grokfast.kernels.aot.compile_all at the presets' shapes (in this process: TRITON_INTERPRET must be off)."""
    from .kernels import aot
    shapes = [(name, *preset_shapes(name)) for name in presets]
    return aot.compile_all(shapes, archs or aot.ARCHS, model_batch or aot.MODEL_BATCH)


def compile_presets_in_subprocess(archs=(80, 90), presets=PRESETS, model_batch=(1, 64), timeout=1200) -> dict:
    """compile_presets in a fresh interpreter without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "grokfast.aot", "--json", "--arch", *map(str, archs),
           "--presets", *presets, "--models", *map(str, model_batch)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode not in (0, 1):
        raise RuntimeError(f"AOT compilation failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m grokfast.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80 90)")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--models", type=int, nargs="+", default=[1, 64], help="model-batch sizes M")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        result = compile_presets_in_subprocess(args.arch, args.presets, args.models)
    else:
        result = compile_presets(args.arch, args.presets, args.models)
    from .kernels import aot
    print(json.dumps(result) if args.json else aot.format_table(result))
    bad = aot.spills(result)
    if bad and not args.json:
        print(f"FAIL: {len(bad)} kernel(s) spill registers to local memory", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
