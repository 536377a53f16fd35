"""`grokfast compare`: the ways to grok faster side by side on one task (grokfast.compare).

    grokfast compare --preset small --seeds 0-2 --steps 3000 --out compare/small
    grokfast compare --op x+y --p 113 --frac 0.4 --method adamw --method orthograd:wd=0 --out compare/prieto
    grokfast compare --resume compare/small
"""
from __future__ import annotations

import argparse
import sys

from .cli import FIXED_SETTINGS, PAPER_OPTIMIZER_FIXED, add_fixed_flags, check_resume_or_out

FIXED = tuple(k for k in FIXED_SETTINGS if k not in PAPER_OPTIMIZER_FIXED)


def add_parser(sub):
    from .compare import DEFAULT_METHODS, METHODS

    methods = "\n".join(f"  {k:11s} {v[1]}" for k, v in METHODS.items())
    p = sub.add_parser(
        "compare", help="the ways to grok faster side by side on one task, N seeds each",
        description="Train each method for each seed on one task until it groks (test accuracy >= 99%%) or the "
                    "step cap (--steps); write a table (median and min/max of steps and seconds to memorise and "
                    "to grok, how many grokked) and a figure (test accuracy per method, the seeds' spread). Every "
                    "method starts from the same task settings (the preset and the flags below) and adds only its "
                    "own; METHOD:KEY=VALUE,... changes more (e.g. orthograd:wd=0). Resumable (--resume).",
        epilog=f"methods (default: {' '.join(DEFAULT_METHODS)}):\n{methods}\n\nexamples:\n"
               "  grokfast compare --preset small --seeds 0-2 --out compare/small\n"
               "  grokfast compare --op x+y --p 113 --frac 0.4 --method adamw --method orthograd:wd=0 "
               "--steps 1000 --out compare/prieto\n"
               "  grokfast compare --resume compare/small",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to compare")
    g.add_argument("--method", action="append", metavar="NAME[:KEY=V,...]",
                   help="a method to run (repeat for more; default: all of them)")
    g.add_argument("--seeds", default="0-2", help="seeds for every method: 0,1,2 or 0-7 (default 0-2); each seeds "
                                                  "the model and the train/test split unless --data-seed is given")
    g = p.add_argument_group("the task and the settings shared by every method (override the preset)")
    add_fixed_flags(g, paper_optimizer=False)
    g = p.add_argument_group("run")
    g.add_argument("--executor", choices=["auto", "sequential", "batched"], default="auto",
                   help="sequential: one run after another (reference on a CPU); batched: the methods the fused "
                        "kernels run, M models per launch (GPU)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--out", metavar="COMPARE_DIR", help="directory to write")
    g.add_argument("--resume", metavar="COMPARE_DIR", help="continue a killed comparison: finished runs are kept")
    g.add_argument("--dry-run", action="store_true", help="check the input and list the runs; train nothing")
    g.add_argument("--no-figures", action="store_true")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    import importlib

    from .sweep import parse_seeds
    from .train import Interrupted, default_preset_name, resolve_device

    C = importlib.import_module("grokfast.compare")   # the module (grokfast.compare is the function)
    device = resolve_device(args.device)
    fixed = {k: getattr(args, k) for k in FIXED if getattr(args, k) is not None}
    check_resume_or_out(args, "comparison", FIXED + ("preset", "out"),
                        (["--method"] if args.method else []) + (["--seeds"] if args.seeds != "0-2" else []),
                        "COMPARE_DIR", "the folder for the runs, the table and the figure")
    preset = None if args.resume else (args.preset or default_preset_name(device))
    if args.preset is None and not args.resume:
        print(f"preset: {preset} (default on {device.type}; pass --preset to choose)", file=sys.stderr)
    if args.dry_run:
        spec = (C.open_compare_dir(None, None, args.resume)[0] if args.resume
                else C.CompareSpec(preset, args.method or list(C.DEFAULT_METHODS), parse_seeds(args.seeds), fixed))
        runs, chosen = C.plan(spec, device, args.executor)
        for r in runs:
            print(f"{r.index:4d}  {r.run_id}")
        print(f"{len(runs)} runs; executor: {chosen}")
        for line in C.launch_plan(runs, device, chosen, args.resume or args.out, args.executor)[1]:
            print(line)
        return 0
    try:
        if args.resume:
            res = C.compare(resume=args.resume, device=device, executor=args.executor, figures=not args.no_figures)
        else:
            res = C.compare(args.method, parse_seeds(args.seeds), preset=preset, out=args.out, device=device,
                            executor=args.executor, figures=not args.no_figures, **fixed)
    except Interrupted:
        d = args.resume or args.out
        print(f"grokfast: comparison interrupted; finished runs are kept: continue with grokfast compare --resume {d}",
              file=sys.stderr)
        return 130
    print(res.markdown, end="")
    print(f"table: {res.dir / 'table.md'} (and table.csv, table.json; per run: results.csv)")
    if (res.dir / "curves.png").exists():
        print(f"figure: {res.dir / 'curves.png'}")
    return 0
