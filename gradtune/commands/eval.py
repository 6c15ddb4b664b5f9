"""``gradtune eval RUN [--data FILE]``: a finished run's metrics on a file, for every run type.

The file is read in the run's training format with training's transforms (standardisation,
label map, tokenizer); without ``--data``, the run's own validation split. The metrics are the
ones training logged: loss, RMSE in target units, accuracy, perplexity; for classification also
precision / recall / F1 (macro, weighted, per class) and the confusion matrix.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from gradtune.jobs.reload import load_run, run_data
from gradtune.loop.evaluation import evaluate, task_metrics
from gradtune.runtime.errors import GradtuneError

HELP = "evaluate a finished run on a labelled file (default: its validation split)"


def setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run's out_dir (or a checkpoint folder inside it)")
    p.add_argument(
        "--data",
        default=None,
        help="a labelled file in the training data's format (default: the run's validation split)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward pass (memory only)")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise GradtuneError(f"eval: --batch-size must be >= 1, got {args.batch_size}")
    r = load_run(args.run)
    data = run_data(r, args.data)
    loss, count, sums = evaluate(
        r.model, r.objective, data, args.batch_size, torch.device("cpu"), contextlib.nullcontext()
    )
    metrics = task_metrics(r.task, r.info, "", loss, count, sums)
    source = args.data or "validation split"
    if "per_class" in metrics:  # classification: the per-class table and the confusion matrix first
        print(class_table(metrics.pop("per_class"), metrics.pop("confusion")))
    print(f"eval {source}: n={len(data)} " + " ".join(f"{k}={v:.6g}" for k, v in metrics.items()))
    return 0


def class_table(per_class: dict[str, dict[str, float]], confusion: list[list[int]]) -> str:
    """scikit-learn's classification report, then the confusion matrix (rows: true class,
    columns: predicted), as plain text."""
    names = list(per_class)
    w = max(16, *(len(n) + 2 for n in names))
    lines = [f"{'class':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for n, m in per_class.items():
        lines.append(f"{n:<{w}}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}{m['support']:>10d}")
    lines.append("")
    corner = "true/predicted"
    lines.append(f"{corner:<{w}}" + "".join(f"{n[:9]:>10}" for n in names))
    lines += [f"{n:<{w}}" + "".join(f"{c:>10d}" for c in row) for n, row in zip(names, confusion)]
    return "\n".join(lines)
