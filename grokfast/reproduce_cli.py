"""`grokfast reproduce NAME [--quick] [--seeds 0,1,2] [--out DIR] [--paper-code DIR]` and `grokfast reproduce --list`."""
from __future__ import annotations

import sys

from .config import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "reproduce", help="a paper's headline experiment: the published figure beside ours, with a verdict",
        description="Run a paper's headline experiment with its settings (faithful presets), print the published "
                    "figure beside ours with a verdict, and write a directory with every run, curves.png, "
                    "result.json and report.txt. `grokfast reproduce --list` shows each with its expected time.")
    p.add_argument("name", nargs="?", metavar="NAME", help="which reproduction (see --list)")
    p.add_argument("--list", action="store_true", help="list the reproductions with their expected time on CPU and GPU")
    p.add_argument("--quick", action="store_true", help="the CPU-sized version (fewer seeds, smaller runs)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the reproduction's)")
    p.add_argument("--out", help="directory to write (default: runs/reproduce-NAME-<time>)")
    p.add_argument("--device", help="cpu or cuda (default cpu: the faithful presets run on the reference backend)")
    p.add_argument("--threads", type=int, help="torch threads for our runs and the paper's code (default: torch's)")
    p.add_argument("--paper-code", metavar="DIR",
                   help="a checkout of ironjr/grokfast: run its main.py seed by seed, interleaved with ours, and "
                        "compare on this machine (grokfast only)")
    p.add_argument("--filters", help="grokfast only: which of ema,ma,none (the baseline) to run (default all three)")
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args) -> int:
    from .reproduce import list_text, reproduce

    if args.list:
        print(list_text())
        return 0
    if args.name is None:
        raise ConfigError("name a reproduction (grokfast reproduce NAME), or list them with --list")
    seeds = None
    if args.seeds is not None:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--seeds must be comma-separated integers such as 0,1,2, got {args.seeds!r}") from None
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    result = reproduce(args.name, quick=args.quick, seeds=seeds, out=args.out, device=args.device,
                       paper_code=args.paper_code, threads=args.threads,
                       filters=None if args.filters is None else [f.strip() for f in args.filters.split(",") if f.strip()])
    print(result["report"])
    print(f"written: {result['dir']} (report.txt, result.json, curves.png, one run directory per run)")
    return 0
