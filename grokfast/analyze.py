"""Progress measures and figures for a run directory: what ``grokfast analyze RUN_DIR`` does.

    a = analyze_run("runs/p31")            # every checkpoint's measures, details at the last one
    paths = write_analysis(a)              # RUN_DIR/report.md, RUN_DIR/figures/*.png, RUN_DIR/measures.jsonl

``analyze_run`` computes (grokfast.measures, grokfast.fourier); ``write_analysis`` draws
(grokfast.plots) and writes. Over training, the restricted and excluded loss of every checkpoint are
taken along the key frequencies of the analysed checkpoint (the last one, or ``at``), as Nanda et al.
follow one circuit back in time; each row also records that checkpoint's own key-frequency count.

Files (in the run directory):
    report.md, figures/*.png, measures.jsonl (one row per analysed checkpoint), analysis.json
    with ``at=STEP``: report_step_{STEP:07d}.md, figures/step_{STEP:07d}/*.png, analysis_step_{STEP:07d}.json
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import fourier, measures as M, probes as PR, rundir
from .config import ConfigError

LOOP_NEURONS = 7
MAX_PLANES = 6

# name in the rows -> (what the report and figures call it, what it means)
MEASURE_INFO = {
    "sum_sq_weights": ("sum of squared weights", "sum over every parameter of its squared entries"),
    "gini_W_E": ("Gini of W_E Fourier norms", "sparsity of the embedding in the Fourier basis (0 flat, ~1 one component)"),
    "gini_W_L": ("Gini of W_L Fourier norms", "sparsity of the neuron-to-logit map W_out W_U over output frequencies"),
    "fourier_frequency_sparsity": ("Fourier Frequency Sparsity", "fraction of frequencies with >= 0.5x the top norm in W_E"),
    "fourier_coefficient_ratio": ("Fourier Coefficient Ratio", "cosine share of W_E's significant frequencies (0.5 balanced)"),
    "circularity": ("circularity of W_E", "energy share of one frequency on the top-2 principal components (1 = circle)"),
    "gradient_symmetricity": ("gradient symmetricity", "cos similarity of d logit_c / d embed(a) and / d embed(b) (pizza ~1)"),
    "distance_irrelevance": ("distance irrelevance", "correct-logit spread within a fixed a-b over the total (clock ~1, pizza ~0)"),
    "n_key_freqs": ("number of key frequencies", "frequencies with neuron clusters (>= 50% of a neuron's variance in one frequency)"),
    "restricted_loss": ("restricted loss", "loss with only the key-frequency logit components, all pairs"),
    "excluded_loss": ("excluded loss", "loss with the key-frequency components removed, train pairs"),
}


@dataclass
class Analysis:
    """Everything ``grokfast analyze`` computes for one run directory (no figures)."""

    run_dir: Path
    step: int                      # the checkpoint analysed in detail
    at: int | None                 # the --at step, or None (all checkpoints)
    title: str
    task_text: str
    model_text: str
    measures: dict                 # grokfast.measures.all_measures at ``step``
    key_freqs: list
    algorithm: str
    history: list                  # metrics.jsonl rows
    measure_rows: list             # one dict per analysed checkpoint: step and scalar measures
    phases: dict                   # {phase: end step or None}
    phases_how: dict               # {phase: how it was found}
    detail: dict = field(default_factory=dict)   # arrays for the figures at ``step``
    skipped: dict = field(default_factory=dict)  # {what: why}
    verdict: PR.Verdict | None = None            # grokked / memorising / untrained, with the evidence


def _scalars(m: dict) -> dict:
    return {k: v for k, v in m.items() if isinstance(v, float)}


def _pick_loop_neurons(neurons: torch.Tensor, freq: torch.Tensor, frac: torch.Tensor, key: list) -> list[int]:
    """LOOP_NEURONS neurons for the loops figure: the highest-variance neurons of the key-frequency
    clusters, sorted by frequency; filled up with the highest-variance others."""
    var = neurons.reshape(-1, neurons.shape[-1]).var(dim=0)
    in_key = torch.tensor([int(f) in key for f in freq]) & (frac >= fourier.KEY_THRESHOLD)
    order = torch.argsort(var, descending=True).tolist()
    chosen = [i for i in order if in_key[i]][:LOOP_NEURONS]
    chosen += [i for i in order if i not in chosen][:LOOP_NEURONS - len(chosen)]
    return sorted(chosen, key=lambda i: (int(freq[i]), -float(var[i])))


def _details(model, task, key: list, skipped: dict) -> dict:
    """The arrays the figures at one checkpoint draw (all on the CPU)."""
    p = task.p
    W = M.embedding(model, p).cpu()     # the figures' arrays live on the CPU whatever the device
    _, labels = fourier.fourier_basis(p)
    d = {"basis_labels": labels, "embed_norms": fourier.component_norms(W)}
    d["pca_xy"], d["pca_share"] = M.pca_2d(W)
    d["planes"] = {k: fourier.frequency_plane(W, k) for k in key[:MAX_PLANES]}
    grid, why = M.full_grid(task)
    if grid is None:
        for what in ("neuron loops", "neuron decomposition", "neuron clusters", "logit spectrum"):
            skipped[what] = why
        return d
    logits, neurons = M.grid_forward(model, grid)
    logits, neurons, answers = logits.cpu(), neurons.cpu(), grid.answers.cpu()
    fr = fourier.neuron_frequency_fractions(neurons)
    best, idx = fr.max(dim=1)
    freq = idx + 1
    d.update(fractions=fr, freq=freq, frac=best, logit_spectrum=fourier.logit_spectrum(logits))
    loops = _pick_loop_neurons(neurons, freq, best, key)
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    d["loop_neurons"] = loops
    d["loop_acts"] = neurons.reshape(p * p, -1)[:, loops]
    d["loop_colour"] = (answers if grid.op.replace(" ", "") in ("x+y", "x-y") else (a + b) % p)
    d["loop_colour_label"] = f"the answer {grid.op} mod {p}" if grid.op.replace(" ", "") in ("x+y", "x-y") \
        else "(a + b) mod p"
    # the neuron for the heatmap: the highest-variance neuron of the largest key cluster, else overall
    var = neurons.reshape(p * p, -1).var(dim=0)
    cand = torch.arange(neurons.shape[-1])
    if key:
        sizes = {k: int(((freq == k) & (best >= fourier.KEY_THRESHOLD)).sum()) for k in key}
        k_big = max(key, key=lambda k: sizes[k])
        sel = (freq == k_big) & (best >= fourier.KEY_THRESHOLD)
        cand = cand[sel] if sel.any() else cand
    n = int(cand[torch.argmax(var[cand])])
    k = int(freq[n])
    parts = fourier.decompose_neuron(neurons[:, :, n], k)
    d["decomp_neuron"], d["decomp_freq"], d["decomp_frac"] = n, k, float(best[n])
    d["decomp_parts"] = {"activation": neurons[:, :, n] - parts["const"], "a": parts["a"], "b": parts["b"],
                         "a*b": parts["a*b"], "rest": parts["rest"]}
    _inside(model, task, key, grid, logits, neurons, n, d)
    return d


def _inside(model, task, key: list, grid, logits, neurons, n: int, d: dict) -> None:
    """The arrays of the looking-inside figures (grokfast.probes) and each figure's reading."""
    p = task.p
    flat = logits.reshape(p * p, -1)
    right = flat.argmax(-1) == grid.answers.cpu()
    m = grid.train_mask.cpu()
    d["train_acc"] = float(right[m].double().mean()) if m.any() else float("nan")
    d["test_acc"] = float(right[~m].double().mean()) if (~m).any() else float("nan")
    d["all_acc"] = float(right.double().mean())
    readings = {}
    d["probes"] = PR.embedding_probes(model, task, key)
    circle = any(all(q.found for q in d["probes"] if q.k == k and q.slot == s)
                 for k in {q.k for q in d["probes"]} for s in ("a", "b"))
    readings["embedding probes"] = "grokked" if circle and key else "memorising"
    d["surface_neuron"] = n
    d["surface_act"] = neurons[:, :, n]
    d["surface_components"], d["surface_top_share"] = PR.surface_components(neurons[:, :, n])
    readings["neuron surface"] = "grokked" if key and d["decomp_frac"] >= fourier.KEY_THRESHOLD else "memorising"
    answers = grid.answers.cpu()
    d["answers_grid"] = answers.reshape(p, p)
    units = [PR.adding_units(logits[:, :, :p], answers, "logits")]
    if len(model.blocks) >= 2:
        units.append(PR.adding_units(neurons, answers, f"layer {len(model.blocks) - 1} neurons"))
    d["adding"] = units
    best = max(units, key=lambda u: float(u.shares.max()))
    i = int(best.shares.argmax())
    src = logits if best.kind == "logits" else neurons
    d["adding_unit"] = (best.kind, i, src[:, :, i], float(best.shares[i]), int(best.preferred[i]))
    # read the last layer along the frequency of the largest neuron cluster (no key frequency: the embedding's strongest)
    k = (max(key, key=lambda f: int(((d["freq"] == f) & (d["frac"] >= fourier.KEY_THRESHOLD)).sum())) if key
         else PR.probe_frequencies(model, p, key)[0])
    d["adding_decomp"] = PR.adding_decomposition(neurons, M.neuron_logit_map(model).cpu(), answers, k, grid.op)
    adds = len(units[0].adding) >= 0.5 * p
    readings["units that add"] = "grokked" if adds and d["adding_decomp"].target_share >= 0.5 else "memorising"
    d["logit_components"], _ = PR.spectrum_components(d["logit_spectrum"])
    d["logit_key_share"] = PR.key_product_share(d["logit_spectrum"], key)
    readings["logit spectrum"] = "grokked" if d["logit_key_share"] >= 0.5 else "memorising"
    d["readings"] = readings


def analyze_run(run_dir, at: int | None = None, every: int | None = None, device="cpu",
                log=None) -> Analysis:
    """Compute every measure for a run directory.

    at: analyse that checkpoint only (no measures over training). every: over training, analyse only
    the checkpoints whose step is a multiple of ``every`` (the detailed one is always included).
    Raises ConfigError (one line) for a directory that is not a run, a missing step, or a bad ``every``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory: pass the run directory that `grokfast train --out` wrote")
    if every is not None and (not isinstance(every, int) or every < 1):
        raise ConfigError(f"--every must be a positive integer, got {every!r}")
    cfg = rundir.load_config(run_dir)
    ckpts = rundir.list_checkpoints(run_dir)
    if not ckpts:
        raise ConfigError(f"{run_dir} has no checkpoints to analyse: train with --checkpoint-every K")
    steps = [s for s, _ in ckpts]
    if at is not None and at not in steps:
        raise ConfigError(f"no checkpoint at step {at} in {run_dir}; steps saved: {steps}")
    log = log or (lambda msg: None)

    model, task, step = rundir.load_model(run_dir, at, device=device)
    model.eval()
    mc, tc = cfg["model"], cfg["train"]
    m = M.all_measures(model, task)
    key = m.get("key_freqs", [])
    skipped = dict(m.get("skipped", {}))
    algorithm = M.clock_or_pizza(m["gradient_symmetricity"], m.get("distance_irrelevance"), m.get("n_key_freqs"))
    detail = _details(model, task, key, skipped)
    history = rundir.read_metrics(run_dir)
    verdict = None
    if "all_acc" in detail:
        split_known = cfg.get("imported", {}).get("split_known", True)
        verdict = PR.verdict(detail["train_acc"] if split_known else detail["all_acc"],
                             detail["test_acc"] if split_known else None, key, detail["readings"])
    else:
        skipped["verdict (grokked or memorising)"] = skipped.get("logit spectrum", "no full grid")

    rows = []
    if at is None:
        todo = [(s, path) for s, path in ckpts if every is None or s % every == 0 or s == step]
        for i, (s, path) in enumerate(todo):
            tensors, _ = rundir.load_checkpoint(path)
            model.load_state_dict(rundir.model_weights(tensors))
            mm = M.all_measures(model, task, key_freqs=key if "key_freqs" in m else None)
            rows.append({"step": s, **_scalars(mm)})
            log(f"step {s}: {i + 1}/{len(todo)} checkpoints measured")
        model.load_state_dict(rundir.model_weights(rundir.load_checkpoint(dict(ckpts)[step])[0]))
    else:
        skipped["measures over training"] = "--at analyses one checkpoint; run without --at for every checkpoint"
    ends, how = M.phases(history, rows, task.p)
    if not history:
        how = {ph: "no metrics.jsonl (an imported model has no training history)" for ph in ends}

    gf = "" if tc.grokfast == "none" else f", Grokfast-{tc.grokfast.upper()}"
    task_text = f"{task.op} mod {task.p}, {int(round(task.frac * 100))}% train, layout '{task.layout}'"
    if len(task.ops) > 1:
        task_text += f" (the Fourier measures read the first operation, {task.ops[0].name})"
    model_text = (f"{mc.n_layers} layer(s), d_model {mc.d_model}, {mc.n_heads} heads x {mc.d_head}, d_mlp {mc.d_mlp}, "
                  f"{mc.act}{', LayerNorm' if mc.layernorm else ''}, attention rate {mc.attn_alpha:g}; "
                  f"lr {tc.lr:g}, wd {tc.wd:g}{gf}")
    if "imported" in cfg:
        model_text += f"; imported from {cfg['imported'].get('format')} file {cfg['imported'].get('file')}"
    return Analysis(run_dir, step, at, f"{task.op} mod {task.p}, step {step}", task_text, model_text, m, key,
                    algorithm, history, rows, ends, how, detail, skipped, verdict)


def key_freqs_text(a: Analysis) -> str:
    """"4, 5", "none", or "not measured (the reason)"."""
    if "key_freqs" in a.skipped:
        return f"not measured ({a.skipped['key_freqs']})"
    return ", ".join(map(str, a.key_freqs)) if a.key_freqs else "none"


def group_skipped(skipped: dict) -> dict:
    """{what: why} -> {why: "what1, what2, ..."}: one line per reason."""
    out: dict = {}
    for what, why in skipped.items():
        out.setdefault(why, []).append(what)
    return {why: ", ".join(whats) for why, whats in out.items()}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v)


def _json_ready(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    return x


def write_analysis(a: Analysis, out_dir=None) -> dict:
    """Draw every figure and write the report; returns {"report": path, "figures": {name: path}, ...}.

    out_dir defaults to the run directory. Figures are drawn by grokfast.plots from a's arrays."""
    from . import plots

    out = Path(out_dir) if out_dir is not None else a.run_dir
    tag = "" if a.at is None else f"_step_{a.at:07d}"
    fig_dir = out / "figures" / (f"step_{a.at:07d}" if a.at is not None else "")
    fig_dir.mkdir(parents=True, exist_ok=True)
    d, figs = a.detail, {}
    key = a.key_freqs
    names = {k: v[0] for k, v in MEASURE_INFO.items()}

    def add(name, caption, fn, *args, **kw):
        try:
            figs[name] = (fn(*args, path=fig_dir / f"{name}.png", **kw), caption)
        except Exception as e:  # one figure that cannot be drawn must not cost the others; say why
            a.skipped[f"figure {name}"] = f"{type(e).__name__}: {e}"

    if a.history:
        add("accuracy_loss_phases", "Train and test accuracy and loss, with the ends of the three phases",
            plots.grokking_figure, a.history,
            title=f"{a.title.split(',')[0]}: accuracy and loss with phase boundaries",
            phases={f"end of {k}": v for k, v in a.phases.items()})
    if any("restricted_loss" in r for r in a.measure_rows):
        add("restricted_excluded_loss", "Restricted and excluded loss against step",
            plots.loss_decomposition_figure, a.history, a.measure_rows,
            title=f"restricted and excluded loss (key frequencies {', '.join(map(str, key)) or 'none'})",
            phases=a.phases)
    if a.measure_rows:
        add("measures", "Every progress measure against step", plots.measures_figure, a.measure_rows, names,
            title="progress measures against step", phases=a.phases)
    add("embedding_circle", "The embedding on its top two principal components and on each key frequency's plane",
        plots.embedding_circles_figure, d["pca_xy"], d["pca_share"], d["planes"],
        title=f"embedding of the numbers at step {a.step}: principal components and key-frequency (cos, sin) planes")
    add("embedding_spectrum", "Fourier spectrum of W_E", plots.spectrum_figure, d["embed_norms"], d["basis_labels"],
        title=f"Fourier spectrum of W_E at step {a.step}: norm of each component (key frequencies in red)",
        key_freqs=key)
    if "fractions" in d:
        add("neuron_loops", f"{len(d['loop_neurons'])} x {len(d['loop_neurons'])} pairs of neurons over all inputs",
            plots.neuron_loops_figure, d["loop_acts"], d["loop_neurons"], d["loop_colour"],
            title=f"pairs of neurons over all inputs at step {a.step}, coloured by {d['loop_colour_label']}",
            colour_label=d["loop_colour_label"])
        add("neuron_decomposition", "One neuron over (a, b) and its 2D Fourier decomposition",
            plots.neuron_decomposition_figure, d["decomp_parts"], d["decomp_neuron"], d["decomp_freq"],
            title=(f"neuron {d['decomp_neuron']} at step {a.step} (centred) and its parts at frequency "
                   f"{d['decomp_freq']} ({100 * d['decomp_frac']:.0f}% of its variance in that block)"))
        add("neuron_clusters", "Neuron-frequency clusters", plots.neuron_clusters_figure, d["fractions"],
            d["freq"], d["frac"], fourier.KEY_THRESHOLD,
            title=f"neuron-frequency clusters at step {a.step}: fraction of each neuron's variance per frequency")
    if "probes" in d:
        add("logit_spectrum", "2D Fourier spectrum of the logits", plots.logit_spectrum_figure, d["logit_spectrum"],
            d["basis_labels"], d["logit_components"],
            title=(f"2D Fourier spectrum of the logits at step {a.step} (norm over classes): "
                   f"{d['logit_key_share']:.0%} in the key frequencies' products"))
        add("embedding_probes", "Sparse linear probes of the embedding: probe output against x beside the target",
            plots.probes_figure, d["probes"],
            title=f"sparse linear probes of the embedding at step {a.step} (at most {PR.PROBE_MAX_DIRS} directions)")
        add("neuron_surface", "One neuron as a surface over (a, b), with its largest 2D Fourier components",
            plots.neuron_surface_figure, d["surface_act"], d["surface_components"], d["surface_neuron"],
            title=f"neuron {d['surface_neuron']} at step {a.step} over every input (a, b)")
        kind, i, unit, share, c = d["adding_unit"]
        name = f"logit {i}" if kind == "logits" else f"{kind.replace('neurons', 'neuron')} {i}"
        add("adding_units", "Units that add: a unit constant along the answer's lines, and W_out W_U along a key frequency",
            plots.adding_figure, unit, d["answers_grid"], d["adding_decomp"],
            title=(f"at step {a.step}: {name} ({share:.0%} of its variance explained by the answer; largest on "
                   f"c = {c}) and the last layer read along frequency {d['adding_decomp'].k}: {d['adding_decomp'].identity}"),
            unit_label=f"{name}, lines of constant {a.title.split(' mod')[0]}")

    # machine-readable companions
    if a.at is None and a.measure_rows:
        rundir.write_text(out / "measures.jsonl", "".join(json.dumps(r) + "\n" for r in a.measure_rows))
    summary = {"step": a.step, "key_freqs": key, "algorithm": a.algorithm,
               "verdict": None if a.verdict is None else {"word": a.verdict.word, "why": a.verdict.why,
                                                          "readings": a.verdict.readings},
               "measures": _scalars(a.measures), "phases": a.phases, "phases_how": a.phases_how,
               "skipped": a.skipped}
    rundir.write_json(out / f"analysis{tag}.json", summary)

    report = out / f"report{tag}.md"
    rundir.write_text(report, _report_text(a, figs, fig_dir.relative_to(out)))
    return {"report": report, "figures": {n: p for n, (p, _) in figs.items()}, "json": out / f"analysis{tag}.json"}


def _report_text(a: Analysis, figs: dict, rel: Path) -> str:
    m = a.measures
    L = [f"# Analysis of {a.run_dir.name}: {a.title}", "",
         f"- task: {a.task_text}", f"- model: {a.model_text}",
         f"- checkpoint analysed: step {a.step}" + (" (--at)" if a.at is not None else " (the last)"), ""]
    L.append(f"**Key frequencies:** {key_freqs_text(a)}")
    L.append("")
    L.append(f"**Algorithm (clock or pizza):** {a.algorithm}")
    if a.verdict is not None:
        L += ["", f"**Verdict:** {a.verdict.word} ({a.verdict.why})"]
    L += ["", "## Measures at step %d" % a.step, "", "| measure | value | what it is |", "|---|---|---|"]
    for k, (name, what) in MEASURE_INFO.items():
        if k in m:
            L.append(f"| {name} | {_fmt(m[k])} | {what} |")
    if a.key_freqs:
        L.append("")
        L.append("Restricted and excluded loss above are taken along this checkpoint's own key frequencies.")
    if "probes" in a.detail:
        L += _inside_text(a)
    L += ["", "## Phases", "", "| phase | ends at step | how |", "|---|---|---|"]
    for ph in M.PHASE_NAMES:
        L.append(f"| {ph} | {_fmt(a.phases.get(ph))} | {a.phases_how.get(ph, '')} |")
    if a.measure_rows:
        cols = [k for k in MEASURE_INFO if any(k in r for r in a.measure_rows)]
        L += ["", "## Measures over training", "",
              f"Restricted and excluded loss along the key frequencies of step {a.step}; "
              "number of key frequencies: each checkpoint's own.", "",
              "| step | " + " | ".join(MEASURE_INFO[c][0] for c in cols) + " |",
              "|---|" + "---|" * len(cols)]
        for r in a.measure_rows:
            L.append(f"| {r['step']} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    if a.skipped:
        L += ["", "## Skipped", ""]
        L += [f"- {whats}: {why}" for why, whats in group_skipped(a.skipped).items()]
    L += ["", "## Figures", ""]
    for name, (path, caption) in figs.items():
        L += [f"### {caption}", "", f"![{caption}]({(rel / Path(path).name).as_posix()})", ""]
    return "\n".join(L) + "\n"


def _inside_text(a: Analysis) -> list[str]:
    """The report's "Looking inside" section: what each figure shows and which picture it is."""
    d, v = a.detail, a.verdict
    L = ["", "## Looking inside", "",
         "Each figure's reading on its own: \"grokked\" when it shows the Fourier circuit, \"memorising\" when it "
         "shows no structure (a fresh model looks the same).", "", "| figure | shows | reading |", "|---|---|---|"]
    found = [q for q in d["probes"] if q.found]
    best = max(d["probes"], key=lambda q: q.r2_by_dirs[1] if len(q.r2_by_dirs) > 1 else q.r2)
    L.append(f"| embedding probes | {len(found)} of {len(d['probes'])} probes reach R^2 >= {PR.PROBE_R2} with at most "
             f"{PR.PROBE_MAX_DIRS} directions; best with 2: {best.fn}(w_{best.k} x) at slot {best.slot}, R^2 {best.r2_by_dirs[1]:.3f} | "
             f"{v.readings['embedding probes']} |")
    comps = ", ".join(f"{n} {s:.0%}" for n, s, _ in d["surface_components"][:4])
    L.append(f"| neuron surface | neuron {d['surface_neuron']}: {comps}; {d['decomp_frac']:.0%} of its variance at "
             f"frequency {d['decomp_freq']} | {v.readings['neuron surface']} |")
    lg = d["adding"][0]
    dec = d["adding_decomp"]
    txt = (f"{len(lg.adding)} of {lg.shares.numel()} logits have >= {PR.ADDING_SHARE:.0%} of their variance explained "
           f"by the answer (median {float(lg.shares.median()):.2f})")
    for u in d["adding"][1:]:
        txt += f"; {len(u.adding)} of {u.shares.numel()} {u.kind} do"
    cc, ss = dec.products["cos a cos b"][0], dec.products["sin a sin b"][0]
    txt += (f"; along frequency {dec.k}, W_out W_U reads cos a cos b {cc:+.3g}, sin a sin b {ss:+.3g}, "
            f"{dec.target_share:.0%} of it along cos(w c(a, b))")
    L.append(f"| units that add | {txt} | {v.readings['units that add']} |")
    comps = ", ".join(f"{n} {s:.0%}" for n, s, _ in d["logit_components"][:4])
    L.append(f"| logit spectrum | {d['logit_key_share']:.0%} of the energy in the key frequencies' products; "
             f"largest: {comps} | {v.readings['logit spectrum']} |")
    L += ["", "Embedding probes (R^2 with the best 1, 2, ... directions, the principal directions of the embedding):", "",
          "| frequency | target | slot | directions | R^2 | R^2 by directions |", "|---|---|---|---|---|---|"]
    for q in d["probes"]:
        L.append(f"| {q.k} | {q.fn}(w_{q.k} x) | {q.slot} | {q.n_dirs} | {q.r2:.3f} | "
                 + ", ".join(f"{r:.3f}" for r in q.r2_by_dirs) + " |")
    return L
