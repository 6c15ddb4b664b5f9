"""``gradtune eval RUN [--data FILE]``: a finished run's metrics on a file, for every run type.

The file is read in the run's training format with training's transforms (standardisation,
label map, tokenizer); without ``--data``, the run's own validation split. The metrics are the
ones training logged: loss, RMSE in target units, accuracy, perplexity; for classification also
precision / recall / F1 (macro, weighted, per class) and the confusion matrix; for preference
runs the rewards (accuracy, margin) on held-out pairs.

``--lm-eval TASKS``: a language-model run (GPT or pretrained, LoRA applied) scored by the
lm-eval harness (``models/lm_eval_model.py``).
"""

from __future__ import annotations

import argparse

import torch

from gradtune.jobs import rl
from gradtune.jobs.reload import load_run, run_data, run_task
from gradtune.loop.eval_chunk import choose, probe, room_for_run
from gradtune.loop.evaluation import evaluate, task_metrics
from gradtune.models.lm_eval_model import lm_class, resolve_tasks, run_tasks
from gradtune.runtime.device import autocast
from gradtune.runtime.errors import GradtuneError

LM_BATCH = 64  # prompts per forward for --lm-eval and RL runs' sampling

HELP = "evaluate a finished run on a labelled file (default: its validation split)"


def setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run's out_dir (or a checkpoint folder inside it)")
    p.add_argument(
        "--data",
        default=None,
        help="a labelled file in the training data's format (default: the run's validation split)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="samples per forward pass (memory and speed only; default: the largest chunk within the run's "
        "training peak memory, on a CPU also within its cache)",
    )
    p.add_argument(
        "--lm-eval",
        default=None,
        metavar="TASKS",
        help="score a language-model run on lm-eval harness tasks instead (comma-separated: a task gradtune ships, "
        "e.g. shakespeare_cloze, a task YAML file, or an lm-eval task name whose data is local); needs lm-eval",
    )
    p.add_argument("--limit", type=int, default=None, help="--lm-eval: at most this many documents per task")


def run(args: argparse.Namespace) -> int:
    if args.batch_size is not None and args.batch_size < 1:
        raise GradtuneError(f"eval: --batch-size must be >= 1, got {args.batch_size}")
    if args.lm_eval is not None:
        return benchmark(args)
    if args.limit is not None:
        raise GradtuneError("eval: --limit applies to --lm-eval only")
    r = load_run(args.run, inference_only=True)
    if r.data_task == "rl":  # mean reward of sampled completions (jobs/rl.py)
        found = rl.mean_reward(r.cfg, r.model, r.tokenizer, args.data, args.batch_size or LM_BATCH)
        print(f"eval {args.data or 'validation split'}: " + " ".join(f"{k}={v:.6g}" for k, v in found.items()))
        return 0
    data = run_data(r, args.data)
    cpu = torch.device("cpu")
    # The run's precision (a bf16 run is evaluated under bf16 autocast, as training evaluated it).
    amp = autocast(r.cfg.precision, cpu)
    chunk = args.batch_size or 1
    if args.batch_size is None and len(data):  # the largest chunk within the run's training peak (loop/eval_chunk.py)
        chunk = choose(room_for_run(r.info, cpu), probe(r.model, r.objective, data, cpu, amp), len(data), cpu)
    loss, count, sums = evaluate(r.model, r.objective, data, chunk, cpu, amp)
    metrics = task_metrics(r.task, r.info, "", loss, count, sums)
    source = args.data or "validation split"
    if "per_class" in metrics:  # classification: the per-class table and the confusion matrix first
        print(class_table(metrics.pop("per_class"), metrics.pop("confusion")))
    print(f"eval {source}: n={len(data)} " + " ".join(f"{k}={v:.6g}" for k, v in metrics.items()))
    return 0


def benchmark(args: argparse.Namespace) -> int:
    """``--lm-eval``: the run's causal LM (LoRA applied) through lm-eval's harness; one line per
    task with its metrics. Tasks and the run's type are checked before the model is loaded."""
    if args.limit is not None and args.limit < 1:
        raise GradtuneError(f"eval: --limit must be >= 1, got {args.limit}")
    if args.data is not None:
        raise GradtuneError("eval: --data and --lm-eval do not combine (a task names its own data)")
    tasks = resolve_tasks(args.lm_eval)
    if run_task(args.run) != "lm":
        raise GradtuneError(f"{args.run}: --lm-eval scores causal language models; this run is not one")
    r = load_run(args.run)
    results = run_tasks(lm_class()(r.model, r.tokenizer, args.batch_size or LM_BATCH), tasks, args.limit)
    for task, metrics in results.items():
        shown = {"n": metrics.get("sample_len")} if isinstance(metrics.get("sample_len"), int) else {}
        shown.update(
            (k.split(",")[0], v) for k, v in metrics.items() if "," in k and "stderr" not in k and isinstance(v, float)
        )
        print(f"lm-eval {task}: " + " ".join(f"{k}={v:.6g}" for k, v in shown.items()))
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
