"""``gradtune compare RUN RUN ... [--out compare.html]``: finished runs overlaid on one page.

Loss (solid) and validation loss (dashed) against optimizer steps, against the samples or
tokens seen and against wall time, one colour per run, plus a table of each run's final
metrics and why it stopped. Steps alone mislead across batch sizes (a step of 256 samples is
not a step of 16), wall time across machines; the three views together tell which setting
learns fastest per unit of what you pay. The page is self-contained like report.html.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Optional

from gradtune.runtime import outfile
from gradtune.runtime.errors import GradtuneError
from gradtune.telemetry.html import esc, fmt, img, page, table
from gradtune.telemetry.plots import Line, lines_png
from gradtune.telemetry.report import Run, number, read_run, series

HELP = "overlay finished runs' loss curves on one page (compare.html)"

# matplotlib's tab10, named in hex so the table's swatches are the curves' colours exactly
_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
_HTML = (".html", ".htm")


def setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="finished runs' out_dirs (metrics.jsonl and summary.json)")
    p.add_argument("--out", default="compare.html", help="the page to write (default: ./compare.html)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file gradtune did not write")


def run_names(folders: list[Path]) -> list[str]:
    """The shortest path tails that tell the runs apart (``lr0.1/run`` vs ``lr0.01/run``)."""
    parts = [f.resolve().parts for f in folders]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{'/'.join(p[-1:])} #{i + 1}" for i, p in enumerate(parts)]  # one folder given twice


def _check_out(out: Path, runs: list[Run], overwrite: bool = False) -> Path:
    """Refuse a page that would land inside a run (its folder holds what the run wrote, nothing
    else), replace a file that is not a web page, or a file of the user's (runtime/outfile.py)."""
    target = Path(os.path.abspath(out.expanduser())).resolve()
    for r in runs:
        folder = r.folder.resolve()
        if target == folder or folder in target.parents:
            raise GradtuneError(f"compare: --out {out} is inside the run {r.folder}; write the page elsewhere")
    if target.is_dir():
        raise GradtuneError(f"compare: --out {out} is a folder; give a file name ending in .html")
    if target.exists() and target.suffix.lower() not in _HTML:
        raise GradtuneError(f"compare: --out {out} exists and is not an HTML file; choose another name")
    return outfile.check(out, overwrite, "compare: --out")


def _seen(run: Run) -> Optional[tuple[str, float]]:
    """(unit, size of one epoch in it): what "seen" means for this run, if its summary says."""
    for key, unit in (("n_train_tokens", "tokens"), ("n_train", "samples")):
        n = number(run.job.get(key))
        if n:
            return unit, n
    return None


def _overlay(runs: list[Run], names: list[str], x: str, xlabel: str, scale: Optional[list[float]] = None) -> bytes:
    """Train (solid) and validation (dashed) loss of every run against eval-row key ``x``, times
    ``scale[i]`` for run i (epochs -> samples)."""
    lines = []
    for i, (r, name) in enumerate(zip(runs, names)):
        colour, k = _COLOURS[i % len(_COLOURS)], scale[i] if scale else 1.0
        evals = r.of("eval")
        for key, label, dashed in (("loss", name, False), ("val_loss", "", True)):
            xs, ys = series(evals, key, x)
            lines.append(Line(label, [v * k for v in xs], ys, color=colour, dashed=dashed))
    return lines_png(
        [ln for ln in lines if ln.xs], f"loss vs {xlabel}", xlabel, "loss", style_key=True, size=(9.6, 4.6)
    )


def _curves(runs: list[Run], names: list[str]) -> str:
    out = [img(_overlay(runs, names, "step", "optimizer steps"), "loss vs optimizer steps")]
    seen = [_seen(r) for r in runs]
    units = {s[0] for s in seen if s is not None}
    if None not in seen and len(units) == 1:
        unit = units.pop()
        out.append(
            img(_overlay(runs, names, "epoch", f"{unit} seen", [s[1] for s in seen if s]), f"loss vs {unit} seen")
        )
        note = ""
    else:
        lacking = [n for n, s in zip(names, seen) if s is None]
        why = (
            f"no n_train / n_train_tokens in the summary of {', '.join(lacking)}"
            if lacking
            else "the runs count samples and tokens"
        )
        note = f'<p class="note">No samples/tokens-seen view: {esc(why)}; steps above stand in for it.</p>'
    out.append(img(_overlay(runs, names, "wall", "wall time (s)"), "loss vs wall time"))
    return f'<div class="charts wide">{"".join(out)}</div>{note}'


def _table(runs: list[Run], names: list[str]) -> str:
    """One column per run, one row per fact: metrics differ between tasks, so a row per run
    would grow wider than the page with every task added."""
    metrics = [r.summary.get("metrics") if isinstance(r.summary.get("metrics"), dict) else {} for r in runs]
    keys = list(
        dict.fromkeys(
            k for m in metrics for k in m if k not in ("loss", "val_loss") and not k.startswith("update_ratio_")
        )
    )
    facts: list[tuple[str, list[Any]]] = [
        (label, [r.summary.get(key) for r in runs])
        for label, key in (
            ("steps", "steps"),
            ("epochs", "epochs"),
            ("train loss (last evaluation)", "train_loss"),
            ("validation loss", "val_loss"),
        )
    ]
    facts += [(k.replace("_", " "), [m.get(k) for m in metrics]) for k in keys]
    facts += [
        ("wall time (s)", [r.summary.get("wall_time_s") for r in runs]),
        ("stop reason", [r.summary.get("stop_reason") for r in runs]),
    ]
    head = [
        f'<span class="swatch" style="background:{_COLOURS[i % len(_COLOURS)]}"></span>{esc(n)}'
        for i, n in enumerate(names)
    ]
    rows = [[esc(label)] + [esc(fmt(v)) if v is not None else "—" for v in values] for label, values in facts]
    return f'<div class="scroll">{table(["", *head], rows, raw=True)}</div>'


def render_compare(runs: list[Run], names: list[str]) -> str:
    sections = [("curves", "Loss curves", _curves(runs, names)), ("runs", "Runs", _table(runs, names))]
    return page(f"gradtune compare: {len(runs)} runs", " · ".join(names), sections)


def run(args: argparse.Namespace) -> int:
    runs = [read_run(folder) for folder in args.runs]
    out = _check_out(Path(args.out), runs, args.overwrite)
    names = run_names([r.folder for r in runs])
    outfile.write(out, render_compare(runs, names))
    print(f"compare: {len(runs)} runs -> {out}")
    return 0
