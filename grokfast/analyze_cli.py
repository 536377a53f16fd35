"""`grokfast analyze RUN_DIR [--at STEP] [--every K] [--out DIR]`: progress measures, figures and report.md."""
from __future__ import annotations

import sys

from .config import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "analyze", help="progress measures and figures for a run directory",
        description="Compute the progress measures of Nanda et al., Zhong et al. and Furuta et al. over the "
                    "checkpoints of a run (key frequencies, restricted and excluded loss, Gini coefficients, "
                    "clock or pizza, ...), mark the three phases, look inside the analysed checkpoint (sparse "
                    "probes of the embedding, neuron surfaces, units that add, the logits' spectrum: grokked or "
                    "memorising), and write figures/*.png and report.md into the run directory.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `grokfast train --out`")
    p.add_argument("--at", type=int, metavar="STEP",
                   help="analyse this checkpoint only (writes report_step_STEP.md and figures/step_STEP/)")
    p.add_argument("--every", type=int, metavar="K",
                   help="over training, measure only checkpoints whose step is a multiple of K (default: all)")
    p.add_argument("--out", metavar="DIR", help="write the report and figures here (default: RUN_DIR)")
    p.add_argument("--device", default="cpu", help="device for the forward passes (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args) -> int:
    from .analyze import analyze_run, write_analysis, group_skipped, key_freqs_text

    if args.every is not None and args.every < 1:
        raise ConfigError(f"--every must be a positive integer, got {args.every}")
    if args.at is not None and args.at < 0:
        raise ConfigError(f"--at must be a checkpoint step (>= 0), got {args.at}")
    from .train import resolve_device
    device = resolve_device(args.device)
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    a = analyze_run(args.run_dir, at=args.at, every=args.every, device=device, log=log)
    paths = write_analysis(a, args.out)
    print(f"key frequencies: {key_freqs_text(a)}")
    print(f"algorithm (clock or pizza): {a.algorithm}")
    if a.verdict is not None:
        print(f"verdict: {a.verdict.word} ({a.verdict.why})")
    for ph, s in a.phases.items():
        print(f"end of {ph}: {f'step {s}' if s is not None else a.phases_how.get(ph, 'not reached')}")
    for why, whats in group_skipped(a.skipped).items():
        print(f"skipped {whats}: {why}", file=sys.stderr)
    print(f"report: {paths['report']}")
    figs = list(paths["figures"].values())
    print(f"figures: {len(figs)} in {figs[0].parent if figs else '-'}")
    return 0
