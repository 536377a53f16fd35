"""grokfast bench: the quick report runs on a CPU and every backend appears, measured or 'not available'
with a reason; the floor's counting, the statistics and the compiled step's optimizer are checked against
independent computations. No time thresholds: benchmarks are never timed tests."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import grokfast
from grokfast import bench
from grokfast.backends import ReferenceStepper
from grokfast.cli import main
from grokfast.model import cross_entropy64


def _rand_config(rng, n_layers=1, layernorm=False, n_ctx=3, act="relu"):
    H = rng.choice([1, 2, 4])
    Dh = rng.choice([4, 8])
    V = rng.choice([5, 7, 11])
    return grokfast.ModelConfig(n_layers=n_layers, d_model=H * Dh * rng.choice([1, 2]), n_heads=H, d_head=Dh,
                                d_mlp=rng.choice([16, 24, 40]), act=act, layernorm=layernorm, n_ctx=n_ctx,
                                d_vocab=V + 1, d_vocab_out=V)


def _tokens(rng, cfg, B):
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    tok = torch.randint(0, cfg.d_vocab_out, (B, cfg.n_ctx), generator=g)
    tok[:, -1] = cfg.d_vocab - 1  # '=' at the last position, as in the tasks
    return tok, torch.randint(0, cfg.d_vocab_out, (B,), generator=g)


@pytest.mark.parametrize("n_layers,layernorm,n_ctx,act", [(1, False, 3, "relu"), (2, True, 4, "gelu"),
                                                          (2, False, 3, "relu")])
def test_floor_counts_match_flop_counter_on_the_shared_parts(n_layers, layernorm, n_ctx, act):
    """The parts of the floor that the reference computes the same way (MLPs, unembedding, and the
    attention of a layer after the first, which has no tables) must equal what torch's FlopCounterMode
    counts for the reference's forward + backward, exactly (integer counts)."""
    rng = random.Random()
    cfg = _rand_config(rng, n_layers, layernorm, n_ctx, act)
    B = rng.randrange(20, 90)
    tok, lab = _tokens(rng, cfg, B)
    model = grokfast.Transformer(cfg, seed=rng.randrange(1000))
    fc = FlopCounterMode(display=False)
    with fc:
        loss = cross_entropy64(model(tok), lab)
        torch.autograd.grad(loss, list(model.parameters()))
    counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    cost = bench.step_cost(cfg, grokfast.TrainConfig(), tok, lab)
    parts = cost["flops_by_part"]
    mlp = sum(counts[f"Transformer.blocks.{l}.mlp"] for l in range(n_layers))
    assert parts["mlp (fwd+bwd)"] == mlp
    blocks = sum(counts[f"Transformer.blocks.{l}"] for l in range(n_layers))
    assert parts["unembed (fwd+bwd)"] == counts["Transformer"] - blocks
    if n_layers == 2:
        # attention of layer 1 (no tables) = total attention minus layer 0's table-based share
        T, H, Dh, D = cfg.n_ctx, cfg.n_heads, cfg.d_head, cfg.d_model
        layer0 = 3 * B * (T * (T + 1) // 2) * H * (2 * Dh + 2 * D)
        assert parts["attention (fwd+bwd)"] - layer0 == counts["Transformer.blocks.1.attn"]
    # the floor exploits the structure: never more product FLOPs than the reference does
    assert cost["matmul_flops"] <= counts["Global"]


def test_floor_tables_and_bytes_by_hand():
    """Layer-0 tables and the byte count of a 1-layer model, written out independently."""
    cfg = grokfast.ModelConfig(d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=3, d_vocab=8, d_vocab_out=7)
    tok = torch.tensor([[0, 1, 7], [0, 2, 7], [3, 1, 7], [3, 1, 7]])
    lab = torch.tensor([1, 2, 4, 4])
    cost = bench.step_cost(cfg, grokfast.TrainConfig(grokfast="ema"), tok, lab, M=3)
    R, Rq = 2 + 2 + 1, 1                       # distinct tokens at positions 0, 1, 2; '=' only at the last
    per = 2 * R * 16 * 8 * 2 + 2 * Rq * 16 * 8 * 2 + 4 * R * 16 * 8 * 2
    assert cost["counts"]["R"] == R and cost["counts"]["R_q"] == Rq
    assert cost["flops_by_part"]["layer-0 tables (fwd+bwd)"] == 3 * 3 * per
    N = cfg.n_params()
    # params r+w, grads w+r, m and v r+w, EMA r+w: 2 + 2 + 4 + 2 float32 passes over N, for 3 models
    assert cost["bytes"] == 10 * 4 * N * 3 + tok.numel() * 8 + lab.numel() * 8


def test_floors_pick_the_larger_time():
    cost = {"flops": 3e9, "matmul_flops": 2e9, "bytes": 1e6}
    fl = bench.floors(cost, {"a": {"flops_per_s": 1e12, "bytes_per_s": 1e12},
                             "b": {"flops_per_s": 1e12, "bytes_per_s": 1e6, "matmul_flops_per_s": 2e12}})
    assert fl["a"]["compute_s"] == pytest.approx(3e-3) and fl["a"]["bound"] == "compute"
    assert fl["b"]["compute_s"] == pytest.approx(1e-3 + 1e-3) and fl["b"]["memory_s"] == pytest.approx(1.0)
    assert fl["b"]["floor_s"] == pytest.approx(1.0) and fl["b"]["bound"] == "memory"


def test_time_stats_against_numpy():
    xs = [random.lognormvariate(-7, 0.5) for _ in range(37)]
    s = bench.time_stats(xs, wall_s=sum(xs))
    assert s["median_s"] == pytest.approx(float(np.median(xs)), rel=1e-12)
    assert s["p10_s"] == pytest.approx(float(np.percentile(xs, 10)), rel=1e-12)
    assert s["p90_s"] == pytest.approx(float(np.percentile(xs, 90)), rel=1e-12)
    assert s["min_s"] == min(xs) and s["steps_per_s"] == pytest.approx(1 / np.median(xs))
    assert s["wall_steps_per_s"] == pytest.approx(37 / sum(xs))


@pytest.mark.parametrize("grokfast_kind,warmup", [("none", 3), ("ema", 0), ("ema", 4)])
def test_compiled_steppers_optimizer_matches_the_reference(grokfast_kind, warmup):
    """The functional Grokfast + AdamW that torch.compile takes (run eagerly here) against the reference
    optimizer, 6 steps from the same weights on random data. Bound: relative error 1e-5 per parameter --
    float32 rounding of a differently ordered formula, amplified a little by Adam's division."""
    rng = random.Random()
    cfg = _rand_config(rng)
    tok, lab = _tokens(rng, cfg, 40)
    tcfg = grokfast.TrainConfig(grokfast=grokfast_kind, warmup=warmup, lr=1e-2, wd=0.5, alpha=0.9, lamb=2.0)
    seed = rng.randrange(1000)
    ref_model, fun_model = grokfast.Transformer(cfg, seed=seed), grokfast.Transformer(cfg, seed=seed)
    ref, fun = ReferenceStepper(ref_model, tcfg), bench.CompiledReferenceStepper(fun_model, tcfg, None, compile=False)
    init = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    for _ in range(6):
        l_ref, l_fun = ref.step(tok, lab), fun.step(tok, lab)
        assert float(l_ref) == pytest.approx(float(l_fun), rel=1e-5)
    for (n, a), (_, b) in zip(ref_model.named_parameters(), fun_model.named_parameters()):
        moved = (a - init[n]).norm()
        assert moved > 0, n
        err = ((a - b).norm() / a.norm().clamp_min(1e-30)).item()
        assert err <= 1e-5, (n, err)
    assert int(fun.t) == 6


def test_compiled_stepper_under_dynamo_matches_the_reference():
    """The compiled step's graphs (dynamo + AOTAutograd, run by the "aot_eager" backend: no C++ or Triton
    code generation, so it is quick) against the reference: 4 steps with Grokfast-EMA and warm-up.
    Guards against graph semantics that differ from eager (torch 2.13 dropped the in-place update of a
    0-dim step counter under compile, which turned every weight into NaN). Bound: relative error 1e-5."""
    rng = random.Random()
    cfg = _rand_config(rng)
    tok, lab = _tokens(rng, cfg, 32)
    tcfg = grokfast.TrainConfig(grokfast="ema", warmup=3, lr=1e-2, wd=0.5)
    seed = rng.randrange(1000)
    a, b = grokfast.Transformer(cfg, seed=seed), grokfast.Transformer(cfg, seed=seed)
    ref, comp = ReferenceStepper(a, tcfg), bench.CompiledReferenceStepper(b, tcfg, None, backend="aot_eager")
    for _ in range(4):
        ref.step(tok, lab)
        comp.step(tok, lab)
    assert int(comp.t) == 4
    pa = torch.cat([p.detach().flatten() for p in a.parameters()])
    pb = torch.cat([p.detach().flatten() for p in b.parameters()])
    assert torch.isfinite(pb).all()
    assert ((pa - pb).norm() / pa.norm()).item() <= 1e-5


def test_compiled_stepper_refuses_ma():
    cfg = grokfast.ModelConfig(d_model=8, n_heads=1, d_head=8, d_mlp=8, d_vocab=6, d_vocab_out=5)
    with pytest.raises(grokfast.ConfigError, match="MA"):
        bench.CompiledReferenceStepper(grokfast.Transformer(cfg), grokfast.TrainConfig(grokfast="ma"), None)


def test_datasheet_names_and_cpu_telemetry():
    assert bench.datasheet_for("NVIDIA H100 80GB HBM3")[0] == "H100 SXM"
    assert bench.datasheet_for("NVIDIA H200")[0] == "H200"
    assert bench.datasheet_for("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert bench.datasheet_for("NVIDIA A10G") == (None, None)
    t = bench.Telemetry("cpu")
    assert not t.available and t.reason == "no NVIDIA GPU: telemetry not available"
    assert t.end(t.begin(), 10) is None


@pytest.mark.parametrize("argv,needle", [
    (["--backends", "reference-eager,warp-drive"], "warp-drive"),
    (["--backends", "fused"], "reference-eager"),
    (["--timed-steps", "0"], "--timed-steps"),
    (["--preset", "nope"], "unknown preset"),
    (["--device", "tpu"], "--device"),
])
def test_bad_input_is_one_line_and_status_2(argv, needle, tmp_path, capsys):
    rc = main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path / "r"), *argv]
              if "--device" not in argv else ["bench", "--quick", "--out", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and "\n" not in err
    assert not (tmp_path / "r").exists()  # refused before any work


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU report is what CI checks")
def test_quick_report_on_cpu(tmp_path, capsys):
    out = tmp_path / "report"
    before = os.environ.get("GROKFAST_DOT_PRECISION")
    rc = main(["bench", "--quick", "--device", "cpu", "--out", str(out), "--no-progress", "--grok-max-steps", "20",
               "--precision", "tf32x3"])
    assert rc == 0
    assert os.environ.get("GROKFAST_DOT_PRECISION") == before      # the flag does not leak out of the command
    for f in ("report.json", "report.md", "step_time.png", "scaling_p.png", "scaling_frac.png",
              "scaling_d_model.png", "scaling_M.png"):
        assert (out / f).stat().st_size > 0, f
    rep = json.loads((out / "report.json").read_text())
    env = rep["environment"]
    for k in ("device", "date_utc", "python", "torch", "triton", "command", "git"):
        assert env.get(k) is not None, k
    assert env["command"].startswith("grokfast bench --quick") and "--precision tf32x3" in env["command"]
    assert env["dot_precision"] == "tf32x3"
    la = rep["launches"]                      # counted without a GPU
    # the optimizer is one launch in a fused step (its scalars ride in the forward/backward's last launch)
    assert la["total"] == sum(la["forward_backward"].values()) + la["optimizer"] > 3 and la["optimizer"] == 1
    assert len(la["per_launch"]) == la["total"] - la["optimizer"]
    assert la["dot_flops"] == sum(r["dot_flops"] for r in la["per_launch"]) >= la["useful_dot_flops"] > 0
    assert la["dot_flops_over_floor"] == la["dot_flops"] / rep["cost"]["matmul_flops"]
    assert env["telemetry"] == "no NVIDIA GPU: telemetry not available"

    def check_rows(rows, where):
        assert [r["backend"] for r in rows] == list(bench.BACKENDS), where
        for r in rows:
            assert r["status"] in ("measured", "not available"), (where, r)
            assert r["reason"], (where, r)
            if r["status"] == "measured":
                s = r["stats"]
                assert len(r["times_s"]) == s["n"] > 0 and all(t > 0 for t in r["times_s"])
                assert s["min_s"] <= s["p10_s"] <= s["median_s"] <= s["p90_s"]
        by = {r["backend"]: r for r in rows}
        assert by["reference-eager"]["status"] == "measured", where
        assert by["reference-eager"]["speedup_vs_eager"] == 1.0
        assert by["reference-eager"]["params_rel_diff_vs_eager"] == 0.0
        assert "_final_params" not in by["reference-eager"]
        assert by["fused"]["status"] == by["fused-cudagraph"]["status"] == "not available", where

    check_rows(rep["steps"], "steps")
    assert rep["steps"][0]["stats"]["n"] == rep["plan"]["timed"]
    assert rep["cost"]["flops"] > rep["cost"]["matmul_flops"] > 0 and rep["cost"]["bytes"] > 0
    assert set(rep["scaling"]) == set(bench.SCALING_AXES)
    for axis, pts in rep["scaling"].items():
        assert len(pts) == len(rep["plan"]["scaling"][axis])
        for pt in pts:
            check_rows(pt["rows"], f"scaling {axis}={pt['value']}")
    grok = rep["grok"]
    assert grok and {r["backend"] for r in grok} == set(bench.BACKENDS)
    eager = next(r for r in grok if r["backend"] == "reference-eager")
    assert eager["status"] == "measured" and eager["steps_done"] <= 20 and eager["history"]
    md = (out / "report.md").read_text()
    assert env["device"] in md and env["date_utc"] in md
    for b in bench.BACKENDS:
        assert b in md
    assert "not available: " in md and f"Fused step: {la['total']} kernel launches" in md
    assert f"{la['dot_flops_over_floor']:.3f}x the floor's" in md
    assert "float32 dots: tf32x3" in md
    printed = capsys.readouterr().out
    assert "reference-eager" in printed and "not available" in printed


class _FakeNVML:
    """Stands in for pynvml: an energy counter that advances 500 mJ per reading."""
    NVML_CLOCK_SM, NVML_TEMPERATURE_GPU = 1, 0

    def __init__(self):
        self.energy = 1_000_000

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        self.energy += 500
        return self.energy

    def nvmlDeviceGetPowerUsage(self, h):
        return 350_000

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1980

    def nvmlDeviceGetUtilizationRates(self, h):
        return type("U", (), {"gpu": 97})()

    def nvmlDeviceGetTemperature(self, h, kind):
        return 51

    def nvmlDeviceGetMemoryInfo(self, h):
        raise RuntimeError("not supported")  # one failing reading must not cost the others


def test_telemetry_energy_per_step_from_the_counter():
    t = bench.Telemetry("cpu")
    t.available, t.nvml, t.h = True, _FakeNVML(), object()
    before = t.begin()
    res = t.end(before, n_steps=100)
    assert res["energy_J"] == pytest.approx(0.5) and res["energy_per_step_J"] == pytest.approx(0.005)
    assert res["after"]["power_W"] == 350 and res["after"]["sm_clock_MHz"] == 1980
    assert res["after"]["utilization_pct"] == 97 and res["after"]["memory_used_MiB"] is None
    assert res["mean_power_W"] > 0


def test_markdown_renders_gpu_fields():
    """The GPU-only parts of the report (datasheet floors, telemetry) render, from a synthetic report."""
    cfg = grokfast.ModelConfig(d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=3, d_vocab=8, d_vocab_out=7)
    tok, lab = _tokens(random.Random(0), cfg, 30)
    cost = bench.step_cost(cfg, grokfast.TrainConfig(), tok, lab)
    ceilings = bench.datasheet_ceilings(*bench.datasheet_for("NVIDIA H100 80GB HBM3"))
    times = [3e-5, 3.1e-5, 2.9e-5, 3.3e-5]
    rows = [{"backend": b, "workload": "w", "M": 1, "status": "measured", "reason": "x",
             "stats": bench.time_stats(times), "times_s": times, "first_step_s": 1.0}
            for b in bench.BACKENDS[:1]] + [{"backend": b, "status": "not available", "reason": "no GPU here"}
                                            for b in bench.BACKENDS[1:]]
    rows[0]["telemetry"] = {"energy_per_step_J": 0.01, "mean_power_W": 300.0,
                            "after": {"sm_clock_MHz": 1980, "utilization_pct": 90, "temperature_C": 50,
                                      "memory_used_MiB": 1234.0}}
    bench.attach_ratios_and_floor(rows, cost, ceilings)
    env = {"device": "NVIDIA H100 80GB HBM3", "date_utc": "2026-01-01 00:00:00 UTC", "command": "grokfast bench",
           "git": {"commit": "abc", "dirty": False}, "python": "3", "torch": "2", "triton": "3", "cuda": "13.0",
           "driver": "580", "platform": "linux", "cpu": "x", "cpu_count": 16, "torch_threads": 16,
           "telemetry": "nvidia-ml-py"}
    report = {"environment": env, "plan": {"warmup": 1, "timed": 4, "quick": False,
                                           "method": {"loss": "stablemax", "orthograd": True}},
              "timing_method": "events",
              "workload": {"label": "w", "task": {"op": "x+y", "p": 7}, "n_train": 30, "model": cfg.to_dict(),
                           "n_params": cfg.n_params(), "grokfast": "none"},
              "cost": cost, "ceilings": ceilings, "floors": bench.floors(cost, ceilings), "steps": rows,
              "grok": [], "scaling": {}}
    md = bench.render_markdown(report, {})
    assert "datasheet H100 SXM, IEEE fp32" in md and "datasheet H100 SXM, 3xTF32 products" in md
    assert "GPU telemetry" in md and "1980 MHz" in md and "not available: no GPU here" in md
    assert "- training method of every step and run: loss stablemax, orthogonal gradient (orthograd)" in md
    lines = md.splitlines()
    i = next(i for i, l in enumerate(lines) if l.startswith("| backend | status |"))
    table = lines[i:lines.index("", i)]
    assert len(table) == 2 + len(bench.BACKENDS)
    for line in table:  # every row of the step table has the header's number of cells
        assert line.count("|") == table[0].count("|"), line


def test_bench_times_compare_s_fused_methods_when_asked():
    """--loss stablemax / --orthograd reach every workload the report times (the step, the scaling points, the
    time-to-grok runs) and the launch count (orthograd's sums pass: one optimizer launch more); the default plan
    adds nothing, and a bad loss is refused before any work."""
    from grokfast.bench import fused_launches, make_plan, make_workload
    from grokfast.bench.plan import scaling_points
    from grokfast.cli import build_parser
    from grokfast.bench_cli import command_line

    assert make_plan(quick=True, device="cpu").method == {}
    plan = make_plan(quick=True, device="cpu", preset="nanda", loss="stablemax", orthograd=True)
    assert plan.method == {"loss": "stablemax", "orthograd": True}
    assert plan.grok and all(g.overrides["loss"] == "stablemax" and g.overrides["orthograd"] for g in plan.grok)
    points = scaling_points(plan)
    assert points and all(wl.train.loss == "stablemax" and wl.train.orthograd for _, _, wl in points)
    wl = make_workload(plan.preset, "cpu", **plan.method)
    base = fused_launches(make_workload(plan.preset, "cpu"))
    la = fused_launches(wl)
    assert la["optimizer"] == base["optimizer"] + 1 and la["forward_backward"] == base["forward_backward"]
    with pytest.raises(grokfast.ConfigError, match="--loss"):
        make_plan(quick=True, device="cpu", loss="hinge")
    # the compiled reference step runs plain AdamW on cross-entropy: it says so instead of timing another step
    from grokfast.bench.steppers import backend_status
    ok, why = backend_status("reference-compile-max-autotune", wl, "cpu")
    assert not ok and "not loss stablemax, orthograd" in why and "\n" not in why
    assert backend_status("reference-compile-max-autotune", make_workload(plan.preset, "cpu"), "cpu")[0]
    args = build_parser().parse_args(["bench", "--quick", "--loss", "stablemax", "--orthograd"])
    assert "--orthograd" in command_line(args) and "--loss stablemax" in command_line(args)
