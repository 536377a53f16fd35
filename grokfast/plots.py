"""Every figure grokfast draws, from data that the trainer and the analysis return (nothing is computed here)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path) -> Path:
    from .rundir import atomic_write

    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path


def _accuracy_axes(ax, ylabel: str) -> None:
    """An accuracy panel (0 to 1) against a log step axis, gridded: the frame of sweep_curves and compare_figure."""
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, which="both", alpha=0.25)


def grokking_figure(history: list[dict], path, title: str = "", phases: dict | None = None) -> Path:
    """The classic grokking figure: train and test accuracy (left) and loss (right) against a log step
    axis. ``phases`` optionally maps a label to a step, drawn as a vertical line on both panels.

    Grokked: test accuracy jumps to 1 long after train accuracy did. Memorising: train accuracy at 1, test
    accuracy low."""
    rows = [r for r in history if r["step"] > 0]
    steps = [r["step"] for r in rows]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    ax_acc.plot(steps, [r["train_acc"] for r in rows], label="train", color="tab:blue")
    ax_acc.plot(steps, [r["test_acc"] for r in rows], label="test", color="tab:red")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(-0.02, 1.02)
    ax_loss.plot(steps, [r["train_loss"] for r in rows], label="train", color="tab:blue")
    ax_loss.plot(steps, [r["test_loss"] for r in rows], label="test", color="tab:red")
    ax_loss.set_ylabel("loss (cross-entropy)")
    ax_loss.set_yscale("log")
    for ax in (ax_acc, ax_loss):
        ax.set_xscale("log")
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.25)
        for label, s in (phases or {}).items():
            if s:
                ax.axvline(s, color="gray", ls="--", lw=1)
                ax.text(s, ax.get_ylim()[1], f" {label}", rotation=90, va="top", fontsize=7, color="gray")
        ax.legend(loc="best")
    fig.suptitle(title or "train and test accuracy and loss")
    return _save(fig, path)


def phase_diagram(data: dict, path, title: str = "") -> Path:
    """Heatmap of steps to grok over two swept axes (grokfast.sweep.phase_data): colour is the cell's
    median steps (a log scale when they span more than 10x); a cell where fewer than half its runs
    grokked is grey and marked "did not grok"; a cell where only some runs grokked shows "k/n"."""
    import math
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.ticker import FuncFormatter

    xs, ys = data["x_values"], data["y_values"]
    steps = np.array([[np.nan if v is None else v for v in row] for row in data["steps"]], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * max(3, len(xs)), 1.2 + 0.8 * max(3, len(ys))))
    finite = steps[np.isfinite(steps)]
    cmap = plt.get_cmap("viridis_r").with_extremes(bad="lightgray")
    norm = None
    if finite.size:
        lo, hi = max(1.0, finite.min()), max(2.0, finite.max())
        norm = LogNorm(lo, hi) if hi / lo > 10 else Normalize(lo - 0.5, hi + 0.5)
    im = ax.imshow(np.ma.masked_invalid(steps), cmap=cmap, norm=norm, origin="lower", aspect="auto")
    for j in range(len(ys)):
        for i in range(len(xs)):
            n, k, v = data["runs"][j][i], data["grokked"][j][i], data["steps"][j][i]
            if n == 0:
                text = "no run"
            elif v is None or math.isnan(v):
                text = "did not\ngrok" + (f"\n{k}/{n}" if k else "")
            else:
                text = f"{v:.0f}" + (f"\n{k}/{n}" if k < n else "")
            dark = False
            if v is not None and not math.isnan(v):
                r, g, b, _ = cmap(norm(v))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(i, j, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    fmt = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
    ax.set_xticks(range(len(xs)), [fmt(v) for v in xs])
    ax.set_yticks(range(len(ys)), [fmt(v) for v in ys])
    ax.set_xlabel(data["x"])
    ax.set_ylabel(data["y"])
    if finite.size:
        bar = fig.colorbar(im, ax=ax, label="steps to grok (median over runs)")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        bar.ax.yaxis.set_major_formatter(plain)
        bar.ax.yaxis.set_minor_formatter(plain)
    ax.set_title(title or "steps to grok")
    return _save(fig, path)


def sweep_curves(curves: list, path, title: str = "") -> Path:
    """Grokking curves of many runs overlaid: test accuracy (solid) and train accuracy (faint) against a
    log step axis, one colour per run; ``curves`` is [(label, metrics history)] (grokfast.sweep.curves_data).
    The legend is drawn for at most 12 runs."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cmap = plt.get_cmap("viridis")
    n = max(1, len(curves))
    for i, (label, history) in enumerate(curves):
        rows = [r for r in history if r["step"] > 0]
        steps = [r["step"] for r in rows]
        c = cmap(i / max(1, n - 1))
        ax.plot(steps, [r["train_acc"] for r in rows], color=c, alpha=0.3, lw=0.8)
        ax.plot(steps, [r["test_acc"] for r in rows], color=c, lw=1.2, label=label)
    _accuracy_axes(ax, "accuracy (solid: test, faint: train)")
    if 0 < len(curves) <= 12:
        ax.legend(loc="best", fontsize=7)
    ax.set_title(title or "grokking curves")
    return _save(fig, path)


def compare_figure(curves: list[dict], path, title: str = "") -> Path:
    """Test accuracy per method against a log step axis: the median over seeds as a line, the band from
    the lowest to the highest seed (grokfast.compare.curves_data), a dotted line at 99%."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    cmap = plt.get_cmap("tab10")
    for i, c in enumerate(curves):
        keep = [j for j, s in enumerate(c["steps"]) if s > 0]
        steps = [c["steps"][j] for j in keep]
        col = cmap(i % 10)
        ax.fill_between(steps, [c["lo"][j] for j in keep], [c["hi"][j] for j in keep], color=col, alpha=0.18, lw=0)
        ax.plot(steps, [c["median"][j] for j in keep], color=col, lw=1.6, label=f"{c['method']} ({c['runs']})")
    from matplotlib.ticker import ScalarFormatter

    ax.axhline(0.99, color="gray", ls=":", lw=1)
    _accuracy_axes(ax, "test accuracy")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.legend(loc="best", fontsize=7, title="method (seeds)", title_fontsize=7)
    ax.set_title(title or "test accuracy per method", fontsize=9)
    return _save(fig, path)


def bench_step_figure(rows: list[dict], path, title: str = "") -> Path:
    """Step time per backend (grokfast.bench rows): a bar at the median with a p10-p90 whisker, log scale;
    a backend that did not run is listed with 'not available'."""
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
    labels = [r["backend"] for r in rows]
    y = list(range(len(rows)))
    for i, r in enumerate(rows):
        if r["status"] == "measured":
            s = r["stats"]
            med = s["median_s"] * 1e6
            ax.barh(i, med, color="tab:blue", alpha=0.8)
            ax.errorbar(med, i, xerr=[[med - s["p10_s"] * 1e6], [s["p90_s"] * 1e6 - med]], color="black", capsize=3)
            ax.text(s["p90_s"] * 1e6, i, f"  {med:,.1f} us", va="center", fontsize=8)
        else:
            ax.text(0.01, i, "not available", va="center", fontsize=8, color="gray", transform=ax.get_yaxis_transform())
    if any(r["status"] == "measured" for r in rows):
        ax.set_xscale("log")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("time per step (us): median, whisker p10 to p90")
    ax.grid(True, axis="x", which="both", alpha=0.25)
    ax.set_title(title or "one training step per backend", fontsize=9)
    return _save(fig, path)


def bench_scaling_figure(axis: str, points: list[dict], path, title: str = "") -> Path:
    """Median step time (p10-p90 band) against one scaling axis, a line per measured backend, with the
    floor of each set of peak rates dashed. ``points``: [{"value", "rows", "floors"}] from grokfast.bench."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [pt["value"] for pt in points]
    backends = [r["backend"] for r in points[0]["rows"]] if points else []
    for b in backends:
        sel = [(pt["value"], r["stats"]) for pt in points for r in pt["rows"]
               if r["backend"] == b and r["status"] == "measured"]
        if not sel:
            continue
        x = [v for v, _ in sel]
        ax.plot(x, [s["median_s"] * 1e6 for _, s in sel], marker="o", label=b)
        ax.fill_between(x, [s["p10_s"] * 1e6 for _, s in sel], [s["p90_s"] * 1e6 for _, s in sel], alpha=0.2)
    names = list(points[0]["floors"]) if points else []
    for n in names:
        ax.plot(xs, [pt["floors"][n]["floor_s"] * 1e6 for pt in points], ls="--", lw=1, label=f"floor: {n}")
    ax.set_yscale("log")
    if axis in ("M", "p", "d_model"):
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(v) for v in xs])
    ax.set_xlabel(axis)
    ax.set_ylabel("time per step (us), median and p10-p90")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or f"step time against {axis}", fontsize=9)
    return _save(fig, path)


# ----------------------------------------------------------------------------- progress measures
# Figures of grokfast.analyze: each takes arrays the analysis returns (grokfast.measures, grokfast.fourier)
# and draws one PNG with a title that says what it shows.

def _phase_lines(ax, phases: dict | None) -> None:
    for label, s in (phases or {}).items():
        if s:
            ax.axvline(s, color="gray", ls="--", lw=1)
            ax.text(s, 1.0, f" end of {label}", rotation=90, va="top", fontsize=7, color="gray",
                    transform=ax.get_xaxis_transform())


def loss_decomposition_figure(history: list[dict], measure_rows: list[dict], path, title: str = "",
                              phases: dict | None = None) -> Path:
    """Train and test loss (from the metrics) with the restricted and excluded loss (from the measures)
    against step, log loss axis; phases {label: step} as vertical lines.

    Grokked: the restricted loss falls before the test loss does and ends low; the excluded loss rises above
    ln p as the circuit takes over the train set. Memorising: the restricted loss stays at or above ln p and
    the excluded loss stays near the train loss (the train set is fitted without the key frequencies)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    rows = [r for r in history if r["step"] > 0]
    ax.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], color="tab:blue", label="train loss")
    ax.plot([r["step"] for r in rows], [r["test_loss"] for r in rows], color="tab:red", label="test loss")
    m = [r for r in measure_rows if "restricted_loss" in r]
    ax.plot([r["step"] for r in m], [r["restricted_loss"] for r in m], "o-", ms=3, color="tab:green",
            label="restricted loss (key frequencies only, all pairs)")
    ax.plot([r["step"] for r in m], [r["excluded_loss"] for r in m], "o-", ms=3, color="tab:purple",
            label="excluded loss (key frequencies removed, train pairs)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy)")
    ax.grid(True, which="both", alpha=0.25)
    _phase_lines(ax, phases)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title or "restricted and excluded loss against step")
    return _save(fig, path)


def measures_figure(measure_rows: list[dict], names: dict[str, str], path, title: str = "",
                    phases: dict | None = None) -> Path:
    """One panel per measure against step: ``names`` maps a key of the rows to its panel title.

    Grokked: the sum of squared weights falls, the Gini coefficients and circularity rise, the number of key
    frequencies settles on a few. Memorising: the weights grow or stay, the Gini coefficients stay low and the
    Fourier Frequency Sparsity stays near 1 (every frequency used)."""
    keys = [k for k in names if any(k in r for r in measure_rows)]
    n = max(1, len(keys))
    cols = min(3, n)
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r["step"], r[k]) for r in measure_rows if k in r]
        ax.plot([s for s, _ in pts], [v for _, v in pts], "o-", ms=3)
        ax.set_title(names[k], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(True, alpha=0.25)
        _phase_lines(ax, phases)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title or "progress measures against step")
    fig.tight_layout()
    return _save(fig, path)


def embedding_circles_figure(pca_xy, pca_share, planes: dict, path, title: str = "") -> Path:
    """The number embeddings W_E[x] as points labelled x: on the top two principal components, then on
    each key frequency k's (cos, sin) plane (``planes`` {k: [p, 2]}), where a clock draws a circle.

    Grokked: on each key frequency's plane the numbers lie on a circle in the order w_k x (colours run round
    it). Memorising: a cloud with no order, on the principal components and on any plane."""
    panels = [("top two principal components\n"
               f"({100 * float(pca_share[0]):.0f}% + {100 * float(pca_share[1]):.0f}% of variance)", pca_xy)]
    panels += [(f"frequency k = {k}:\n(cos, sin) plane", xy) for k, xy in planes.items()]
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.4), squeeze=False, gridspec_kw={"wspace": 0.3})
    for ax, (name, xy) in zip(axes[0], panels):
        xy = [[float(v) for v in row] for row in xy]
        p = len(xy)
        sc = ax.scatter([r[0] for r in xy], [r[1] for r in xy], c=range(p), cmap="hsv", s=18)
        for x, (u, v) in enumerate(xy):
            ax.annotate(str(x), (u, v), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_title(name, fontsize=9)
        ax.grid(True, alpha=0.25)
    fig.colorbar(sc, ax=list(axes[0]), label="number x", shrink=0.8)
    fig.suptitle(title or "embedding of the numbers: principal components and key-frequency planes", y=1.04)
    return _save(fig, path)


def neuron_loops_figure(acts, neurons: list[int], colour, path, title: str = "",
                        colour_label: str = "(a + b) mod p") -> Path:
    """A len(neurons) x len(neurons) grid: panel (i, j) scatters neuron i against neuron j over every
    input (acts [n_inputs, len(neurons)]), coloured by ``colour`` [n_inputs]; histograms on the diagonal.

    Grokked: neurons of one frequency trace loops coloured in order of the answer. Memorising: shapeless
    clouds with the colours mixed."""
    import numpy as np

    A = np.asarray(acts, dtype=float)
    n = len(neurons)
    fig, axes = plt.subplots(n, n, figsize=(1.6 * n, 1.6 * n), squeeze=False)
    for i in range(n):
        for j in range(n):
            ax = axes[i, j]
            if i == j:
                ax.hist(A[:, i], bins=30, color="gray")
            else:
                ax.scatter(A[:, j], A[:, i], c=colour, cmap="hsv", s=1, linewidths=0)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == n - 1:
                ax.set_xlabel(f"n{neurons[j]}", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"n{neurons[i]}", fontsize=7)
    fig.suptitle(title or f"pairs of neurons over all inputs, coloured by {colour_label}")
    return _save(fig, path)


def neuron_decomposition_figure(parts: dict, neuron: int, k: int, path, title: str = "") -> Path:
    """One neuron's activation as a heatmap over (a, b) and its 2D Fourier parts at frequency k:
    ``parts`` {"activation", "a", "b", "a*b", "rest"}: [p, p] grids (a the row).

    Grokked: the a, b and a*b parts at the neuron's frequency add up to nearly all of the activation and the
    rest is faint. Memorising: the rest holds most of the activation."""
    import numpy as np

    names = {"activation": "activation", "a": f"cos/sin({k} a) terms", "b": f"cos/sin({k} b) terms",
             "a*b": f"products cos/sin({k} a)\nx cos/sin({k} b)", "rest": "the rest (other frequencies)"}
    keys = [n for n in names if n in parts]
    vmax = max(float(np.abs(np.asarray(parts[n])).max()) for n in keys) or 1.0
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.6), squeeze=False,
                             gridspec_kw={"wspace": 0.35})
    for ax, n in zip(axes[0], keys):
        im = ax.imshow(np.asarray(parts[n]), cmap="RdBu_r", vmin=-vmax, vmax=vmax, origin="lower")
        ax.set_title(names[n], fontsize=9)
        ax.set_xlabel("b")
        ax.set_ylabel("a")
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
    fig.suptitle(title or f"neuron {neuron} over (a, b) and its 2D Fourier decomposition at frequency {k}", y=1.04)
    return _save(fig, path)


def spectrum_figure(norms, labels: list[str], path, title: str = "", key_freqs=()) -> Path:
    """Bar chart of Fourier component norms (one bar per basis row: const, cos 1, sin 1, ...); the
    key frequencies' bars are highlighted.

    Grokked: a few tall bars at the key frequencies, the rest near zero. Memorising: bars of similar height
    at every frequency."""
    import numpy as np

    v = np.asarray(norms, dtype=float)
    keys = {f"cos {k}" for k in key_freqs} | {f"sin {k}" for k in key_freqs}
    colours = ["tab:red" if l in keys else "tab:blue" for l in labels]
    fig, ax = plt.subplots(figsize=(max(8, 0.12 * len(v)), 3.8))
    ax.bar(range(len(v)), v, color=colours)
    step = max(1, len(v) // 40)
    ax.set_xticks(range(0, len(v), step))
    ax.set_xticklabels(labels[::step], rotation=90, fontsize=7)
    ax.set_ylabel("norm")
    ax.set_title(title or "Fourier spectrum (key frequencies in red)")
    return _save(fig, path)


def neuron_clusters_figure(fractions, freq, frac, threshold: float, path, title: str = "") -> Path:
    """Neuron-frequency clusters. Left: each neuron's fraction of variance at each frequency (fractions
    [N, K]), neurons sorted by their frequency (freq [N]) then by how much it explains (frac [N]);
    right: how many neurons each frequency explains to at least ``threshold``.

    Grokked: neurons fall into a few bright clusters, one per key frequency. Memorising: no neuron reaches
    the threshold; the fractions are dim everywhere."""
    import numpy as np

    Fr = np.asarray(fractions, dtype=float)
    f = np.asarray(freq)
    e = np.asarray(frac, dtype=float)
    order = np.lexsort((-e, np.where(e >= threshold, f, Fr.shape[1] + 1)))
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    im = ax0.imshow(Fr[order].T, aspect="auto", cmap="magma", vmin=0, vmax=1, origin="lower",
                    extent=(-0.5, len(order) - 0.5, 0.5, Fr.shape[1] + 0.5))
    ax0.set_xlabel("neuron (sorted by cluster)")
    ax0.set_ylabel("frequency k")
    fig.colorbar(im, ax=ax0, label="fraction of variance")
    counts = np.bincount(f[e >= threshold], minlength=Fr.shape[1] + 1)[1:]
    ax1.barh(np.arange(1, Fr.shape[1] + 1), counts, color="tab:blue")
    ax1.set_xlabel(f"neurons with fraction >= {threshold}")
    ax1.set_ylabel("frequency k")
    ax1.set_ylim(0.5, Fr.shape[1] + 0.5)
    fig.suptitle(title or "neuron-frequency clusters")
    return _save(fig, path)


# ----------------------------------------------------------------------------- looking inside (grokfast.probes)

def probes_figure(probes: list, path, title: str = "") -> Path:
    """Sparse linear probes of the embedding: one panel per probed frequency k and function (cos, sin),
    the probe's output against the number x (a's slot solid, b's dashed) beside the target f(w_k x) (grey),
    with the directions used and R^2 in the legend (probes: grokfast.probes.Probe).

    Grokked: at each key frequency the probe follows the target curve with R^2 near 1 from one or two
    embedding directions (the numbers sit on a circle at that frequency). Memorising (or untrained): no
    frequency is special; even the best few directions give a probe that misses the curve (R^2 well below
    0.9), which is what the panels show for the embedding's strongest frequencies."""
    import numpy as np

    keys = []
    for q in probes:
        if (q.k, q.fn) not in keys:
            keys.append((q.k, q.fn))
    n = max(1, len(keys))
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 2.9 * rows), squeeze=False)
    for ax, (k, fn) in zip(axes.flat, keys):
        sel = [q for q in probes if q.k == k and q.fn == fn]
        x = np.arange(len(sel[0].target))
        ax.plot(x, np.asarray(sel[0].target, dtype=float), color="gray", lw=3, alpha=0.5, label=f"{fn}({k} x) target")
        for q, ls in zip(sel, ("-", "--")):
            ax.plot(x, np.asarray(q.prediction, dtype=float), ls, marker=".", ms=3,
                    label=f"slot {q.slot}: {q.n_dirs} dir{'s' if q.n_dirs != 1 else ''}, R2 {q.r2:.2f}")
        ax.set_title(f"{fn}(w_{k} x) from the embedding", fontsize=9)
        ax.set_xlabel("number x", fontsize=8)
        ax.legend(fontsize=6, loc="upper right")
        ax.grid(True, alpha=0.25)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title or "sparse linear probes of the embedding")
    fig.tight_layout()
    return _save(fig, path)


def neuron_surface_figure(act, components: list, neuron: int, path, title: str = "") -> Path:
    """One neuron's activation over every input (a, b), act [p, p] (a the row): as a 3D surface, as a heat map,
    and a bar chart of its largest 2D Fourier components, named (``components`` [(name, share, coeff)],
    grokfast.probes.surface_components), by share of the neuron's variance.

    Grokked: a smooth periodic surface; a handful of components at one frequency k (cos ka, cos kb,
    cos ka cos kb, sin ka sin kb, ...) hold most of the variance. Memorising (or untrained): a rough surface
    (ReLU of a random sum of a's and b's embedding), its variance spread over many frequencies."""
    import numpy as np

    A = np.asarray(act, dtype=float)
    p = A.shape[0]
    fig = plt.figure(figsize=(15, 4.4))
    ax3 = fig.add_subplot(1, 3, 1, projection="3d")
    aa, bb = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    ax3.plot_surface(bb, aa, A, cmap="viridis", linewidth=0, antialiased=True)
    ax3.set_xlabel("b")
    ax3.set_ylabel("a")
    ax3.set_title("surface", fontsize=9)
    ax = fig.add_subplot(1, 3, 2)
    im = ax.imshow(A, cmap="viridis", origin="lower")
    ax.set_xlabel("b")
    ax.set_ylabel("a")
    ax.set_title("heat map", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    axb = fig.add_subplot(1, 3, 3)
    names = [c[0] for c in components][::-1]
    axb.barh(range(len(names)), [c[1] for c in components][::-1], color="tab:blue")
    axb.set_yticks(range(len(names)), names, fontsize=8)
    axb.set_xlabel("share of the neuron's variance")
    axb.set_title(f"largest 2D Fourier components (together {sum(c[1] for c in components):.0%})", fontsize=9)
    fig.suptitle(title or f"neuron {neuron} over (a, b)")
    fig.tight_layout()
    return _save(fig, path)


def adding_figure(unit, answers_grid, decomposition, path, title: str = "", unit_label: str = "") -> Path:
    """Units that add. Left: one unit over (a, b) (unit [p, p], a the row) with the lines on which the
    answer c(a, b) is constant drawn over it (answers_grid [p, p]). Right (when ``decomposition``, a
    grokfast.probes.AddingDecomposition, is given): the last MLP layer read along frequency k of the answer
    by W_out W_U, its (cos a cos b) part, its (sin a sin b) part, and their sum, which for a grokked x+y
    model is the band pattern of cos(w_k (a + b)).

    Grokked: the unit (a logit, or a later neuron) is constant along every line a + b = c (bands along the
    anti-diagonals), and the two product parts are equal and opposite, so cos a cos b - sin a sin b adds up
    to cos(w (a + b)). Memorising (or untrained): the unit is a patchwork with no bands, and the read-out
    along any frequency has no product parts of note (their sum shows no bands)."""
    import numpy as np

    panels = [("unit" if not unit_label else unit_label, np.asarray(unit, dtype=float))]
    if decomposition is not None:
        d = decomposition
        panels += [(f"cos {d.k}a cos {d.k}b part", np.asarray(d.parts["cos a cos b"])),
                   (f"sin {d.k}a sin {d.k}b part", np.asarray(d.parts["sin a sin b"])),
                   (f"sum (share along cos(w c): {d.target_share:.2f})", np.asarray(d.parts["sum"]))]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.9 * len(panels), 3.8), squeeze=False,
                             gridspec_kw={"wspace": 0.35})
    C = np.asarray(answers_grid)
    for i, (ax, (name, g)) in enumerate(zip(axes[0], panels)):
        v = float(np.abs(g).max()) or 1.0
        ax.imshow(g, cmap="RdBu_r", vmin=-v, vmax=v, origin="lower")
        if i == 0:
            ax.contour(C, levels=np.arange(C.max() + 1) - 0.5, colors="k", linewidths=0.3, alpha=0.4)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("b")
        ax.set_ylabel("a")
    fig.suptitle(title or "units that add", y=1.03)
    return _save(fig, path)


def logit_spectrum_figure(spectrum, labels: list[str], components: list, path, title: str = "") -> Path:
    """The logits' 2D Fourier spectrum over the inputs (spectrum [p, p], the norm over output classes of
    each coefficient of B logits B^T; row: a's component, column: b's), beside its largest components named
    with their shares of the energy (``components``, grokfast.probes.spectrum_components).

    Grokked: a few bright cells at the key frequencies, on the products cos ka cos kb, sin ka sin kb (and
    the mixed ones), which is how cos(w (a + b - c)) looks in this basis; the rest dark. Memorising (or
    untrained): energy spread over many cells, the single-variable rows and columns (const x anything)
    brightest, no frequency singled out."""
    import numpy as np

    g = np.asarray(spectrum, dtype=float).copy()
    g[0, 0] = 0.0
    fig, (ax, axb) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    im = ax.imshow(g, cmap="viridis", origin="upper")
    step = max(1, len(labels) // 20)
    ax.set_xticks(range(0, len(labels), step))
    ax.set_xticklabels(labels[::step], rotation=90, fontsize=6)
    ax.set_yticks(range(0, len(labels), step))
    ax.set_yticklabels(labels[::step], fontsize=6)
    ax.set_xlabel("component of b")
    ax.set_ylabel("component of a")
    fig.colorbar(im, ax=ax, shrink=0.8, label="norm over classes (const x const left out)")
    names = [c[0] for c in components][::-1]
    axb.barh(range(len(names)), [c[1] for c in components][::-1], color="tab:blue")
    axb.set_yticks(range(len(names)), names, fontsize=8)
    axb.set_xlabel("share of the logits' energy")
    axb.set_title(f"largest components (together {sum(c[1] for c in components):.0%})", fontsize=9)
    fig.suptitle(title or "2D Fourier spectrum of the logits")
    fig.tight_layout()
    return _save(fig, path)
