"""The diagnostics' figures, from the plain data the other modules return.

* `plot_shock_curves`: loss (top), training / held-out accuracy (middle) and the
  share of trace tokens still below their θ0 confidence (bottom) per step, the
  bottleneck marked.
* `plot_transfer`: one signed heatmap per loss-transfer matrix (blue: training on
  the row's group lowered the column's loss; red: raised it).
* `plot_gradients`: the gradient-norm ratio (log scale) and the cosine per checkpoint.
* `plot_roc`: the ROC curve of each static signal against the token set.

matplotlib runs with the Agg backend (no display needed).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
from .._util import pyplot

__all__ = ["plot_shock_curves", "plot_transfer", "plot_gradients", "plot_roc"]


def _xy(series: Mapping[int, float]):
    steps = sorted(series)
    return steps, [series[s] for s in steps]


def plot_shock_curves(path, curves: Mapping[str, Any], below: Optional[Mapping[str, Any]] = None,
                      *, title: str = "Pilot SFT: loss, accuracy, tokens below θ0") -> None:
    """curves: `t3s.analysis.shock.shock_curves`' result; below: `below_initial`'s."""
    plt = pyplot()
    rows = 3 if below is not None else 2
    fig, axes = plt.subplots(rows, 1, figsize=(7, 2.4 * rows), sharex=True)
    b = curves.get("bottleneck_step")
    axes[0].plot(*_xy(curves["loss"]), color="#444444", lw=1.2)
    axes[0].set_ylabel("training loss")
    for key, color, label in (("train_acc", "#d62728", "training accuracy"),
                              ("heldout_acc", "#1f77b4", "held-out accuracy")):
        if curves.get(key):
            axes[1].plot(*_xy(curves[key]), marker="o", ms=3, color=color, label=label)
    axes[1].set_ylabel("accuracy")
    axes[1].set_ylim(-0.03, 1.03)
    axes[1].legend(loc="best", fontsize=8)
    if below is not None:
        axes[2].plot(below["step"], 100 * np.asarray(below["fraction_below"]), color="#2a9d8f",
                     label="of the tokens visited so far")
        axes[2].plot(below["step"], 100 * np.asarray(below["fraction_below_all"]), color="#2a9d8f",
                     ls="--", label="of all trace tokens")
        axes[2].set_ylabel("% below θ0\nconfidence")
        axes[2].set_ylim(-2, 102)
        axes[2].legend(loc="best", fontsize=8)
    for ax in axes:
        if b is not None:
            ax.axvline(b, color="#999999", ls=":", lw=1)
        ax.grid(alpha=0.3)
    if b is not None:
        axes[0].annotate(f"bottleneck (step {b})", (b, 1), xycoords=("data", "axes fraction"),
                         xytext=(3, -12), textcoords="offset points", fontsize=8)
    axes[-1].set_xlabel("step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_transfer(path, matrices: Mapping[str, Mapping[str, Any]]) -> None:
    """matrices: checkpoint label -> `t3s.analysis.transfer.transfer_matrix`'s result."""
    plt = pyplot()
    n = len(matrices)
    if n == 0:
        raise ValueError("no matrix to plot")
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 0.6, 3.4), squeeze=False)
    for ax, (label, res) in zip(axes[0], matrices.items()):
        m = np.asarray(res["matrix"], dtype=np.float64)
        lim = float(np.nanmax(np.abs(m))) or 1.0
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
        names = res["names"]
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_yticks(range(len(names)), [f"train on {x}" for x in names], fontsize=8)
        ax.set_xlabel("loss change of", fontsize=8)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                dark = abs(m[i, j]) > 0.6 * lim
                ax.text(j, i, f"{m[i, j]:+.3g}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
        ax.set_title(f"{label}\n{res['steps']} SGD step(s), lr {res['lr']:.3g}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gradients(path, series: Mapping[str, Mapping[str, Sequence[float]]], *,
                   names: Sequence[str] = ("anchors", "rest"),
                   marks: Optional[Mapping[str, float]] = None) -> None:
    """series: label -> {"step", "ratio", "cosine"} (lists per checkpoint); marks: label ->
    step to mark (e.g. the bottleneck)."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(7, 4.6), sharex=True)
    colors = ("#e76f51", "#1f77b4", "#7f7f7f", "#2a9d8f")
    for (label, s), color in zip(series.items(), colors):
        a1.plot(s["step"], s["ratio"], marker="o", ms=4, color=color, label=label)
        a2.plot(s["step"], s["cosine"], marker="o", ms=4, color=color, label=label)
    a1.set_yscale("log")
    a1.axhline(1.0, color="#999999", lw=0.8)
    a1.set_ylabel(f"‖∇L {names[0]}‖ / ‖∇L {names[1]}‖", fontsize=8)
    a1.legend(loc="best", fontsize=8)
    a2.axhline(0.0, color="#999999", lw=0.8)
    a2.set_ylim(-1.05, 1.05)
    a2.set_ylabel(f"cos(∇L {names[0]}, ∇L {names[1]})", fontsize=8)
    a2.set_xlabel("step")
    for label, step in (marks or {}).items():
        for ax in (a1, a2):
            ax.axvline(step, color="#999999", ls=":", lw=1)
        a1.annotate(label, (step, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8)
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(path, curves: Mapping[str, Any], aucs: Mapping[str, float], *,
             title: str = "Static signals at θ0 vs the anchor set") -> None:
    """curves: signal -> (fpr, tpr); aucs: signal -> AUC."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], color="#999999", ls=":", lw=1)
    for name, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUC {aucs[name]:.3f})")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
