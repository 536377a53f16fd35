"""`grokfast sweep`: many runs over seeds and hyperparameters (grokfast.sweep), one results table.

    grokfast sweep --preset small --grid lr=1e-3,3e-3 --grid wd=0.5,1 --seeds 0-2 --steps 2000 --out sweeps/a
    grokfast sweep --resume sweeps/a
    torchrun --nproc_per_node 2 -m grokfast sweep ... --out sweeps/a     # runs spread over 2 ranks
"""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError
from .cli import FIXED_SETTINGS, add_fixed_flags, check_resume_or_out

FIXED = FIXED_SETTINGS


def add_parser(sub):
    p = sub.add_parser(
        "sweep", help="many runs (seeds x hyperparameters) and one results table",
        description="Train every point of a grid (or --random N samples of it) for every seed; write one run "
                    "directory per run and a results table (CSV and JSON) with steps and seconds to memorise and "
                    "to grok. Runs stop at grokking. Resumable (--resume); under torchrun the runs are spread "
                    "over the ranks and rank 0 writes the table.",
        epilog="examples:\n"
               "  grokfast sweep --preset small --grid lr=1e-3,3e-3 --grid wd=0.5,1 --seeds 0-2 --out sweeps/a\n"
               "  grokfast sweep --grid 'op=x+y;x-y;x*y' --grid frac=0.3,0.5 --seeds 0,1 --out sweeps/ops\n"
               "  grokfast sweep --random 20 --grid lr=1e-4..1e-2:log --grid wd=0..2 --out sweeps/rnd\n"
               "  grokfast sweep --resume sweeps/a\n"
               "  torchrun --nproc_per_node 4 -m grokfast sweep --grid lr=1e-3,3e-3 --seeds 0-7 --out sweeps/b",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to sweep")
    g.add_argument("--grid", action="append", default=[], metavar="AXIS=V1,V2",
                   help="an axis and its values (repeat for more axes): lr, wd, frac, op (values separated by ';'), "
                        "grokfast, alpha, lamb, window, p, d_model, ... ; LO..HI or LO..HI:log is a range for --random")
    g.add_argument("--seeds", default="0", help="model seeds, crossed with every point: 0,1,2 or 0-7 (default 0); "
                                                "each also seeds the train/test split unless --data-seed is given")
    g.add_argument("--random", type=int, metavar="N", help="N random points of the grid instead of all of it")
    g.add_argument("--sample-seed", type=int, default=0, help="seed of the --random draw (default 0)")
    g = p.add_argument_group("fixed settings (as in `grokfast train`; override the preset)")
    add_fixed_flags(g)
    g = p.add_argument_group("sweep")
    g.add_argument("--after-grok", type=int, default=0, metavar="N",
                   help="keep training N steps after a run groks (default 0: stop at grokking)")
    g.add_argument("--no-stop-at-grok", action="store_true", help="train every run to --steps")
    g.add_argument("--executor", choices=["auto", "sequential", "batched"], default="auto",
                   help="sequential: one run after another (reference on a CPU); batched: M models per launch "
                        "on the fused kernels (GPU)")
    g.add_argument("--models-per-launch", type=int, metavar="M", help="models trained together (batched executor)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available; rank r uses cuda:r)")
    g.add_argument("--memory", type=float, metavar="GIB", help="memory to plan for (default: what the device "
                                                                  "reports free)")
    g.add_argument("--out", metavar="SWEEP_DIR", help="sweep directory to write")
    g.add_argument("--resume", metavar="SWEEP_DIR", help="continue a killed sweep: finished runs are kept, "
                                                         "unfinished ones continue from their checkpoints")
    g.add_argument("--dry-run", action="store_true", help="check the input and list the runs; train nothing")
    g.add_argument("--phase-axes", metavar="X,Y", help="the two axes of the phase diagram (default: the first two "
                                                      "swept)")
    g.add_argument("--no-figures", action="store_true")
    g.add_argument("--quiet", action="store_true", help="no line per finished run")
    p.set_defaults(func=cmd_sweep)


def _spec_from_args(args, device):
    from . import sweep as S
    from .train import default_preset_name

    name = args.preset or default_preset_name(device)
    if args.preset is None:
        print(f"preset: {name} (default on {device.type}; pass --preset to choose)", file=sys.stderr)
    grid = {}
    for text in args.grid:
        axis, vals = S.parse_grid_arg(text)
        if axis in grid:
            raise ConfigError(f"--grid {axis}= is given twice: list all its values in one --grid")
        grid[axis] = vals
    fixed = {k: getattr(args, k) for k in FIXED if getattr(args, k) is not None}
    return S.SweepSpec(preset=name, grid=grid, seeds=S.parse_seeds(args.seeds), fixed=fixed, random=args.random,
                       sample_seed=args.sample_seed, stop_at_grok=not args.no_stop_at_grok,
                       after_grok=args.after_grok)


def cmd_sweep(args) -> int:
    from . import sweep as S
    from .sweep.run import open_sweep_dir
    from .train import Interrupted, resolve_device

    device = None if args.device is None else resolve_device(args.device)
    memory = None
    if args.memory is not None:
        if args.memory <= 0:
            raise ConfigError(f"--memory must be positive (GiB), got {args.memory}")
        memory = int(args.memory * 2 ** 30)
    phase = None
    if args.phase_axes:
        phase = tuple(a.strip().replace("-", "_") for a in args.phase_axes.split(","))
        if len(phase) != 2 or not all(a in S.AXES for a in phase):
            raise ConfigError(f"--phase-axes {args.phase_axes!r}: name two axes, e.g. --phase-axes lr,wd "
                              f"(axes: {', '.join(S.AXES)})")

    check_resume_or_out(args, "sweep", FIXED + ("preset", "random", "out"),
                        (["--grid"] if args.grid else []) + (["--seeds"] if args.seeds != "0" else []),
                        "SWEEP_DIR", "the folder for the runs and the results table")
    if args.resume:
        spec = None
    else:
        dev = resolve_device(device)
        spec = _spec_from_args(args, dev)

    if args.dry_run:
        if spec is None:
            spec = open_sweep_dir(None, None, args.resume)[0]
        runs, chosen, need = S.plan(spec, device, args.executor, args.models_per_launch, memory)
        for r in runs:
            print(f"{r.index:4d}  {r.run_id}")
        print(f"{len(runs)} runs; executor: {chosen}; about {S._human(need)} per model")
        return 0

    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    dist = S.dist_from_env()
    try:
        res = S.run_sweep(spec, args.out if spec is not None else None, resume=args.resume, device=device,
                          executor=args.executor, models_per_launch=args.models_per_launch, memory_bytes=memory,
                          figures=not args.no_figures, phase_axes=phase, log=log, dist=dist)
    except Interrupted:
        d = args.resume or args.out
        print(f"grokfast: sweep interrupted; finished runs are kept: continue with grokfast sweep --resume {d}",
              file=sys.stderr)
        return 130
    finally:
        dist.close()
    if dist.rank == 0:
        rows = res.rows
        g = sum(r["outcome"] == "grokked" for r in rows)
        print(f"sweep: {res.dir}: {len(rows)} runs, {g} grokked, {len(rows) - g} did not")
        print(f"table: {res.dir / 'results.csv'} (and results.json)")
        if not args.no_figures:
            for name in ("phase.png", "curves.png"):
                if (res.dir / name).exists():
                    print(f"figure: {res.dir / name}")
    return 0

