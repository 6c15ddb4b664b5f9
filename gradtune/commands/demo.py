"""The main job: the classic gradient-descent tutorial, made real on the embedded diabetes data.

Linear regression and the 10-5-1 MLP, each with batch, stochastic and mini-batch GD; then linear
regression with a too-small, a good, the curvature's own (``lr: auto``, with and without
Nesterov's ``momentum: auto``) and a too-large learning rate. Prints one table and writes the
plots; ``paths.png`` draws the paths of the variants through the loss surface of a two-feature
model. The target is standardised too, so a loss of 0.48 reads as "explains 52% of the
variance" and every row is comparable; linear rows show their gap to the closed-form optimum.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch

from gradtune.config import load_config
from gradtune.data.sampler import Sampler
from gradtune.jobs import curvature
from gradtune.jobs.registry import build
from gradtune.loop.callbacks import Callback
from gradtune.loop.evaluation import evaluate
from gradtune.loop.fit import fit
from gradtune.models.linear import Linear, closed_form
from gradtune.optim import SGD
from gradtune.outputs import save_outputs
from gradtune.runtime import outdir
from gradtune.telemetry.plots import PathPanel, plot_curves, plot_paths
from gradtune.train import resolve_auto

HELP = "the classic tutorial on the embedded diabetes data (under a minute)"

COMMON = ["data=diabetes", "standardize_target=true", "progress=off", "plot=true", "device=cpu"]

# (name, model, variant, lr, extra settings). Good rates come from `gradtune lr-find`; the
# too-large one is past 2/L, L the largest curvature of the loss (2/L ~ 0.245 here), so it
# diverges; `lr: auto` computes L and takes min(2/(mu+L), 1.9/L) (jobs/curvature.py).
EXPERIMENTS: list[tuple[str, str, str, Any, list[str]]] = [
    ("linear-batch", "linear", "full", 0.2, ["epochs=3000", "tol=1e-9", "patience=20"]),
    ("linear-sgd", "linear", "1", 0.02, ["epochs=10", "schedule=linear", "eval_every=50"]),
    ("linear-minibatch", "linear", "32", 0.05, ["epochs=200", "schedule=linear"]),
    ("mlp-batch", "mlp", "full", 0.1, ["epochs=1500", "tol=1e-7", "patience=20"]),
    ("mlp-sgd", "mlp", "1", 0.01, ["epochs=10", "eval_every=50"]),
    ("mlp-minibatch", "mlp", "32", 0.01, ["epochs=150"]),
    ("lr-too-small", "linear", "full", 0.001, ["epochs=300"]),
    ("lr-good", "linear", "full", 0.2, ["epochs=300"]),
    ("lr-auto", "linear", "full", "auto", ["epochs=300"]),
    ("lr-auto-nesterov", "linear", "full", "auto", ["epochs=300", "momentum=auto"]),
    ("lr-too-large", "linear", "full", 0.3, ["epochs=300"]),
]

PLOTS = ("variants-linear.png", "variants-mlp.png", "learning-rates.png", "paths.png")

VARIANT_NAMES = {"full": "batch GD", "1": "stochastic GD", "32": "mini-batch GD (32)"}

# Two features of the 10 for the picture: the two most predictive of disease progression.
PATH_FEATURES = ("bmi", "s5")


class ExactLoss(Callback):
    """The exact training loss of the current weights at every evaluation, (epoch, loss): for
    SGD the logged loss is a running mean over weights that kept changing, which can even sit
    below the optimum; the gap to the optimum needs the loss of the weights themselves."""

    def __init__(self, job) -> None:
        self.job, self.points = job, []

    def on_evaluate(self, step: int, metrics: dict[str, Any]) -> None:
        loss, _, _ = evaluate(
            self.job.model, self.job.objective, self.job.train, 4096, torch.device("cpu"), contextlib.nullcontext()
        )
        self.points.append((metrics["epoch"], loss))


def _row(name: str, variant: str, lr: float, r, train_loss: float, optimum) -> list[str]:
    gap = "" if optimum is None or not math.isfinite(train_loss) else f"{(train_loss - optimum) / optimum:.2e}"
    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if math.isfinite(v) and abs(v) < 1e4 else f"{v:.3g}")  # noqa: E731
    return [
        name,
        VARIANT_NAMES[variant],
        f"{lr:.3g}",
        f"{r.epochs:g}",
        fmt(train_loss),
        fmt(r.val_loss),
        gap,
        f"{r.wall_time:.2f}s",
        r.stop_reason,
    ]


def _print_table(rows: list[list[str]]) -> None:
    head = [
        "experiment",
        "variant",
        "lr",
        "epochs",
        "train loss*",
        "val loss",
        "gap to optimum",
        "time",
        "stopped because",
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    print(line(head))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))


def _experiment(base: Path, name: str, model: str, variant: str, lr: Any, extra: list[str]):
    """One run: (table row, exact-loss curve (epochs, losses), closed-form optimum or None)."""
    cfg = load_config(
        None, COMMON + [f"model={model}", f"batch_size={variant}", f"lr={lr}", f"out_dir={base / name}"] + extra
    )
    job = build(cfg)
    cfg = resolve_auto(job, cfg)  # lr: auto -> the number, as `gradtune train` does
    exact = ExactLoss(job)
    r = fit(job, cfg, Path(cfg.out_dir), callbacks=[exact])
    save_outputs(job, cfg, r, Path(cfg.out_dir))
    final = exact.points[-1][1] if exact.points else math.nan
    optimum = job.info.get("closed_form_loss")
    curve = ([e for e, _ in exact.points], [loss for _, loss in exact.points])
    return _row(name, variant, cfg.lr, r, final, optimum), curve, optimum, cfg.lr


def _gap_curve(curve: tuple[list[float], list[float]], optimum: float) -> tuple[list[float], list[float]]:
    """loss - optimum, with the points at or under round-off (<= 1e-15) dropped: a log axis
    cannot show them, and the gap there is exactly 'converged'."""
    pts = [(e, v - optimum) for e, v in zip(*curve) if math.isfinite(v) and v - optimum > 1e-15]
    return [e for e, _ in pts], [g for _, g in pts]


def _plots(base: Path, curves: dict, optima: dict, lrs: dict) -> None:
    groups = {
        PLOTS[0]: (
            "Linear regression: batch vs stochastic vs mini-batch GD",
            ["linear-batch", "linear-sgd", "linear-minibatch"],
        ),
        PLOTS[2]: (
            "Linear regression, batch GD: learning rate too small / good / auto / too large",
            ["lr-too-small", "lr-good", "lr-auto", "lr-auto-nesterov", "lr-too-large"],
        ),
    }
    for file, (title, names) in groups.items():
        plot_curves(
            {f"{n} (lr {lrs[n]:.3g})": _gap_curve(curves[n], optima[n]) for n in names},
            base / file,
            title,
            xlabel="epoch",
            ylabel="training loss - closed-form optimum",
            logx=True,
            logy=True,
        )
    # The MLP's optimum is not known (non-convex): its exact training loss, with the linear
    # model's optimum as the line to beat.
    names = ["mlp-batch", "mlp-sgd", "mlp-minibatch"]
    curves_mlp = {f"{n} (lr {lrs[n]:.3g})": curves[n] for n in names}
    best_linear = optima["linear-batch"]
    curves_mlp["linear regression's optimum"] = (
        [min(min(c[0]) for c in curves_mlp.values()), max(max(c[0]) for c in curves_mlp.values())],
        [best_linear] * 2,
    )
    plot_curves(
        curves_mlp,
        base / PLOTS[1],
        "MLP 10-5-1: batch vs stochastic vs mini-batch GD",
        xlabel="epoch",
        ylabel="training loss (exact)",
        logx=True,
        logy=True,
    )


def run_demo(out_dir: str = "runs/demo") -> list[list[str]]:
    base = Path(out_dir)
    # The demo owns its folder (the plots) and one run folder per experiment: every one is
    # checked before the first experiment runs, so a refusal never comes halfway through.
    names = [e[0] for e in EXPERIMENTS]
    for name in names:
        outdir.check(base / name)
    outdir.claim(base, files=PLOTS, folders=names)
    rows, curves, optima, lrs = [], {}, {}, {}
    t0 = time.perf_counter()
    for name, model, variant, lr, extra in EXPERIMENTS:
        row, curves[name], optima[name], lrs[name] = _experiment(base, name, model, variant, lr, extra)
        rows.append(row)
    _print_table(rows)
    print("* exact loss of the final weights on the training set (standardised target: 1 - R^2)")
    _plots(base, curves, optima, lrs)
    paths = draw_paths(base / PLOTS[3])
    print(
        f"\nplots: {', '.join(str(base / f) for f in PLOTS[:3])}, {paths}; per-run outputs under {base}/<experiment>/"
    )
    print(f"total time {time.perf_counter() - t0:.1f}s")
    return rows


def _descend(
    x: torch.Tensor, y: torch.Tensor, w0: tuple[float, float], lr: float, batch: Any, steps: int
) -> tuple[list[float], list[float]]:
    """The weights (w1, w2) visited by gradtune's SGD on a Linear(2, 1) from ``w0``: ``batch``
    rows a step (full / 1 / k, the sampler's seeded order), the MSE of the step's rows. The
    intercept stays at 0, the optimum's (the target is standardised, the features centred)."""
    model = Linear(2, 1).double()
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor([w0], dtype=torch.float64))
        model.linear.bias.zero_()
    model.linear.bias.requires_grad_(False)
    opt = SGD([model.linear.weight], lr=lr)
    sampler = Sampler(len(y), batch, seed=0)
    w1, w2 = [w0[0]], [w0[1]]
    for _ in range(steps):
        idx = next(sampler).micro[0]
        opt.zero_grad()
        ((model(x[idx]).squeeze(-1) - y[idx]) ** 2).mean().backward()
        opt.step()
        a, b = model.linear.weight.detach()[0].tolist()
        w1.append(a)
        w2.append(b)
    return w1, w2


def _surface(x: torch.Tensor, y: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """MSE at every (xs[j], ys[i]) with intercept 0: w'Aw - 2 b'w + c, A = X'X/m, b = X'y/m,
    c = mean(y^2); (len(ys), len(xs)) in one pass, no per-point loop."""
    m = len(y)
    a, b, c = x.T @ x / m, x.T @ y / m, (y @ y) / m
    w = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)  # (G, G, 2) as (w1, w2)
    return torch.einsum("ijk,kl,ijl->ij", w, a, w) - 2 * w @ b + c


def draw_paths(path: Path) -> Path:
    """paths.png: linear regression on two diabetes features; left, batch / stochastic /
    mini-batch GD, right, batch GD at 1/L and at steps too large (1.9/L zigzags, 2.2/L diverges)."""
    cfg = load_config(
        None, ["data=diabetes", f"features=[{','.join(PATH_FEATURES)}]", "val_fraction=0", "dtype=float64"]
    )
    job = build(cfg)
    x, y = job.train.fields["x"], job.train.fields["y"]  # (442, 2) standardised, (442,)
    w_opt, _ = closed_form(x, y)
    m = len(y)
    big = curvature.power_iteration(lambda v: 2 * x.T @ (x @ v) / m, 2)  # L of the MSE, H = 2X'X/m
    # A start off both axes of the ellipses: the steep one, (1, 1) (the features correlate), shows
    # the zigzag of a large step, the flat one, (1, -1), the slow crawl along the valley.
    w0 = (float(w_opt[0]) - 1.5, float(w_opt[1]) - 0.9)
    xs = torch.linspace(-1.3, 1.5, 141, dtype=torch.float64)
    ys = torch.linspace(-0.8, 1.6, 121, dtype=torch.float64)
    z = _surface(x, y, xs, ys)
    best = job.info["closed_form_loss"]
    levels = [best + g for g in torch.logspace(-2.5, 0.7, 12).tolist()]
    opt = (float(w_opt[0]), float(w_opt[1]))
    variants = {
        "batch GD (lr 0.1, 40 steps)": _descend(x, y, w0, 0.1, "full", 40),
        "stochastic GD (lr 0.02, 1 epoch)": _descend(x, y, w0, 0.02, 1, m),
        "mini-batch GD (32, lr 0.1, 4 epochs)": _descend(x, y, w0, 0.1, 32, 4 * -(-m // 32)),
    }
    # Nearer for the step sizes: a 1.9/L step flips the steep component to the other side.
    near = (opt[0] - 0.55, opt[1] + 0.05)
    steps = {
        f"1/L = {1 / big:.3g}": _descend(x, y, near, 1 / big, "full", 12),
        f"1.9/L = {1.9 / big:.3g} (zigzags)": _descend(x, y, near, 1.9 / big, "full", 12),
        f"2.2/L = {2.2 / big:.3g} (diverges)": _descend(x, y, near, 2.2 / big, "full", 10),
    }
    labels = (f"weight of {PATH_FEATURES[0]}", f"weight of {PATH_FEATURES[1]}")
    panels = [
        PathPanel(
            "batch vs stochastic vs mini-batch GD", xs.tolist(), ys.tolist(), z.tolist(), levels, variants, opt, labels
        ),
        PathPanel(
            f"batch GD: step size against L = {big:.3g} (largest curvature)",
            xs.tolist(),
            ys.tolist(),
            z.tolist(),
            levels,
            steps,
            opt,
            labels,
        ),
    ]
    return plot_paths(panels, path, "Linear regression on two diabetes features: loss contours and GD paths")


def setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", default="runs/demo", help="folder for the plots and each variant's run folder")


def run(args: argparse.Namespace) -> int:
    run_demo(args.out_dir)
    return 0
