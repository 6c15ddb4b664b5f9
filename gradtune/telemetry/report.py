"""report.html: one page showing what a run did, to look at rather than read.

Built from the run folder's files alone (metrics.jsonl, summary.json, config.yaml), so it can be
made again for any finished run, old or new. The page is self-contained: charts are PNGs in
base64 data URIs, the CSS is inline and there is no script, so it opens offline, as a CI
artifact or a mail attachment, and looks the same everywhere. ``gradtune compare`` builds its
page from the same pieces (``read_run`` here, ``page``, ``img``, ``table`` in ``html.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from gradtune.runtime.atomic import write_text
from gradtune.runtime.errors import GradtuneError
from gradtune.telemetry.html import charts, esc, flatten, fmt, img, kv_table, page, table
from gradtune.telemetry.plots import Line, lines_png

# Eval-row keys with a chart of their own (or none): everything else is a task metric.
_NOT_METRICS = ("time", "wall", "kind", "step", "epoch", "lr", "loss", "val_loss", "grad_norm", "tokens_per_s", "mfu")
_ADVICE = ("lr_find", "noise_scale")  # summary job keys with advice for the next run
_MAX_TABLE_ROWS = 200  # a run skipping thousands of steps: the first ones tell the story


@dataclass
class Run:
    """A run folder as read back: its log rows (each with ``wall``, seconds since the run began,
    resumes included), summary.json and the resolved config (nested, as config.yaml holds it)."""

    folder: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    config: dict[str, Any]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("kind") == kind]

    @property
    def job(self) -> dict[str, Any]:
        job = self.summary.get("job")
        return job if isinstance(job, dict) else {}

    @property
    def title(self) -> str:
        model, data = self.config.get("model") or "run", self.config.get("data") or ""
        return f"{Path(str(model)).name} on {Path(str(data)).name}" if data else Path(str(model)).name


def number(v: Any) -> Optional[float]:
    """A logged value as a float; non-finite floats are logged as the strings "inf" / "nan"."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill: the rows around it still tell the story
        if isinstance(row, dict):
            rows.append(row)
    # A resumed log's "time" restarts at 0 in the new process: carry the elapsed time over.
    offset = last = 0.0
    for row in rows:
        if row.get("kind") == "resume":
            offset = last
        row["wall"] = last = offset + (number(row.get("time")) or 0.0)
    return rows


def read_run(folder: "Path | str", need_metrics: bool = True) -> Run:
    """The run in ``folder``; GradtuneError (one line) for a folder that is not a finished run."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GradtuneError(f"{folder}: not a folder; give a finished run's out_dir")
    names = ("metrics.jsonl", "summary.json") if need_metrics else ("summary.json",)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise GradtuneError(f"{folder}: not a finished run (no {' or '.join(missing)})")
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GradtuneError(f"{folder / 'summary.json'}: unreadable ({e})") from None
    if not isinstance(summary, dict):
        raise GradtuneError(f"{folder / 'summary.json'}: not a run summary (no JSON object)")
    metrics = folder / "metrics.jsonl"
    rows = _read_rows(metrics) if metrics.is_file() else []
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        config = None  # the curves do not need it; the config table says it is missing
    return Run(folder, rows, summary, config if isinstance(config, dict) else {})


def series(rows: Iterable[dict[str, Any]], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        xv, yv = number(r.get(x)), number(r.get(key))
        if xv is not None and yv is not None:
            xs.append(xv)
            ys.append(yv)
    return xs, ys


# --- the report's sections ---------------------------------------------------------------------
def _card(value: Any, label: str) -> str:
    return f'<div class="card"><b>{esc(fmt(value))}</b><span>{esc(label)}</span></div>'


def _stop(run: Run) -> tuple[str, str, str]:
    s, job = run.summary, run.job
    wall = number(s.get("wall_time_s"))
    cards = [
        _card(s.get("steps"), "steps"),
        _card(s.get("epochs"), "epochs"),
        _card(f"{wall:.3g} s" if wall is not None else None, "wall time"),
        _card(s.get("train_loss"), "train loss"),
        _card(s.get("val_loss"), "validation loss"),
    ]
    metrics = s.get("metrics") if isinstance(s.get("metrics"), dict) else {}
    cards += [
        _card(v, k.replace("_", " "))
        for k, v in metrics.items()
        if k not in _NOT_METRICS and not k.startswith("update_ratio_") and number(v) is not None
    ][:6]
    optimum = number(job.get("closed_form_loss"))
    if optimum is not None:
        cards.append(_card(optimum, "closed-form optimum"))
        if number(s.get("train_loss")) is not None:
            cards.append(_card(number(s.get("train_loss")) - optimum, "gap to the optimum"))
    stop = esc(s.get("stop_reason") or "unknown")
    body = f'<p class="stop">Stopped: {stop}</p><div class="cards">{"".join(cards)}</div>'
    early = job.get("early_stopping")
    if isinstance(early, dict):
        body += f"<p>Early stopping: best step <b>{esc(fmt(early.get('best_step')))}</b></p>{kv_table(early)}"
    resumes = run.of("resume")
    if resumes:
        body += f"<p>Resumed {len(resumes)}× (from step {', '.join(esc(r.get('step')) for r in resumes)}).</p>"
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    if scalars:
        body += f"<details><summary>final metrics ({len(scalars)})</summary>{kv_table(scalars)}</details>"
    return "stop", "Outcome", body


def _classes(run: Run) -> Optional[tuple[str, str, str]]:
    """The final evaluation's per-class precision / recall / F1 and confusion matrix
    (classification runs with validation data)."""
    m = run.summary.get("metrics") if isinstance(run.summary.get("metrics"), dict) else {}
    per, cm = m.get("val_per_class"), m.get("val_confusion")
    if not isinstance(per, dict) or not isinstance(cm, list):
        return None
    names = list(per)
    rows = [[n, *(per[n].get(k) for k in ("precision", "recall", "f1", "support"))] for n in names]
    avg = [
        [f"{a} avg", m.get(f"val_precision_{a}"), m.get(f"val_recall_{a}"), m.get(f"val_f1_{a}"), ""]
        for a in ("macro", "weighted")
    ]
    body = table(("class", "precision", "recall", "F1", "support"), rows + avg)
    body += '<p class="note">Confusion matrix (final evaluation): rows are the true class, columns the predicted.</p>'
    body += table(("true \\ predicted", *names), [[n, *row] for n, row in zip(names, cm)])
    return "classes", "Per-class metrics", body


def _loss(run: Run) -> tuple[str, str, str]:
    evals, steps, job = run.of("eval"), run.of("step"), run.job
    if not evals and not steps:
        return "loss", "Loss", '<p class="note">No losses were logged (the run stopped before its first step).</p>'
    lines = (
        [Line("train loss (each logged step)", *series(steps, "loss"), color="tab:blue", faint=True)] if steps else []
    )
    lines += [
        Line("train loss", *series(evals, "loss"), color="tab:blue"),
        Line("validation loss", *series(evals, "val_loss"), color="tab:orange"),
    ]
    optimum = number(job.get("closed_form_loss"))
    early = job.get("early_stopping")
    best = number(early.get("best_step")) if isinstance(early, dict) else None
    out = [
        img(
            lines_png(
                [ln for ln in lines if ln.xs],
                "loss",
                "optimizer step",
                "loss",
                hline=(optimum, "closed-form optimum") if optimum is not None else None,
                vline=(best, "best step (early stopping)") if best is not None else None,
            ),
            "loss curves",
        )
    ]
    note = ""
    if optimum is not None:
        gap = [Line("train loss − optimum", *series(evals, "loss"), color="tab:blue")]
        gap[0].ys = [y - optimum for y in gap[0].ys]
        if steps:
            xs, ys = series(steps, "loss")
            gap.insert(0, Line("each logged step", xs, [y - optimum for y in ys], color="tab:blue", faint=True))
        out.append(
            img(
                lines_png(gap, "gap to the closed-form optimum", "optimizer step", "loss − optimum (log)", logy=True),
                "gap to the closed-form optimum",
            )
        )
        note = (
            '<p class="note">Linear regression has an exact optimum (least squares): with full batches the '
            "gap falls as a straight line on this log scale (linear convergence); mini-batches level off "
            "at a noise floor set by lr and batch size. Points at or below 0 (optimum reached to float "
            "precision) are not drawn.</p>"
        )
    return "loss", "Loss", charts(*out) + note


def _lr(run: Run) -> Optional[tuple[str, str, str]]:
    rows = sorted(run.of("step") + run.of("eval"), key=lambda r: number(r.get("step")) or 0.0)
    xs, ys = series(rows, "lr")
    if not xs:
        return None
    if min(ys) == max(ys):  # a flat line says less than the number
        return "lr", "Learning rate", f"<p>Constant: <b>{esc(fmt(ys[0]))}</b> at every step.</p>"
    return (
        "lr",
        "Learning rate",
        charts(img(lines_png([Line("lr", xs, ys)], "learning rate", "optimizer step", "lr"), "learning rate")),
    )


def _gradients(run: Run) -> Optional[tuple[str, str, str]]:
    evals = run.of("eval")
    out = []
    xs, ys = series(evals, "grad_norm")
    if xs:
        clip = number(run.config.get("clip_grad_norm"))
        out.append(
            img(
                lines_png(
                    [Line("gradient norm", xs, ys)],
                    "gradient norm (before clipping)",
                    "optimizer step",
                    "‖g‖",
                    hline=(clip, "clip_grad_norm") if clip else None,
                ),
                "gradient norm",
            )
        )
    groups = sorted({k for r in evals for k in r if k.startswith("update_ratio_g")}, key=lambda k: (len(k), k))
    lines = [Line(f"group {k[14:]}", *series(evals, k)) for k in groups]
    if lines:
        out.append(
            img(
                lines_png(
                    lines, "update-to-weight ratio per parameter group", "optimizer step", "‖Δw‖ / ‖w‖", logy=True
                ),
                "update-to-weight ratio",
            )
        )
    if not out:
        return None
    note = (
        (
            '<p class="note">Update-to-weight ratio: how far one step moves a group\'s weights, relative to '
            "their size. Around 1e-3 is the usual rule of thumb; far above, the lr is too large for that "
            "group; far below, the group barely learns.</p>"
        )
        if lines
        else ""
    )
    return "gradients", "Gradients and updates", charts(*out) + note


def _throughput(run: Run) -> Optional[tuple[str, str, str]]:
    evals = run.of("eval")
    out = []
    for key, title, unit in (("tokens_per_s", "throughput", "tokens / s"), ("mfu", "model FLOPs utilisation", "MFU")):
        xs, ys = series(evals, key)
        if xs:
            out.append(img(lines_png([Line(key, xs, ys)], title, "optimizer step", unit, logy=False), title))
    return ("throughput", "Throughput", charts(*out)) if out else None


def _metrics(run: Run) -> Optional[tuple[str, str, str]]:
    evals = run.of("eval")
    keys = [
        k
        for k in dict.fromkeys(k for r in evals for k, v in r.items() if not isinstance(v, (dict, list)))
        if k not in _NOT_METRICS and not k.startswith("update_ratio_")
    ]
    bases = list(dict.fromkeys(k[4:] if k.startswith("val_") else k for k in keys))
    out = []
    for base in bases:
        lines = [
            Line(f"{who} {base}", *series(evals, key), color=color)
            for who, key, color in (("train", base, "tab:blue"), ("validation", f"val_{base}", "tab:orange"))
            if key in keys
        ]
        out.append(img(lines_png(lines, base, "optimizer step", base, logy=False), base))
    return ("metrics", "Task metrics", charts(*out)) if out else None


def _guard(run: Run) -> tuple[str, str, str]:
    rows = run.of("guard")
    if not rows:
        guard = run.config.get("guard")
        off = isinstance(guard, dict) and guard.get("enabled") is False
        said = "The guard was off." if off else "None: every step's loss and gradient passed the guard."
        return "guard", "Guard decisions", f'<p class="note">{said}</p>'
    done_keys = ("rollback_to", "resume_step", "lr_scale", "rollbacks")
    cells: list[list[Any]] = []
    for r in rows:  # the same decision repeated at one step (skips do not advance it): one line
        cell = [
            r.get("step"),
            r.get("epoch"),
            r.get("action"),
            r.get("reason"),
            ", ".join(f"{k}={fmt(r[k])}" for k in done_keys if k in r),
        ]
        if cells and cells[-1][:-1] == cell:
            cells[-1][-1] += 1
        else:
            cells.append(cell + [1])
    more = (
        f'<p class="note">… and {len(cells) - _MAX_TABLE_ROWS} more (metrics.jsonl has them all).</p>'
        if len(cells) > _MAX_TABLE_ROWS
        else ""
    )
    head = ("step", "epoch", "action", "reason", "then", "times")
    return "guard", f"Guard decisions ({len(rows)})", table(head, cells[:_MAX_TABLE_ROWS]) + more


def _advice(run: Run) -> Optional[tuple[str, str, str]]:
    found = [(k, run.job[k]) for k in _ADVICE if run.job.get(k) is not None]
    if not found:
        return None
    body = "".join(
        f"<h3>{esc(k.replace('_', ' '))}</h3>" + (kv_table(v) if isinstance(v, dict) else f"<p>{esc(fmt(v))}</p>")
        for k, v in found
    )
    return "advice", "Advice", body


def _config(run: Run) -> tuple[str, str, str]:
    if not run.config:
        return "config", "Configuration", '<p class="note">config.yaml is missing or unreadable.</p>'
    settings = flatten(run.config)
    facts = {k: v for k, v in run.job.items() if k not in _ADVICE and k != "early_stopping"}
    body = (
        f"<details><summary>resolved config ({len(settings)} settings)</summary>"
        f"{table(('setting', 'value'), settings)}</details>"
    )
    if facts:
        body += f"<details><summary>job facts ({len(facts)})</summary>{kv_table(facts)}</details>"
    return "config", "Configuration", body


def render_report(run: Run) -> str:
    parts = (_stop, _loss, _lr, _gradients, _throughput, _metrics, _classes, _guard, _advice, _config)
    sections = [s for s in (part(run) for part in parts) if s is not None]
    return page(f"gradtune report: {run.title}", str(run.folder.resolve()), sections)


def write_report(out_dir: Path) -> Path:
    """``out_dir/report.html`` from the run folder's files, written atomically."""
    path = Path(out_dir) / "report.html"
    write_text(path, render_report(read_run(out_dir, need_metrics=False)))
    return path
