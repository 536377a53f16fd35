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


def grokking_figure(history: list[dict], path, title: str = "", phases: dict | None = None) -> Path:
    """The classic grokking figure: train and test accuracy (left) and loss (right) against a log step
    axis. ``phases`` optionally maps a label to a step, drawn as a vertical line on both panels."""
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
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (solid: test, faint: train)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, which="both", alpha=0.25)
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
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, which="both", alpha=0.25)
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
    against step, log loss axis; phases {label: step} as vertical lines."""
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
    """One panel per measure against step: ``names`` maps a key of the rows to its panel title."""
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
    each key frequency k's (cos, sin) plane (``planes`` {k: [p, 2]}), where a clock draws a circle."""
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
    input (acts [n_inputs, len(neurons)]), coloured by ``colour`` [n_inputs]; histograms on the diagonal."""
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
    ``parts`` {"activation", "a", "b", "a*b", "rest"}: [p, p] grids (a the row)."""
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
    key frequencies' bars are highlighted."""
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


def heatmap_figure(grid, labels: list[str], path, title: str = "") -> Path:
    """A [p, p] map over pairs of Fourier basis rows (row: a's component, column: b's), e.g. the 2D
    Fourier spectrum of the logits, with basis labels on both axes."""
    import numpy as np

    g = np.asarray(grid, dtype=float)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(g, cmap="viridis", origin="upper")
    step = max(1, len(labels) // 20)
    ax.set_xticks(range(0, len(labels), step))
    ax.set_xticklabels(labels[::step], rotation=90, fontsize=6)
    ax.set_yticks(range(0, len(labels), step))
    ax.set_yticklabels(labels[::step], fontsize=6)
    ax.set_xlabel("component of b")
    ax.set_ylabel("component of a")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(title or "2D Fourier spectrum")
    return _save(fig, path)


def neuron_clusters_figure(fractions, freq, frac, threshold: float, path, title: str = "") -> Path:
    """Neuron-frequency clusters. Left: each neuron's fraction of variance at each frequency (fractions
    [N, K]), neurons sorted by their frequency (freq [N]) then by how much it explains (frac [N]);
    right: how many neurons each frequency explains to at least ``threshold``."""
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
