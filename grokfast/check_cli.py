"""`grokfast check`: the fused kernels against the float64 reference on this machine (see grokfast.check)."""
from __future__ import annotations

import os
import sys

from .config import ConfigError


def add_parser(sub):
    p = sub.add_parser(
        "check", help="compare the fused kernels with the float64 reference on this machine",
        description="Compare the fused path with the reference: evaluation, loss, every gradient, and the "
                    "parameters after 1 and 100 optimizer steps with each Grokfast filter. On a GPU at the "
                    "presets' shapes; on a CPU under the Triton interpreter at small shapes (slow: use --quick). "
                    "Prints a table; exits 1 if any quantity is outside its bound.")
    p.add_argument("--preset", default="all", help="nanda | power | pizza | all (default: all)")
    p.add_argument("--quick", action="store_true", help="smaller shapes on a CPU and 4 optimizer steps instead of 100")
    p.add_argument("--grokfast", nargs="+", choices=["none", "ema", "ma"], default=["none", "ema", "ma"],
                   help="the Grokfast filters whose optimizer steps are checked (default: all three)")
    p.add_argument("--seed", type=int, default=0, help="model init seed (default 0)")
    p.add_argument("--orthograd", action="store_true",
                   help="the optimizer steps with the orthogonal gradient (Prieto et al.) before AdamW, on both sides")
    p.add_argument("--precision", choices=["ieee", "tf32x3", "tf32"], default="ieee",
                   help="the kernels' float32 products (default ieee); the bounds stay float32's")
    p.add_argument("--loss", choices=["ce", "stablemax"], default="ce",
                   help="the loss every row computes: ce (default) or stablemax (StableMax cross-entropy, its own bounds)")
    p.set_defaults(func=cmd_check)


def cmd_check(args) -> int:
    import torch
    from .check import PRESETS

    names = list(PRESETS) if args.preset == "all" else [args.preset]
    for n in names:
        if n not in PRESETS:
            raise ConfigError(f"--preset must be one of {', '.join(PRESETS)} or all, got {n!r}")
    if not torch.cuda.is_available():
        # The interpreter must be chosen before triton decorates any kernel.
        if "grokfast.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise ConfigError("no CUDA GPU and the kernels were already loaded without the interpreter: "
                              "run with TRITON_INTERPRET=1")
        os.environ["TRITON_INTERPRET"] = "1"
        where = "CPU, Triton interpreter, small shapes"
    else:
        where = f"{torch.cuda.get_device_name()}, presets' shapes"
    from .check import run_check, format_rows

    print(f"grokfast check: {', '.join(names)} ({where}){' --quick' if args.quick else ''}"
          f"{'' if args.precision == 'ieee' else ' --precision ' + args.precision}"
          f"{'' if args.loss == 'ce' else ' --loss ' + args.loss}{' --orthograd' if args.orthograd else ''}",
          file=sys.stderr)
    rows = run_check(names, quick=args.quick, seed=args.seed, filters=args.grokfast,
                     log=lambda s: print(s, file=sys.stderr), precision=args.precision, loss=args.loss,
                     orthograd=args.orthograd)
    print(format_rows(rows))
    return 1 if any(r.status == "FAIL" for r in rows) else 0
