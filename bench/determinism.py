"""Two fused training runs from the same seed on the same GPU must end bit-identical (fixed-order
reductions, no float atomics). Exit status 0 when they do. Part of bench/gpu_proof.sh.

    python bench/determinism.py [--steps 300] [--preset nanda] [--grokfast ema]
"""
import argparse
import sys

import torch

import grokfast


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="nanda")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--grokfast", default="ema", choices=["none", "ema", "ma"])
    ap.add_argument("--backend", default="fused", choices=["fused", "reference"])
    args = ap.parse_args()
    pre = grokfast.preset(args.preset)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    task = grokfast.Task.from_spec(pre.task, device=device)
    runs = [grokfast.train(task, pre.model, pre.train, steps=args.steps, backend=args.backend, grokfast=args.grokfast,
                           eval_every=args.steps, progress=False, device=device) for _ in range(2)]
    a, b = (r.model.state_dict() for r in runs)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    what = f"two {args.backend} {args.preset} runs on {device}, {args.steps} steps, Grokfast {args.grokfast}"
    print(f"{what}: {'bit-identical' if not differ else 'DIFFER in ' + ', '.join(differ)}")
    return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main())
