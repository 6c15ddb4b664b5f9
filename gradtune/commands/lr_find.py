"""``gradtune lr-find [CONFIG.yaml] [key=value ...]``: the learning-rate range test, plotted."""

from __future__ import annotations

import argparse
from pathlib import Path

from gradtune import lr_find
from gradtune.commands import config_args
from gradtune.loop.fit import run_inputs
from gradtune.runtime import outdir
from gradtune.runtime.errors import GradtuneError

HELP = "learning-rate range test: plot loss against lr, suggest one"


def setup(p: argparse.ArgumentParser) -> None:
    config_args.add(p)
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--max-lr", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=100)


def run(args: argparse.Namespace) -> int:
    cfg = config_args.config(args)
    if not 0 < args.min_lr < args.max_lr:
        raise GradtuneError(f"lr-find: need 0 < --min-lr ({args.min_lr}) < --max-lr ({args.max_lr})")
    path, _ = config_args.split(args.items)
    inputs = [*run_inputs(cfg), *([path] if path else [])]
    outdir.check(cfg.out_dir, inputs)  # before the test runs: a refusal should not cost its steps
    r = lr_find.lr_find(cfg, args.min_lr, args.max_lr, args.steps)
    outdir.claim(cfg.out_dir, inputs)
    out = Path(cfg.out_dir) / "lr_find.png"
    lr_find.plot(r, out, f"lr range test: {cfg.model} on {Path(cfg.data).name}, batch_size={cfg.batch_size}")
    end = "stopped at divergence" if r.stopped_early else "reached --max-lr"
    print(f"lr-find: {len(r.lrs)} steps from {args.min_lr:g} ({end}); suggested lr = {r.suggestion:.3g}")
    print(f"plot: {out}")
    return 0
