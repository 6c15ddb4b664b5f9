"""``gradtune eval RUN [--data FILE]``: a finished run's metrics on a file, for every run type.

The file is read in the run's training format with training's transforms (standardisation,
label map, tokenizer); without ``--data``, the run's own validation split. The metrics are the
ones training logged: loss, RMSE in target units, accuracy, perplexity.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from gradtune.jobs import rl
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
    if r.data_task == "rl":  # mean reward of sampled completions (jobs/rl.py)
        found = rl.mean_reward(r.cfg, r.model, r.tokenizer, args.data, args.batch_size)
        print(f"eval {args.data or 'validation split'}: " + " ".join(f"{k}={v:.6g}" for k, v in found.items()))
        return 0
    data = run_data(r, args.data)
    loss, count, sums = evaluate(
        r.model, r.objective, data, args.batch_size, torch.device("cpu"), contextlib.nullcontext()
    )
    metrics = task_metrics(r.task, r.info, "", loss, count, sums)
    source = args.data or "validation split"
    print(f"eval {source}: n={len(data)} " + " ".join(f"{k}={v:.6g}" for k, v in metrics.items()))
    return 0
