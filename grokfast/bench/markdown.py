"""The Markdown report (``render_markdown``): device, date, versions and command first, then every table
of a report dict, with the number formats it uses."""
from __future__ import annotations




def _fmt_s(x) -> str:
    if x is None:
        return "n/a"
    if x >= 1:
        return f"{x:.3g} s"
    if x >= 1e-3:
        return f"{x * 1e3:.3g} ms"
    return f"{x * 1e6:.3g} us"


def _fmt_rel(x) -> str:
    return "n/a" if x is None else f"{x:.1e}"


def _fmt_n(x, unit="") -> str:
    if x is None:
        return "n/a"
    for k, s in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= k:
            return f"{x / k:.3g} {s}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def render_markdown(report: dict, figures: dict) -> str:
    """The Markdown report: device, date, versions and command first; then every table."""
    env, wl, cost = report["environment"], report["workload"], report["cost"]
    L = []
    L.append(f"# grokfast bench: {env['device']}, {env['date_utc']}")
    L.append("")
    g = env["git"]
    L.append(f"- command: `{env['command']}`")
    L.append(f"- git commit: {g['commit'] or 'unknown'}{' (with uncommitted changes)' if g.get('dirty') else ''}")
    L.append(f"- python {env['python']}, torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda') or 'n/a'}, "
             f"driver {env.get('driver') or 'n/a'}; {env['platform']}; CPU: {env['cpu']} "
             f"({env['cpu_count']} cores, torch threads {env['torch_threads']})")
    L.append(f"- telemetry: {env['telemetry']}")
    L.append(f"- fused kernels' float32 dots: {env.get('dot_precision', 'ieee')} (GROKFAST_DOT_PRECISION); "
             f"up to {env.get('gemm_group', '3')} independent products per launch (GROKFAST_GEMM_GROUP)")
    L.append(f"- timing: {report['timing_method']}; {report['plan']['warmup']} warm-up steps, "
             f"{report['plan']['timed']} timed steps per backend" + ("; --quick" if report["plan"]["quick"] else ""))
    method = report["plan"].get("method") or {}
    if method:
        L.append("- training method of every step and run: " + ", ".join(
            f"loss {v}" if k == "loss" else ("orthogonal gradient (orthograd)" if v else "") for k, v in method.items()))
    L.append("")
    m = wl["model"]
    L.append(f"## Step time: one full-batch training step ({env['device']}, {env['date_utc']})")
    L.append("")
    L.append(f"Work: {wl['label']}: {wl['task']['op']} mod {wl['task']['p']}, {wl['n_train']} training examples "
             f"(full batch), {m['n_layers']} layer(s), d_model {m['d_model']}, {m['n_heads']} heads x {m['d_head']}, "
             f"d_mlp {m['d_mlp']}, {m['act']}, {wl['n_params']} parameters, Grokfast {wl['grokfast']}.")
    L.append("")
    fl_names = list(report["floors"])
    L.append("| backend | status | median | p10 | p90 | min | steps/s | speed-up vs eager | first step (compile) | "
             "weights vs eager after all steps | " + " | ".join(f"floor / median ({n})" for n in fl_names) + " |")
    L.append("|" + "---|" * (10 + len(fl_names)))
    for r in report["steps"]:
        if r["status"] != "measured":
            L.append(f"| {r['backend']} | not available: {r['reason']} |" + " |" * (8 + len(fl_names)))
            continue
        s = r["stats"]
        sp = r.get("speedup_vs_eager")
        L.append(f"| {r['backend']} | measured | {_fmt_s(s['median_s'])} | {_fmt_s(s['p10_s'])} | {_fmt_s(s['p90_s'])} | "
                 f"{_fmt_s(s['min_s'])} | {s['steps_per_s']:.4g} | {'n/a' if sp is None else f'{sp:.3g}x'} | "
                 f"{_fmt_s(r.get('first_step_s'))} | {_fmt_rel(r.get('params_rel_diff_vs_eager'))} | "
                 + " | ".join(f"{r['fraction_of_floor'].get(n, float('nan')):.3g}" for n in fl_names) + " |")
    for r in report["steps"]:
        if r["backend"].startswith("fused") and r["status"] == "measured":
            L.append("")
            L.append(f"{r['backend']}: CUDA graph captured and replayed: {'yes' if r.get('cuda_graph_captured') else 'no'}.")
    la = report.get("launches") or {}
    L.append("")
    if "total" in la:
        L.append(f"Fused step: {la['total']} kernel launches (forward + backward "
                 + ", ".join(f"{n} x{c}" for n, c in la["forward_backward"].items())
                 + f"; optimizer {la['optimizer']}), counted.")
    if "dot_flops" in la:
        ratio = la.get("dot_flops_over_floor")
        L.append("")
        L.append(f"Executed dot FLOPs per step (tl.dot on padded tiles, counted from the recorded launches): "
                 f"{_fmt_n(la['dot_flops'], 'FLOP')} ({_fmt_n(la['useful_dot_flops'], 'FLOP')} of products' own "
                 f"work)" + (f", {ratio:.3f}x the floor's {_fmt_n(cost['matmul_flops'], 'FLOP')} in products"
                             if ratio is not None else "")
                 + f"; besides, {_fmt_n(la.get('core_product_flops', 0), 'FLOP')} of products run as elementwise "
                   "multiply-adds (the attention backward's dz = dmid W_O^T).")
        L.append("")
        L.append("| launch | kernel | problems | executed dot FLOPs | products' own | elementwise products |")
        L.append("|---|---|---|---|---|---|")
        for i, r in enumerate(la["per_launch"]):
            L.append(f"| {i + 1} | {r['kernel']} | {r['problems']} | {_fmt_n(r['dot_flops'])} | {_fmt_n(r['useful'])} "
                     f"| {_fmt_n(r.get('core_flops', 0))} |")
    elif la:
        L.append(f"Fused step launches: not counted ({la.get('unavailable')}).")
    fused = next((r for r in report["steps"] if r["backend"] == "fused-cudagraph" and r["status"] == "measured"), None)
    if fused and fused.get("speedup_vs"):
        L.append("")
        L.append("fused-cudagraph against the others (median over median): "
                 + ", ".join(f"{v:.3g}x {k}" for k, v in fused["speedup_vs"].items()) + ".")
    L.append("")
    L.append("## The floor")
    L.append("")
    L.append(f"One step must do {_fmt_n(cost['flops'], 'FLOP')} ({_fmt_n(cost['matmul_flops'], 'FLOP')} of it in "
             f"products) and move at least {_fmt_n(cost['bytes'], 'B')} (counting in grokfast.bench.step_cost; "
             f"R = {cost['counts']['R']} distinct (position, token) pairs).")
    L.append("")
    L.append("| part | FLOPs |")
    L.append("|---|---|")
    for k, v in cost["flops_by_part"].items():
        L.append(f"| {k} | {_fmt_n(v)} |")
    L.append("")
    L.append("| part | bytes |")
    L.append("|---|---|")
    for k, v in cost["bytes_by_part"].items():
        L.append(f"| {k} | {_fmt_n(v)} |")
    L.append("")
    if report["floors"]:
        L.append("| peak rates | FLOP/s | bytes/s | compute time | memory time | floor | bound |")
        L.append("|---|---|---|---|---|---|---|")
        for n, f in report["floors"].items():
            c = report["ceilings"][n]
            L.append(f"| {n} | {_fmt_n(c['flops_per_s'])}" + (f" (products {_fmt_n(c['matmul_flops_per_s'])})"
                                                               if c.get("matmul_flops_per_s") else "")
                     + f" | {_fmt_n(c['bytes_per_s'])} | {_fmt_s(f['compute_s'])} | {_fmt_s(f['memory_s'])} | "
                       f"{_fmt_s(f['floor_s'])} | {f['bound']} |")
        if "measured" in report["ceilings"]:
            L.append("")
            L.append(f"Measured ceilings: {report['ceilings']['measured']['how']}.")
    if not any(k.startswith("datasheet") for k in report["ceilings"]):
        L.append("")
        L.append("No datasheet peaks for this device: datasheet floor fractions n/a.")
    L.append("")
    if report["grok"]:
        L.append(f"## Time to grok ({env['device']}, {env['date_utc']})")
        L.append("")
        L.append("grokfast.train with stop_at_grok; wall seconds are the trainer's clock and include evaluations.")
        L.append("")
        L.append("| run | backend | status | steps to 95% | s to 95% | steps to 99% | s to 99% | steps x median step | "
                 "steps run | final test acc |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in report["grok"]:
            if r["status"] != "measured":
                L.append(f"| {r['run']} | {r['backend']} | not available: {r['reason']} | | | | | | | |")
                continue
            nr = f"not reached in {r['steps_done']}"
            L.append(f"| {r['run']} | {r['backend']} | measured | {r['steps_to_grok_95'] if r['steps_to_grok_95'] is not None else nr} | "
                     f"{_fmt_s(r['seconds_to_grok_95'])} | {r['steps_to_grok'] if r['steps_to_grok'] is not None else nr} | "
                     f"{_fmt_s(r['seconds_to_grok'])} | {_fmt_s(r.get('step_seconds_to_grok'))} | {r['steps_done']} | "
                     f"{r['final_test_acc']:.4f} |")
        L.append("")
        L.append("Published (ANCHORS.md, Lee et al. 2024, one GTX 1080 Ti, batch 512): iterations to 95% "
                 "validation accuracy, baseline 39890, Grokfast-EMA 910.")
        L.append("")
    for axis, pts in report["scaling"].items():
        if not pts:
            continue
        L.append(f"## Scaling: step time against {axis} ({env['device']}, {env['date_utc']})")
        L.append("")
        names = [r["backend"] for r in pts[0]["rows"]]
        fl = next(iter(pts[0]["floors"]), None)
        L.append(f"| {axis} | " + " | ".join(names) + (f" | floor ({fl})" if fl else "") + " |")
        L.append("|" + "---|" * (1 + len(names) + (1 if fl else 0)))
        for pt in pts:
            cells = [_fmt_s(r["stats"]["median_s"]) if r["status"] == "measured" else "not available"
                     for r in pt["rows"]]
            L.append(f"| {pt['value']} | " + " | ".join(cells) + (f" | {_fmt_s(pt['floors'][fl]['floor_s'])}" if fl else "") + " |")
        reasons = {r["backend"]: r["reason"] for pt in pts for r in pt["rows"] if r["status"] != "measured"}
        if reasons:
            L.append("")
            for b, why in reasons.items():
                L.append(f"- {b}: not available: {why}")
        if axis == "M":
            L.append("")
            L.append("M > 1: the M models' steps run in turn (M single runs), unless a backend batches them.")
        L.append("")
    if figures:
        L.append("## Figures")
        L.append("")
        for what, name in figures.items():
            L.append(f"![{what}]({name})")
        L.append("")
    tel_rows = [r for r in report["steps"] if r.get("telemetry")]
    if tel_rows:
        L.append("## GPU telemetry (step-time runs, read before and after the timed steps)")
        L.append("")
        L.append("| backend | energy per step | mean power | SM clock after | utilisation after | temperature after | memory used after |")
        L.append("|---|---|---|---|---|---|---|")
        for r in tel_rows:
            t, a = r["telemetry"], r["telemetry"]["after"]
            L.append(f"| {r['backend']} | {_fmt_n(t.get('energy_per_step_J'), 'J')} | {_fmt_n(t.get('mean_power_W'), 'W')} | "
                     f"{a.get('sm_clock_MHz')} MHz | {a.get('utilization_pct')}% | {a.get('temperature_C')} C | "
                     f"{a.get('memory_used_MiB') and round(a['memory_used_MiB'])} MiB |")
        L.append("")
    else:
        L.append(f"Telemetry: {env['telemetry']}.")
        L.append("")
    return "\n".join(L)
