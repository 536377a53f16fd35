"""GPU proof, stage 1: the fused step is captured as a CUDA graph at a preset's real shapes, and replaying
it gives the eager step's bits. Exit status 0 when both hold.

Two FusedSteppers from the same initial weights train the full batch for --steps steps, one captured after
its warm-up (cuda_graph=True), one launch by launch (cuda_graph=False). Checked: the first reports
mode "cuda-graph" (a failed capture raises GraphCaptureError, it does not fall back), the descriptor
tables of the deferred split-K sums were built during the warm-up only, and every parameter and optimizer
state tensor is bit-identical after the last step. Prints the time per step of each (CUDA events).

    python bench/graph_proof.py [--preset nanda] [--steps 200] [--grokfast ema]
"""
import argparse
import sys

import torch

import grokfast


def full_batch(preset: str, filt: str, precision: str):
    """(ModelConfig, TrainConfig, tokens, labels) of a preset's full-batch step on the GPU, with this Grokfast
    filter and dot precision (bench/profile_step.py uses it too)."""
    pre = grokfast.preset(preset)
    task = grokfast.Task.from_spec(pre.task, device="cuda")
    cfg = pre.model.for_task(task)
    tcfg = grokfast.TrainConfig(**{**pre.train.to_dict(), "grokfast": filt, "precision": precision, "batch_size": None})
    return cfg, tcfg, task.train.tokens.contiguous(), task.train.labels.contiguous()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="nanda")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--grokfast", default="ema", choices=["none", "ema", "ma"])
    ap.add_argument("--precision", default="ieee", choices=["ieee", "tf32x3", "tf32"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("graph_proof: needs a CUDA GPU", file=sys.stderr)
        return 2
    from grokfast.kernels import forward_backward as fb
    from grokfast.kernels.stepper import FusedStepper

    cfg, tcfg, tok, lab = full_batch(args.preset, args.grokfast, args.precision)
    out, ok = {}, True
    for graph in (True, False):
        model = grokfast.Transformer(cfg, seed=0, device="cuda")
        st = FusedStepper(model, tcfg, cuda_graph=graph)
        times = []
        for i in range(args.steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            st.step(tok, lab)
            b.record()
            times.append((a, b))
            if i == 2:   # the warm-up steps are done (and the capture, for the graph stepper)
                ws = fb._workspace(cfg, 1, tok.shape[0], torch.device("cuda"), True)
                tables = ws.deferred.tables_built
        torch.cuda.synchronize()
        ms = sorted(x.elapsed_time(y) for x, y in times[5:])
        name = "graph" if graph else "eager"
        print(f"{args.preset} B={tok.shape[0]} {name}: mode {st.mode}, median step {1e3 * ms[len(ms) // 2]:.1f} us, "
              f"min {1e3 * ms[0]:.1f} us; descriptor tables built {ws.deferred.tables_built} "
              f"(after warm-up: {tables})")
        if graph and st.mode != "cuda-graph":
            ok = False
        if ws.deferred.tables_built != tables:
            print(f"FAIL: {name} built descriptor tables after the warm-up")
            ok = False
        out[name] = {k: v.clone() for k, v in st.state_dict().items()}
    differ = [k for k in out["graph"] if not torch.equal(out["graph"][k], out["eager"][k])]
    print(f"after {args.steps} steps: {'bit-identical' if not differ else 'DIFFER in ' + ', '.join(differ[:5])}")
    return 0 if ok and not differ else 1


if __name__ == "__main__":
    sys.exit(main())
