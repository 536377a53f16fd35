"""GPU proof, stage 4b: where the fused step's time goes, kernel by kernel (torch.profiler, CUPTI).

Runs a preset's fused step (full batch) as a CUDA graph after its warm-up, profiles --steps replays and
prints one row per kernel: launches per step, GPU microseconds per step, share of the step; then the sum
of kernel times against the measured time per step (the gap is launch latency and idle time).

    python bench/profile_step.py [--preset nanda] [--steps 50] [--grokfast ema] [--precision ieee]
"""
import argparse
import sys
from collections import defaultdict

import torch

import grokfast
from graph_proof import full_batch   # bench/ is this script's folder, first on sys.path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="nanda")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--grokfast", default="ema", choices=["none", "ema", "ma"])
    ap.add_argument("--precision", default="ieee", choices=["ieee", "tf32x3", "tf32"])
    ap.add_argument("--eager", action="store_true", help="profile eager launches instead of graph replays")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_step: needs a CUDA GPU", file=sys.stderr)
        return 2
    from grokfast.kernels.stepper import FusedStepper
    from torch.profiler import ProfilerActivity, profile

    cfg, tcfg, tok, lab = full_batch(args.preset, args.grokfast, args.precision)
    st = FusedStepper(grokfast.Transformer(cfg, seed=0, device="cuda"), tcfg, cuda_graph=not args.eager)
    for _ in range(5):
        st.step(tok, lab)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        a.record()
        for _ in range(args.steps):
            st.step(tok, lab)
        b.record()
        torch.cuda.synchronize()
    step_us = 1e3 * a.elapsed_time(b) / args.steps
    per = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name][0] += 1
            per[e.name][1] += e.device_time if hasattr(e, "device_time") else e.cuda_time
    total = sum(t for _, t in per.values()) / args.steps
    print(f"{args.preset} B={tok.shape[0]} fused step ({st.mode}, precision {args.precision}): "
          f"{step_us:.1f} us per step measured, {total:.1f} us of kernel time per step")
    print(f"{'kernel':<48} {'launches/step':>13} {'us/step':>9} {'share':>6}")
    for name, (n, t) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        print(f"{name[:48]:<48} {n / args.steps:>13.2f} {t / args.steps:>9.2f} {t / args.steps / step_us:>6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
