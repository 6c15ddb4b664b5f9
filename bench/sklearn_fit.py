"""gradtune.sklearn against scikit-learn's own estimators, same data, same settings.

Diabetes (442 rows, 10 features), features and target standardised; batch 32, 100 epochs,
constant lr 0.01, no momentum, no stopping rule (every side runs all 100 epochs):

    mlp       gradtune MLPRegressor((5,), solver="sgd")     vs sklearn MLPRegressor((5,), solver="sgd")
    linear    gradtune GDRegressor(batch_size=32)           vs sklearn SGDRegressor (per-sample SGD, Cython)
    logistic  gradtune GDClassifier(batch_size=32), y > median  vs sklearn SGDClassifier(loss="log_loss")

Method: sides alternate (ours, peer, ours, peer ...) ``--repeats`` times after one untimed warm-up
each; medians and the ratio of medians. ``--profile`` adds where our time goes per optimizer step
(cProfile of one MLP fit, cumulative time per step of the loop's parts; the profiler inflates
small calls) and the fixed cost of one ``fit`` call (max_iter=1); ``--breakdown`` times the parts
of one step alone at the step's shapes, against the whole ``Loop._step``. The machine is shared:
read ratios, and the load average printed.
Run: ``python bench/sklearn_fit.py [--repeats 7] [--profile] [--breakdown]``.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time
import warnings

import numpy as np
import sklearn
import torch
from sklearn.datasets import load_diabetes
from sklearn.linear_model import SGDClassifier, SGDRegressor
from sklearn.neural_network import MLPRegressor as SkMLPRegressor
from sklearn.preprocessing import StandardScaler

from gradtune.loop import gradient
from gradtune.loop.evaluation import ratio_snapshot, update_ratios
from gradtune.loop.loop import Loop
from gradtune.sklearn import GDClassifier, GDRegressor, MLPRegressor, engine
from gradtune.telemetry.metrics_log import MetricsLog

EPOCHS, BATCH, LR = 100, 32, 0.01


def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_diabetes(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    labels = (y > np.median(y)).astype(int)
    return x, (y - y.mean()) / y.std(), labels


def pairs() -> dict[str, tuple]:
    common = dict(lr=LR, momentum=0.0, batch_size=BATCH, max_iter=EPOCHS, tol=None, random_state=0)
    return {
        "mlp": (
            MLPRegressor(hidden_layer_sizes=(5,), solver="sgd", alpha=0.0, **common),
            SkMLPRegressor(
                hidden_layer_sizes=(5,),
                solver="sgd",
                learning_rate_init=LR,
                momentum=0.0,
                alpha=0.0,
                batch_size=BATCH,
                max_iter=EPOCHS,
                tol=0.0,
                n_iter_no_change=EPOCHS + 1,
                random_state=0,
            ),
            "y",
        ),
        "linear": (
            GDRegressor(**common),
            SGDRegressor(learning_rate="constant", eta0=LR, alpha=0.0, max_iter=EPOCHS, tol=None, random_state=0),
            "y",
        ),
        "logistic": (
            GDClassifier(alpha=0.0, **common),
            SGDClassifier(
                loss="log_loss", learning_rate="constant", eta0=LR, alpha=0.0, max_iter=EPOCHS, tol=None, random_state=0
            ),
            "labels",
        ),
    }


class PlainTorch:
    """The floor for any torch-based loop: the 10-5-1 MLP (float64) trained by the tutorial's
    zero_grad / forward / loss / backward / step over shuffled index batches, nothing else."""

    n_iter_ = EPOCHS

    def fit(self, x: np.ndarray, y: np.ndarray) -> "PlainTorch":
        torch.manual_seed(0)
        xt, yt = torch.tensor(x), torch.tensor(y)
        model = torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1)).double()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the loop does for tiny models
        for _ in range(EPOCHS):
            for idx in torch.randperm(len(yt)).split(BATCH):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(xt[idx]).squeeze(1), yt[idx])
                loss.backward()
                opt.step()
        torch.set_num_threads(threads)
        return self


class AnalyticLinear:
    """Linear least squares by mini-batch SGD with the gradient written out (no autograd):
    the floor of a torch step for the linear model, what a loop fast path could approach."""

    n_iter_ = EPOCHS

    def fit(self, x: np.ndarray, y: np.ndarray) -> "AnalyticLinear":
        torch.manual_seed(0)
        xt, yt = torch.tensor(x), torch.tensor(y)
        w, b = torch.zeros(xt.shape[1], dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        for _ in range(EPOCHS):
            for idx in torch.randperm(len(yt)).split(BATCH):
                xb = xt[idx]
                r = torch.addmv(b - yt[idx], xb, w)  # (B,) residuals
                w.addmv_(xb.T, r, alpha=-2 * LR / len(idx))  # gradient of the mean squared error
                b -= 2 * LR * r.mean()
        torch.set_num_threads(threads)
        return self


def timed(est, x, y) -> float:
    t0 = time.perf_counter()
    est.fit(x, y)
    return time.perf_counter() - t0


def compare(repeats: int) -> None:
    x, y, labels = data()
    targets = {"y": y, "labels": labels}
    print(f"{'model':<9} {'gradtune (ms)':>14} {'scikit-learn (ms)':>18} {'ratio':>7}   epochs ours/theirs")
    for name, (ours, peer, target) in pairs().items():
        t = targets[target]
        timed(ours, x, t), timed(peer, x, t)  # warm-up: imports, kernels, allocator
        a, b = [], []
        for _ in range(repeats):
            a.append(timed(ours, x, t))
            b.append(timed(peer, x, t))
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"{name:<9} {ma * 1e3:>14.1f} {mb * 1e3:>18.1f} {ma / mb:>6.2f}x   {ours.n_iter_}/{peer.n_iter_}")
        floors = {"mlp": PlainTorch, "linear": AnalyticLinear}
        if name in floors:  # the floor of a torch loop, timed beside the same two
            floor = statistics.median(timed(floors[name](), x, t) for _ in range(repeats))
            what = "floor: plain torch loop" if name == "mlp" else "floor: torch, gradient written out"
            print(f"  {what}: {floor * 1e3:.1f} ms; ours/floor {ma / floor:.2f}x, floor/peer {floor / mb:.2f}x")


PARTS = [
    ("Loop._step (one optimizer step, all of it)", "loop.py", "_step"),
    ("  gradient.accumulate (get batch, forward, loss, backward)", "gradient.py", "accumulate"),
    ("    objective (forward + loss)", "regression.py", "__call__"),
    ("    backward", "__init__.py", "backward"),
    ("  Sampler.__next__ (indices of the step)", "sampler.py", "__next__"),
    ("  optimizer step (direct_step)", "direct.py", "step"),
    ("  Guard.check", "guard.py", "check"),
    ("  _schedule + _set_lr", "loop.py", "_schedule"),
    ("  ratio_snapshot (at evaluation steps)", "evaluation.py", "ratio_snapshot"),
    ("  update_ratios (at evaluation steps)", "evaluation.py", "update_ratios"),
    ("  _evaluate (once an epoch)", "loop.py", "_evaluate"),
    ("  Progress.tick", "progress.py", "tick"),
    ("  distributed.vote_stop", "distributed.py", "vote_stop"),
]


def profile() -> None:
    x, y, _ = data()
    est = pairs()["mlp"][0]
    est.fit(x, y)
    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    est.fit(x, y)
    wall = time.perf_counter() - t0
    prof.disable()
    steps = est._run["steps"]
    stats = pstats.Stats(prof).stats
    print(f"\nprofile: MLP fit, {steps} steps, {wall * 1e3:.0f} ms under cProfile ({wall / steps * 1e6:.0f} us/step)")
    for label, file, func in PARTS:
        cum = sum(v[3] for (f, _, fn), v in stats.items() if f.endswith(file) and fn == func)
        if cum:
            print(f"  {label:<62} {cum / steps * 1e6:8.1f} us/step")
    one = GDRegressor(lr=LR, momentum=0.0, batch_size=BATCH, max_iter=1, tol=None, random_state=0)
    fixed = statistics.median(timed(one, x, y) for _ in range(7))
    print(f"  fixed cost of one fit call (max_iter=1, {-(-len(y) // BATCH)} steps): {fixed * 1e3:.1f} ms")


def _per_call(fn, reps: int = 3000) -> float:
    """Median over 5 rounds of the time of one call of ``fn``, in microseconds."""
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(rounds)


def breakdown() -> None:
    """The parts of one MLP step timed alone at the step's shapes (no profiler to distort them),
    against the whole ``Loop._step``: the residual is the loop's own bookkeeping."""
    x, y, _ = data()
    est = pairs()["mlp"][0]
    est.fit(x, y)
    cfg = est._run["config"]
    job = engine.make_job(cfg, est.model_, torch.tensor(x), torch.tensor(y), "regression", 0)
    loop = Loop(job, cfg, None, MetricsLog(None))
    loop._begin()
    torch.set_num_threads(1)
    step = next(loop.sampler)
    idx = step.micro[0]
    batch = job.train.get(idx)

    def fwd_bwd():
        out = job.objective(loop.model, batch)
        out.loss_sum.backward()

    def fwd():
        with torch.no_grad():
            job.objective(loop.model, batch)

    parts = {
        "Sampler.__next__": lambda: next(loop.sampler),
        "dataset.get (index_select per field)": lambda: job.train.get(idx),
        "objective forward + loss (no grad)": fwd,
        "objective forward + loss + backward": fwd_bwd,
        "zero grads (p.grad = None)": lambda: [setattr(p, "grad", None) for p in loop.params],
        "optimizer step": loop.opt_step,
        "guard.check": lambda: loop.guard.check(0.5, None),
        "_schedule + _set_lr": lambda: loop._schedule(),
        "Progress.tick (progress off)": lambda: loop.progress.tick(1, 0.5, 0.01, 32),
        "float(loss_sum) (host read)": lambda: float(batch["y"].sum()),
        "gradient.accumulate (get + forward + loss + backward)": lambda: gradient.accumulate(
            loop.fwd, job.objective, job.train, [idx], loop.device, loop.amp
        ),
        "update ratios (ratio_snapshot + update_ratios), per eval": lambda: update_ratios(
            loop.opt, ratio_snapshot(loop.opt)
        ),
        "Loop._evaluate, per eval": lambda: loop._evaluate(0.5, 0.01),
    }
    fwd_bwd()
    times = {k: _per_call(f) for k, f in parts.items()}
    loop.total = 10**9  # never the last step: no final evaluation inside the timing
    whole = _per_call(lambda: loop._step(next(loop.sampler)), reps=1400)
    print("\nbreakdown: one MLP step's parts timed alone (us per call, median of 5 rounds)")
    for k, v in times.items():
        print(f"  {k:<58} {v:8.1f}")
    core = times["objective forward + loss + backward"] + times["optimizer step"]
    print(f"  {'Loop._step, whole (an evaluation every 14 steps)':<58} {whole:8.1f}")
    print(f"  {'  of which forward + loss + backward + update':<58} {core:8.1f}  ({core / whole:.0%})")
    print(f"  {'  the rest: sampling, gathering, bookkeeping':<58} {whole - core:8.1f}  ({1 - core / whole:.0%})")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--breakdown", action="store_true", help="time the parts of one step alone")
    args = p.parse_args()
    warnings.simplefilter("ignore")  # ConvergenceWarning: every side runs its 100 epochs on purpose
    print(
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), threads "
        f"{torch.get_num_threads()}, scikit-learn {sklearn.__version__}, cores {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"diabetes standardised, batch {BATCH}, {EPOCHS} epochs, lr {LR}, no momentum, no stopping rule\n")
    compare(args.repeats)
    if args.profile:
        profile()
    if args.breakdown:
        breakdown()
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
