"""Plots at the end of a run: loss curves (train and validation) against the step."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from gradtune.runtime.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed (CI, servers)
    import matplotlib.pyplot as plt

    return plt


def _log_scale(ax: Any, values: Sequence[float]) -> None:
    finite = [v for v in values if v == v and abs(v) != float("inf")]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 50:
        ax.set_yscale("log")


def plot_losses(rows: list[dict[str, Any]], path: Path, title: str = "",
                optimum: Optional[float] = None) -> Path:
    """Train/val loss per evaluation from metrics rows (those with ``kind == 'eval'``)."""
    plt = _pyplot()
    evals = [r for r in rows if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    steps = [r["step"] for r in evals]
    train = [float(r["loss"]) for r in evals]
    ax.plot(steps, train, label="train loss")
    val = [float(r["val_loss"]) for r in evals if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in evals if "val_loss" in r], val, label="validation loss")
    if optimum is not None:
        ax.axhline(optimum, color="k", ls=":", lw=1, label="closed-form optimum")
    _log_scale(ax, train + val)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def plot_curves(curves: dict[str, tuple[list[float], list[float]]], path: Path, title: str,
                xlabel: str = "epoch", ylabel: str = "train loss", logx: bool = False) -> Path:
    """Several named (x, y) curves on one axis: the demo's comparisons and lr-find."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    everything: list[float] = []
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=name)
        everything += ys
    _log_scale(ax, everything)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
