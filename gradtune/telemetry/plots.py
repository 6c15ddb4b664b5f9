"""Plots at the end of a run: loss curves (train and validation) against the step, and the
charts of report.html / compare.html (``lines_png``: PNG bytes, embedded in the page)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from gradtune.runtime import collector
from gradtune.runtime.atomic import atomic_path


@collector.paused()  # matplotlib's import: loaded, never garbage
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed (CI, servers)
    import matplotlib.pyplot as plt

    return plt


def _margins(fig: Any) -> None:
    """Fixed margins in inches (tick labels, axis labels, title) for a one-axes chart. A tight
    layout measures every tick label by drawing the figure once more before saving it: half of a
    chart's time, and a run's report draws half a dozen charts."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.85 / width, right=1 - 0.2 / width, bottom=0.55 / height, top=1 - 0.35 / height)


def _log_scale(ax: Any, values: Sequence[float]) -> None:
    finite = [v for v in values if v == v and abs(v) != float("inf")]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 50:
        ax.set_yscale("log")


def plot_losses(rows: list[dict[str, Any]], path: Path, title: str = "", optimum: Optional[float] = None) -> Path:
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
    _margins(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def plot_curves(
    curves: dict[str, tuple[list[float], list[float]]],
    path: Path,
    title: str,
    xlabel: str = "epoch",
    ylabel: str = "train loss",
    logx: bool = False,
    logy: Optional[bool] = None,
    marks: Sequence[tuple[float, str]] = (),
    faint: Sequence[str] = (),
    ylim: Optional[tuple[float, float]] = None,
) -> Path:
    """Several named (x, y) curves on one axis: the demo's comparisons and lr-find. ``logy``
    None: log scale when the values span more than 50x. ``marks``: (x, label) vertical lines (the
    lr-find suggestion, the divergence point), each labelled with its value in the legend.
    ``faint``: names of curves drawn thin and light (a noisy raw series under its smoothing).
    ``ylim``: the y range shown (a diverging tail would otherwise flatten the rest)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    everything: list[float] = []
    for name, (xs, ys) in curves.items():
        thin = name in faint
        ax.plot(xs, ys, label=name, lw=0.8 if thin else 1.6, alpha=0.4 if thin else 1.0)
        everything += ys
    styles = [("tab:green", "--"), ("tab:red", ":"), ("tab:purple", "-.")]
    for i, (x, label) in enumerate(marks):
        if x is not None and math.isfinite(x):
            color, ls = styles[i % len(styles)]
            ax.axvline(x, color=color, ls=ls, lw=1.4, label=f"{label} {x:.3g}")
    if logy is None:
        _log_scale(ax, everything)
    elif logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    if ylim is not None and all(math.isfinite(v) for v in ylim) and ylim[0] < ylim[1]:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _margins(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


@dataclass
class Line:
    """One curve of a report chart. ``label`` "" keeps it out of the legend (a run's validation
    curve shares its run's colour and name); ``faint`` draws a noisy per-step series thin and
    light so the evaluation curve stays readable on top of it."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: Optional[str] = None
    dashed: bool = False
    faint: bool = False


def _clean(ys: Sequence[float], log: bool) -> list[float]:
    """NaN where a point cannot be drawn (non-finite, or <= 0 on a log axis): the line breaks
    there instead of matplotlib stretching the axis to infinity."""
    nan = float("nan")
    return [y if math.isfinite(y) and (y > 0 or not log) else nan for y in map(float, ys)]


def _wants_log(lines: Sequence[Line], logy: Optional[bool]) -> bool:
    if logy is not None:
        return logy
    finite = [y for ln in lines for y in _clean(ln.ys, False) if y == y]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 50


def lines_png(
    lines: Sequence[Line],
    title: str,
    xlabel: str,
    ylabel: str,
    logy: Optional[bool] = None,
    logx: bool = False,
    hline: Optional[tuple[float, str]] = None,
    vline: Optional[tuple[float, str]] = None,
    style_key: bool = False,
    size: tuple[float, float] = (6.4, 3.4),
) -> bytes:
    """A chart of ``lines`` as PNG bytes, for embedding in a page. ``logy`` None: log scale when
    the values are positive and span more than 50x (a loss falling by decades reads as a line).
    ``hline``/``vline``: (position, legend label), a reference level or step. ``style_key`` adds
    legend entries saying solid = train, dashed = validation (runs overlaid by colour)."""
    plt = _pyplot()
    log = _wants_log(lines, logy)
    fig, ax = plt.subplots(figsize=size, dpi=96)
    for ln in lines:
        # A million logged steps draw no better than a few thousand, only slower: keep every k-th.
        k = max(1, math.ceil(len(ln.ys) / 4000))
        xs, ys = list(ln.xs)[::k], _clean(ln.ys, log)[::k]
        # Markers on sparse curves: a lone finite evaluation (next to an inf) draws no line at all.
        sparse = not ln.faint and len(ys) <= 25
        ax.plot(
            xs,
            ys,
            label=ln.label or "_nolegend_",
            color=ln.color,
            ls="--" if ln.dashed else "-",
            lw=0.7 if ln.faint else 1.6,
            alpha=0.45 if ln.faint else 1.0,
            marker="o" if sparse else None,
            ms=3,
        )
    if hline is not None and math.isfinite(hline[0]) and (hline[0] > 0 or not log):
        ax.axhline(hline[0], color="k", ls=":", lw=1, label=hline[1])
    if vline is not None:
        ax.axvline(vline[0], color="tab:green", ls="-.", lw=1, label=vline[1])
    if style_key:
        ax.plot([], [], color="gray", ls="-", label="train")
        ax.plot([], [], color="gray", ls="--", label="validation")
    if log:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both" if log else "major")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    _margins(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


@dataclass
class PathPanel:
    """One panel of ``plot_paths``: the loss over a grid of two parameters and the paths of
    optimizers through it. ``z`` (len(ys), len(xs)) is the loss at (xs[j], ys[i]); ``paths`` maps
    a name to the (w1, w2) points it visited, the start first."""

    title: str
    xs: Sequence[float]
    ys: Sequence[float]
    z: Sequence[Sequence[float]]
    levels: Sequence[float]  # increasing loss values of the contour lines
    paths: dict[str, tuple[Sequence[float], Sequence[float]]]
    optimum: tuple[float, float]
    labels: tuple[str, str] = ("w1", "w2")


def plot_paths(panels: Sequence[PathPanel], path: Path, title: str) -> Path:
    """Loss contours with optimizer paths in parameter space, one panel per comparison. Points
    outside the grid (a diverging path) are clipped at its edge by the axis limits."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 5.0), dpi=110, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        ax.contour(panel.xs, panel.ys, panel.z, levels=list(panel.levels), colors="0.6", linewidths=0.7)
        for name, (w1, w2) in panel.paths.items():
            many = len(w1) > 60  # stochastic paths: thin lines, no markers
            ax.plot(w1, w2, lw=0.8 if many else 1.4, marker=None if many else "o", ms=2.5, label=name)
        ax.plot(*panel.optimum, marker="*", color="k", ms=12, ls="none", label="optimum")
        ax.set_xlim(min(panel.xs), max(panel.xs))
        ax.set_ylim(min(panel.ys), max(panel.ys))
        ax.set_xlabel(panel.labels[0])
        ax.set_ylabel(panel.labels[1])
        ax.set_title(panel.title, fontsize=10)
        ax.set_aspect("equal")
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()  # panels of equal aspect under a suptitle: fixed margins do not fit; one figure a demo
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
