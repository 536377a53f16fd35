"""What a step must cost, counted on any machine: the FLOPs and fewest bytes of one training step
(``step_cost``), the peak rates they are set against (datasheet and measured ceilings), the floor times
they give (``floors``), and the fused step's kernel launches (``fused_launches``)."""
from __future__ import annotations

import statistics
from typing import Optional

import torch

from ..config import ModelConfig, TrainConfig
from .timing import time_steps
from .workload import Workload


# Datasheet peaks (dense, no sparsity) of the GPUs this project is measured on; leads, not readings
# (see /work/.library/device/H200.md and HOPPER.md). fp32: the CUDA cores' IEEE float32 rate; tf32: the
# tensor cores' TF32 rate (3xTF32 costs three TF32 products); bandwidth: HBM bytes/s.
DATASHEET = {
    "H100 SXM": {"fp32": 67e12, "tf32": 494.7e12, "bandwidth": 3.35e12},
    "H100 PCIe": {"fp32": 51.2e12, "tf32": 378e12, "bandwidth": 2.0e12},
    "H200": {"fp32": 67e12, "tf32": 494.7e12, "bandwidth": 4.8e12},
}


def datasheet_for(name: str) -> tuple[Optional[str], Optional[dict]]:
    """(part, peaks) for a CUDA device name as torch reports it, or (None, None) when unknown."""
    n = name.upper()
    if "H200" in n:
        return "H200", DATASHEET["H200"]
    if "H100" in n and "PCIE" in n:
        return "H100 PCIe", DATASHEET["H100 PCIe"]
    if "H100" in n and ("SXM" in n or "HBM3" in n):
        return "H100 SXM", DATASHEET["H100 SXM"]
    return None, None


def step_cost(mcfg: ModelConfig, tcfg: TrainConfig, tokens: torch.Tensor, labels: torch.Tensor,
              M: int = 1) -> dict:
    """FLOPs and minimum bytes of one training step over the batch ``tokens`` [B, T], for M models.

    FLOPs count the least work the step must do when it exploits the structure (DESIGN.md, "The fused
    training step"); a multiply-add is 2 FLOPs, other operations 1 (exp, erf, sqrt too). With B examples,
    T positions, H heads of d_head Dh, d_model D, d_mlp F, V output classes, and R the distinct
    (position, token) pairs in the batch (R_q those at the last position):
      - layer 0 tables, once per step: Q rows (R_q when there is one layer, else R), K rows (R), and the
        value-output table VO = x0 W_V W_O (R rows, through d_head): 2 R D Dh H (K) + 2 R_q D Dh H (Q) +
        4 R D Dh H (VO);
      - per example, layer 0: scores over the causal (query, key) pairs P (T at the last position
        only, T(T+1)/2 at every position) and the VO-weighted sum: P H (2 Dh + 2 D); later layers
        compute Q, K, V, O from the residual stream (K, V at every position, Q, O at the query positions);
      - MLP 4 D F per query position (the last layer's at the last position only), unembedding 2 D V;
      - backward: twice every product above (one product for the input's gradient, one for the weight's);
      - elementwise, forward + backward: softmax 6 per score, activation 2 (ReLU) or 20 (GELU) per unit,
        biases 2, LayerNorm 16 per element, residual adds 1, loss 6 per logit; optimizer per parameter:
        AdamW 12, Grokfast-EMA 4, Grokfast-MA 4 (a running window sum).
    Bytes are the fewest a step must move through memory (float32 state): parameters read and written,
    gradients written and read, AdamW m and v read and written, Grokfast state (EMA read and written;
    MA a running float64 window sum read and written plus the oldest ring slot read and the newest
    written), and the
    batch's tokens and labels read once (shared by the M models). Activations are not counted: the
    per-example work fits on chip.
    """
    B, T = tokens.shape
    D, H, Dh, F, V, L = (mcfg.d_model, mcfg.n_heads, mcfg.d_head, mcfg.d_mlp, mcfg.d_vocab_out,
                         mcfg.n_layers)
    R = sum(int(torch.unique(tokens[:, t]).numel()) for t in range(T))
    R_q = int(torch.unique(tokens[:, -1]).numel())
    pairs_all, pairs_last = T * (T + 1) // 2, T
    act = 2 if mcfg.act == "relu" else 20

    mm = {"layer-0 tables": 0, "attention": 0, "mlp": 0, "unembed": 0}
    ew = {"softmax": 0, "activation": 0, "biases": 0, "layernorm": 0, "residual": 0, "loss": 0}
    q_rows = R_q if L == 1 else R
    mm["layer-0 tables"] = 2 * R * D * Dh * H + 2 * q_rows * D * Dh * H + 4 * R * D * Dh * H
    if mcfg.layernorm:
        ew["layernorm"] += 16 * R * D
    for l in range(L):
        last = l == L - 1
        nq = 1 if last else T
        P = pairs_last if last else pairs_all
        if l == 0:
            mm["attention"] += B * P * H * (2 * Dh + 2 * D)
        else:
            mm["attention"] += B * (2 * T * 2 * D * H * Dh + nq * 2 * D * H * Dh + P * H * 4 * Dh + nq * 2 * H * Dh * D)
            if mcfg.layernorm:
                ew["layernorm"] += 16 * B * T * D
        ew["softmax"] += 6 * B * P * H
        mm["mlp"] += B * nq * 4 * D * F
        ew["activation"] += act * B * nq * F
        ew["biases"] += 2 * B * nq * (F + D)
        ew["residual"] += 2 * B * nq * D
        if mcfg.layernorm:
            ew["layernorm"] += 16 * B * nq * D
        if mcfg.attn_bias:
            ew["biases"] += 2 * B * (3 * T * H * Dh + nq * D)
    if mcfg.layernorm:
        ew["layernorm"] += 16 * B * D
    mm["unembed"] = B * 2 * D * V
    ew["loss"] = 6 * B * V
    if mcfg.unembed_bias:
        ew["biases"] += 2 * B * V
    N = mcfg.n_params()
    opt = {"none": 12, "ema": 16, "ma": 16}[tcfg.grokfast] * N

    flops = {f"{k} (fwd+bwd)": 3 * v for k, v in mm.items()}
    flops.update({f"{k} (elementwise)": v for k, v in ew.items() if v})
    flops["optimizer"] = opt
    flops = {k: v * M for k, v in flops.items()}
    matmul_flops = 3 * sum(mm.values()) * M

    f4 = 4 * N * M
    nbytes = {"parameters (read + write)": 2 * f4, "gradients (write + read)": 2 * f4,
              "AdamW m, v (read + write)": 4 * f4}
    if tcfg.grokfast == "ema":
        nbytes["Grokfast EMA (read + write)"] = 2 * f4
    elif tcfg.grokfast == "ma":
        nbytes["Grokfast MA (float64 window sum read + write, ring slot read + write)"] = 6 * f4
    nbytes["tokens and labels (read once)"] = tokens.numel() * tokens.element_size() + labels.numel() * labels.element_size()
    return {"flops": sum(flops.values()), "matmul_flops": matmul_flops, "flops_by_part": flops,
            "bytes": sum(nbytes.values()), "bytes_by_part": nbytes,
            "counts": {"B": B, "T": T, "R": R, "R_q": R_q, "n_params": N, "M": M}}


def floors(cost: dict, ceilings: dict) -> dict:
    """Floor times for each set of peak rates: {name: {compute_s, memory_s, floor_s, bound}}.

    ``ceilings`` maps a name (e.g. "datasheet H100 SXM, fp32") to {"flops_per_s", "bytes_per_s",
    and optionally "matmul_flops_per_s" for the share of FLOPs in products}."""
    out = {}
    for name, c in ceilings.items():
        if not c.get("flops_per_s") or not c.get("bytes_per_s"):
            continue
        mm_rate = c.get("matmul_flops_per_s") or c["flops_per_s"]
        compute = cost["matmul_flops"] / mm_rate + (cost["flops"] - cost["matmul_flops"]) / c["flops_per_s"]
        memory = cost["bytes"] / c["bytes_per_s"]
        out[name] = {"compute_s": compute, "memory_s": memory, "floor_s": max(compute, memory),
                     "bound": "compute" if compute >= memory else "memory"}
    return out


def datasheet_ceilings(part: str | None, peaks: dict | None) -> dict:
    if not peaks:
        return {}
    return {f"datasheet {part}, IEEE fp32": {"flops_per_s": peaks["fp32"], "bytes_per_s": peaks["bandwidth"]},
            f"datasheet {part}, 3xTF32 products": {"flops_per_s": peaks["fp32"], "bytes_per_s": peaks["bandwidth"],
                                                   "matmul_flops_per_s": peaks["tf32"] / 3}}


def measure_ceilings(device, quick: bool) -> dict:
    """Measured ceilings on this device, on random data: a device-to-device copy (bytes read + written
    over the median time) and a float32 matrix product with TF32 off (2 n^3 over the median time)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n_copy = (1 << 28 if not quick else 1 << 26) if cuda else (1 << 24 if not quick else 1 << 22)  # float32 elements
    n_mm = (8192 if not quick else 4096) if cuda else (1024 if not quick else 512)
    g = torch.Generator(device=device).manual_seed(0)
    src = torch.rand(n_copy, device=device, generator=g)
    dst = torch.empty_like(src)
    a = torch.rand(n_mm, n_mm, device=device, generator=g)
    b = torch.rand(n_mm, n_mm, device=device, generator=g)
    old_tf32 = torch.backends.cuda.matmul.allow_tf32 if cuda else None
    try:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = False
        copy = time_steps(lambda: dst.copy_(src), device, warmup=3, timed=10 if quick else 30)
        mm = time_steps(lambda: torch.mm(a, b), device, warmup=2, timed=5 if quick else 10)
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = old_tf32
    bw = 2 * src.numel() * 4 / statistics.median(copy["times_s"])
    fl = 2 * n_mm ** 3 / statistics.median(mm["times_s"])
    del src, dst, a, b
    return {"measured": {"flops_per_s": fl, "bytes_per_s": bw,
                         "how": f"copy of {n_copy * 4 / 2**20:.0f} MiB (read + write) and a {n_mm}^3 float32 "
                                f"product with TF32 off, medians of {len(copy['times_s'])} and {len(mm['times_s'])}"}}


def fused_launches(wl: Workload, cost: dict | None = None) -> dict:
    """The fused step's kernel launches for the workload, counted on meta tensors (no GPU needed):
    {"forward_backward": {kernel: n}, "optimizer": n, "total": n, "per_launch": [{"kernel", "problems",
    "dot_flops", "useful", "core_flops"}] (forward_backward.executed_flops: the tl.dot FLOPs each launch
    executes, padding to its tiles included, the products' own, and products done as elementwise
    multiply-adds), "dot_flops", "useful_dot_flops", "core_product_flops" (their sums)}
    and, given the step's ``cost`` (step_cost), "dot_flops_over_floor" = dot_flops / cost["matmul_flops"];
    or {"unavailable": reason}."""
    try:
        from grokfast.kernels import forward_backward as fb
        why = fb.supported(wl.model)
        if why:
            return {"unavailable": why}
        B = wl.batch_size()
        counts = fb.launches_per_step(wl.model, wl.M, B)
        per_launch = fb.executed_flops(wl.model, wl.M, B)
    except Exception as e:  # no triton here: say so
        return {"unavailable": f"{type(e).__name__}: {e}"}
    from grokfast.kernels import optimizer
    n_opt = optimizer.step_launches(getattr(wl.train, "orthograd", False))   # 2 with orthograd (its sums pass)
    out = {"forward_backward": counts, "optimizer": n_opt,
           "total": sum(counts.values()) + n_opt, "per_launch": per_launch,
           "dot_flops": sum(r["dot_flops"] for r in per_launch),
           "useful_dot_flops": sum(r["useful"] for r in per_launch),
           "core_product_flops": sum(r["core_flops"] for r in per_launch)}
    if cost is not None and cost.get("matmul_flops"):
        out["dot_flops_over_floor"] = out["dot_flops"] / cost["matmul_flops"]
    return out
