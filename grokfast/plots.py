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
