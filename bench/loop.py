"""Loop overhead and time-to-optimum, measured against peers in the same run.

1. The classic 10-5-1 MLP, SGD lr 0.01, 100 epochs on diabetes (all 442 rows): gradtune's loop
   (guard with its per-step gradient check, metrics.jsonl on disk, evaluation each epoch:
   everything on) against the plain tutorial loop (torch.optim.SGD,
   TensorDataset + DataLoader, zero_grad / forward / loss / backward / step), with
   batch_size 1 (44,200 steps) and with batch_size full.
2. Linear regression on diabetes: time for batch GD to reach 1e-6 relative of the closed-form
   optimum's loss, against scikit-learn's SGDRegressor (its own tolerance) and numpy.linalg.lstsq.

Method: sides alternate (ours, peer, ours, peer ...), each side ``--repeats`` times; we print
medians and the ratio of medians, after one untimed warm-up epoch of each side (one-time imports).
The machine is shared and noisy: read ratios, not seconds.
Run: ``python bench/loop.py`` (about a minute or two on 2 cores) or ``--quick``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gradtune.config import load_config
from gradtune.jobs.registry import build
from gradtune.loop.callbacks import Callback
from gradtune.loop.evaluation import evaluate
from gradtune.loop.fit import fit


def plain_tutorial_loop(x: torch.Tensor, y: torch.Tensor, batch_size: int, epochs: int, seed: int = 0) -> float:
    """The loop every tutorial shows, as written there."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y.unsqueeze(1)), batch_size=batch_size, shuffle=True
    )
    loss_fn = torch.nn.MSELoss()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


class NoOp(Callback):
    """A callback that listens to every step and does nothing: the price of the callback API."""

    def on_step_end(self, step, loss, lr):
        return None


def ours(batch_size: str, epochs: int, callbacks: list | None = None) -> float:
    # All 442 rows (val_fraction=0), as the tutorial trains: 100 epochs at batch 1 = 44,200 steps.
    cfg = load_config(
        None,
        [
            "model=mlp",
            f"batch_size={batch_size}",
            "lr=0.01",
            f"epochs={epochs}",
            "progress=off",
            "device=cpu",
            "val_fraction=0",
        ],
    )
    job = build(cfg)
    with tempfile.TemporaryDirectory() as out:  # metrics.jsonl written as `gradtune train` does
        t0 = time.perf_counter()
        fit(job, cfg, Path(out), callbacks=callbacks)
        return time.perf_counter() - t0


def compare_mlp(batch_size: str, epochs: int, repeats: int, with_callback: bool = False) -> None:
    job = build(load_config(None, ["model=mlp", "device=cpu", "val_fraction=0"]))
    x, y = job.train.fields["x"], job.train.fields["y"]
    bs = len(x) if batch_size == "full" else int(batch_size)
    # Warm-up, untimed: one-time process costs (torch.optim.Optimizer's first construction
    # imports torch._dynamo, ~3 s here) would otherwise be charged to whichever side runs first.
    ours(batch_size, 1)
    plain_tutorial_loop(x, y, bs, 1)
    a, b, c = [], [], []
    for _ in range(repeats):
        a.append(ours(batch_size, epochs))
        b.append(plain_tutorial_loop(x, y, bs, epochs))
        if with_callback:
            c.append(ours(batch_size, epochs, [NoOp()]))
    steps = epochs * -(-len(x) // bs)
    ma, mb = statistics.median(a), statistics.median(b)
    print(
        f"MLP 10-5-1 batch_size={batch_size:>4} {steps:>6} steps: gradtune {ma:7.3f}s "
        f"({ma / steps * 1e6:6.1f} us/step)  plain loop {mb:7.3f}s ({mb / steps * 1e6:6.1f} us/step)  "
        f"ratio {ma / mb:.3f}x"
    )
    if c:
        mc = statistics.median(c)
        print(f"  + one no-op callback (on_step_end): {mc:7.3f}s  {mc / ma:.3f}x of gradtune without callbacks")


def steps_to_optimum(cfg_items: list[str], rel: float = 1e-6, limit: int = 20000) -> int:
    """Calibration (not timed): the first step count whose training loss is within ``rel``."""
    cfg = load_config(None, cfg_items + [f"max_steps={limit}", "eval_every=1", "epochs=100000"])
    job = build(cfg)
    optimum = job.info["closed_form_loss"]
    r = fit(job, cfg)
    for row in r.history:
        # Full batch: the logged loss at step s is the exact loss *before* update s.
        if row.get("kind") == "eval" and (row["loss"] - optimum) / optimum < rel:
            return row["step"]
    raise RuntimeError("did not reach the optimum")


def compare_linear(repeats: int) -> None:
    from sklearn.linear_model import SGDRegressor

    base = [
        "model=linear",
        "batch_size=full",
        "progress=off",
        "plot=false",
        "val_fraction=0",
        "dtype=float64",
        "device=cpu",
    ]
    variants = {"GD lr 0.2": ["lr=0.2"], "GD+Nesterov lr 0.1 m 0.9": ["lr=0.1", "momentum=0.9", "nesterov=true"]}
    job = build(load_config(None, base))
    x, y = job.train.fields["x"].numpy(), job.train.fields["y"].numpy()
    optimum = job.info["closed_form_loss"]
    results = {}
    for name, extra in variants.items():
        n = steps_to_optimum(base + extra)
        cfg = load_config(None, base + extra + [f"max_steps={n}", f"eval_every={n}", "epochs=100000"])
        times = []
        for _ in range(repeats):
            j = build(cfg)
            t0 = time.perf_counter()
            fit(j, cfg)
            times.append(time.perf_counter() - t0)
        loss, _, _ = evaluate(j.model, j.objective, j.train, 4096, torch.device("cpu"), contextlib.nullcontext())
        results[name] = (statistics.median(times), n, (loss - optimum) / optimum)
    t_sk, gap_sk = [], 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        sk = SGDRegressor(random_state=0).fit(x, y)  # defaults: tol 1e-3, max_iter 1000
        t_sk.append(time.perf_counter() - t0)
        gap_sk = (np.mean((sk.predict(x) - y) ** 2) - optimum) / optimum
    t_np = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        design = np.hstack([x, np.ones((len(x), 1))])
        np.linalg.lstsq(design, y, rcond=None)
        t_np.append(time.perf_counter() - t0)
    print("\nLinear regression on diabetes (353 training rows, float64), time to the optimum:")
    for name, (t, n, gap) in results.items():
        print(f"  gradtune {name:<26} {t * 1e3:8.2f} ms  {n:5d} steps  final gap {gap:.1e}")
    print(f"  sklearn SGDRegressor (tol 1e-3)    {statistics.median(t_sk) * 1e3:8.2f} ms  final gap {gap_sk:.1e}")
    print(f"  numpy.linalg.lstsq                 {statistics.median(t_np) * 1e3:8.2f} ms  (the exact optimum)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="10 epochs, 1 repeat: a smoke run")
    args = p.parse_args()
    repeats = 1 if args.quick else args.repeats
    epochs = 10 if args.quick else 100
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.2f}; "
        f"medians of {repeats}, sides alternated"
    )
    compare_mlp("1", epochs, repeats, with_callback=True)
    compare_mlp("full", epochs * 20, repeats)
    compare_linear(repeats)


if __name__ == "__main__":
    main()
