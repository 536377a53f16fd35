"""`grokfast bench`: every backend side by side on the same work; writes a report (see grokfast.bench)."""
from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

from .config import ConfigError


def add_parser(sub):
    from .bench import BACKENDS

    p = sub.add_parser(
        "bench", help="time the training step on every backend and write a report",
        description="Time one full-batch training step on every backend side by side (reference in eager "
                    "PyTorch, under torch.compile, fused kernels with and without the CUDA graph), against the "
                    "floor computed from the config; time to grok; scaling in p, train fraction, d_model and M; "
                    "GPU telemetry. Writes report.md, report.json (every raw figure) and PNG figures to --out.")
    p.add_argument("--quick", action="store_true",
                   help="a small run that finishes in about a minute (compile backends left out unless named)")
    p.add_argument("--out", help="report folder (default: bench-reports/<time>-<device>)")
    p.add_argument("--preset", help="workload of the step benchmark and the scaling sweeps "
                                    "(default: nanda on a GPU, small on a CPU)")
    p.add_argument("--backends", help=f"comma-separated, from: {','.join(BACKENDS)} (default: all)")
    p.add_argument("--scaling-backends", help="backends timed in the scaling sweeps "
                                              "(default: reference-eager,fused,fused-cudagraph)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--timed-steps", type=int, help="timed steps per backend (after the warm-up)")
    p.add_argument("--warmup-steps", type=int, help="untimed warm-up steps per backend")
    p.add_argument("--grok-max-steps", type=int, help="cap on the steps of each time-to-grok run")
    p.add_argument("--no-grok", action="store_true", help="skip the time-to-grok runs")
    p.add_argument("--no-scaling", action="store_true", help="skip the scaling sweeps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--sweep-throughput", action="store_true",
                   help="only the sweep benchmark: runs per hour of M models per launch (M = 1, 8, 64, 256) "
                        "against M single runs (GPU)")
    p.add_argument("--precision", choices=["ieee", "tf32x3", "tf32"],
                   help="the fused kernels' float32 products (default: GROKFAST_DOT_PRECISION, else ieee)")
    p.add_argument("--loss", choices=["ce", "stablemax"], default=None,
                   help="the loss every timed step and run trains on (default ce; stablemax: Prieto et al.'s StableMax)")
    p.add_argument("--orthograd", action="store_true",
                   help="every timed step and run makes the gradient orthogonal to the weights (Prieto et al.)")
    p.set_defaults(func=cmd_bench)


def command_line(args) -> str:
    """The command that reproduces this run, rebuilt from the parsed flags (the same whether the verb came
    from a shell or from grokfast.cli.main([...]))."""
    parts = ["grokfast", "bench"]
    for flag in ("quick", "no_grok", "no_scaling", "no_progress", "sweep_throughput", "orthograd"):
        if getattr(args, flag):
            parts.append("--" + flag.replace("_", "-"))
    for flag in ("out", "preset", "backends", "scaling_backends", "device", "timed_steps", "warmup_steps",
                 "grok_max_steps", "precision", "loss"):
        v = getattr(args, flag)
        if v is not None:
            parts += ["--" + flag.replace("_", "-"), shlex.quote(str(v))]
    return " ".join(parts)


def cmd_bench(args) -> int:
    precision = getattr(args, "precision", None)
    if not precision:
        return _cmd_bench(args)
    # every TrainConfig built meanwhile takes it as its default precision (the report records it)
    prev = os.environ.get("GROKFAST_DOT_PRECISION")
    os.environ["GROKFAST_DOT_PRECISION"] = precision
    try:
        return _cmd_bench(args)
    finally:
        if prev is None:
            os.environ.pop("GROKFAST_DOT_PRECISION", None)
        else:
            os.environ["GROKFAST_DOT_PRECISION"] = prev


def _cmd_bench(args) -> int:
    from .bench import make_plan, run_report

    if getattr(args, "sweep_throughput", False):
        return cmd_sweep_throughput(args)
    plan = make_plan(quick=args.quick, device=args.device, preset=args.preset, backends=args.backends,
                     scaling_backends=args.scaling_backends, timed=args.timed_steps, warmup=args.warmup_steps,
                     grok=not args.no_grok, scaling=not args.no_scaling, grok_max_steps=args.grok_max_steps,
                     loss=getattr(args, "loss", None) or "ce", orthograd=bool(getattr(args, "orthograd", False)))
    out = Path(args.out) if args.out else Path("bench-reports") / f"{time.strftime('%Y%m%d-%H%M%S')}-{plan.device.type}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: pick a folder")
    command = command_line(args)
    report = run_report(plan, out, command=command, progress=not args.no_progress)
    print(f"report: {out / 'report.md'}")
    for r in report["steps"]:
        if r["status"] == "measured":
            s = r["stats"]
            sp = r.get("speedup_vs_eager")
            print(f"  {r['backend']:<36} median {s['median_s'] * 1e6:12.1f} us  {s['steps_per_s']:10.1f} steps/s"
                  + (f"  {sp:6.2f}x eager" if sp else ""))
        else:
            print(f"  {r['backend']:<36} not available: {r['reason']}")
    return 0


def cmd_sweep_throughput(args) -> int:
    """`grokfast bench --sweep-throughput`: the batched executor's runs per hour (grokfast.bench.sweep_throughput);
    prints the table, and with --out writes sweep_throughput.json and .md there."""
    import json

    import torch

    from .bench import make_workload, render_sweep_throughput, sweep_throughput

    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wl = make_workload(args.preset or "nanda", device)
    kw = {}
    if args.timed_steps is not None:
        kw["timed"] = args.timed_steps
    if args.warmup_steps is not None:
        kw["warmup"] = args.warmup_steps
    res = sweep_throughput(wl, device, **kw)
    text = render_sweep_throughput(res)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        res["command"] = command_line(args)
        (out / "sweep_throughput.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
        (out / "sweep_throughput.md").write_text(f"`{res['command']}`\n\n{text}")
    return 0
