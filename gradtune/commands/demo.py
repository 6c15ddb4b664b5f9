"""The main job: the classic gradient-descent tutorial, made real on the embedded diabetes data.

Linear regression and the 10-5-1 MLP, each with batch, stochastic and mini-batch GD; then linear
regression with a too-small, a good and a too-large learning rate. Prints one table and writes
the plots. The target is standardised too, so a loss of 0.48 reads as "explains 52% of the
variance" and every row is comparable; linear rows show their gap to the closed-form optimum.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path

import torch

from gradtune.config import load_config
from gradtune.jobs.registry import build
from gradtune.loop.evaluation import evaluate
from gradtune.loop.fit import fit
from gradtune.outputs import save_outputs
from gradtune.runtime import outdir
from gradtune.telemetry.plots import plot_curves

HELP = "the classic tutorial on the embedded diabetes data (under a minute)"

COMMON = ["data=diabetes", "standardize_target=true", "progress=off", "plot=true", "device=cpu"]

# (name, model, variant, lr, extra settings). Good rates come from `gradtune lr-find`; the
# too-large one is past 2 / lambda_max of the loss Hessian (about 0.25 here), so it diverges.
EXPERIMENTS = [
    ("linear-batch", "linear", "full", 0.2, ["epochs=3000", "tol=1e-9", "patience=20"]),
    ("linear-sgd", "linear", "1", 0.02, ["epochs=10", "schedule=linear"]),
    ("linear-minibatch", "linear", "32", 0.05, ["epochs=200", "schedule=linear"]),
    ("mlp-batch", "mlp", "full", 0.1, ["epochs=1500", "tol=1e-7", "patience=20"]),
    ("mlp-sgd", "mlp", "1", 0.01, ["epochs=10"]),
    ("mlp-minibatch", "mlp", "32", 0.01, ["epochs=150"]),
    ("lr-too-small", "linear", "full", 0.001, ["epochs=300"]),
    ("lr-good", "linear", "full", 0.2, ["epochs=300"]),
    ("lr-too-large", "linear", "full", 0.3, ["epochs=300"]),
]

PLOTS = ("variants-linear.png", "variants-mlp.png", "learning-rates.png")

VARIANT_NAMES = {"full": "batch GD", "1": "stochastic GD", "32": "mini-batch GD (32)"}


def _row(name: str, variant: str, lr: float, r, train_loss: float, optimum) -> list[str]:
    gap = "" if optimum is None or not math.isfinite(train_loss) else f"{(train_loss - optimum) / optimum:.2e}"
    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if math.isfinite(v) and abs(v) < 1e4 else f"{v:.3g}")  # noqa: E731
    return [name, VARIANT_NAMES[variant], f"{lr:g}", f"{r.epochs:g}", fmt(train_loss), fmt(r.val_loss), gap,
            f"{r.wall_time:.2f}s", r.stop_reason]


def _print_table(rows: list[list[str]]) -> None:
    head = ["experiment", "variant", "lr", "epochs", "train loss*", "val loss", "gap to optimum", "time", "stopped because"]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    print(line(head))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))


def run_demo(out_dir: str = "runs/demo") -> list[list[str]]:
    base = Path(out_dir)
    # The demo owns its folder (the plots) and one run folder per experiment: every one is
    # checked before the first experiment runs, so a refusal never comes halfway through.
    names = [e[0] for e in EXPERIMENTS]
    for name in names:
        outdir.check(base / name)
    outdir.claim(base, files=PLOTS, folders=names)
    rows, curves = [], {}
    t0 = time.perf_counter()
    for name, model, variant, lr, extra in EXPERIMENTS:
        cfg = load_config(None, COMMON + [f"model={model}", f"batch_size={variant}", f"lr={lr}",
                                          f"out_dir={base / name}"] + extra)
        job = build(cfg)
        r = fit(job, cfg, Path(cfg.out_dir))
        save_outputs(job, cfg, r, Path(cfg.out_dir))
        # The exact loss of the final weights on the whole training set (for SGD the logged
        # epoch loss is a running mean over weights that kept changing).
        exact, _, _ = evaluate(job.model, job.objective, job.train, 4096, torch.device("cpu"), contextlib.nullcontext())
        rows.append(_row(name, variant, lr, r, exact, job.info.get("closed_form_loss")))
        evals = [h for h in r.history if h.get("kind") == "eval"]
        curves[name] = ([h["epoch"] for h in evals], [float(h["loss"]) for h in evals])
    _print_table(rows)
    print("* exact loss of the final weights on the training set (standardised target: 1 - R^2)")
    groups = {PLOTS[0]: ("Linear regression: batch vs stochastic vs mini-batch GD",
                                      ["linear-batch", "linear-sgd", "linear-minibatch"]),
              PLOTS[1]: ("MLP 10-5-1: batch vs stochastic vs mini-batch GD",
                                   ["mlp-batch", "mlp-sgd", "mlp-minibatch"]),
              PLOTS[2]: ("Linear regression, batch GD: learning rate too small / good / too large",
                                     ["lr-too-small", "lr-good", "lr-too-large"])}
    lrs = {name: lr for name, _, _, lr, _ in EXPERIMENTS}
    for file, (title, names) in groups.items():
        plot_curves({f"{n} (lr {lrs[n]:g})": curves[n] for n in names}, base / file, title)
    print(f"\nplots: {', '.join(str(base / f) for f in groups)}; per-run outputs under {base}/<experiment>/")
    print(f"total time {time.perf_counter() - t0:.1f}s")
    return rows


def setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", default="runs/demo")


def run(args: argparse.Namespace) -> int:
    run_demo(args.out_dir)
    return 0
