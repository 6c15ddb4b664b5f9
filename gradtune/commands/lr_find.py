"""``gradtune lr-find [CONFIG.yaml] [key=value ...]``: the learning-rate range test, plotted."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Optional

from gradtune import lr_find
from gradtune.commands import config_args
from gradtune.data.fingerprint import data_name
from gradtune.loop.run_setup import run_inputs
from gradtune.runtime import lock, outdir, outfile, runfolder
from gradtune.runtime.errors import GradtuneError

HELP = "learning-rate range test: plot loss against lr, suggest one"
EPILOG = config_args.epilog()

# What lr-find writes beside a run's own files: no input may lie there (it would be replaced).
FILES = (*outdir.RUN_FILES, "lr_find.json")


def setup(p: argparse.ArgumentParser) -> None:
    config_args.add(p)
    p.add_argument("--min-lr", type=float, default=1e-6, help="the sweep's first lr")
    p.add_argument("--max-lr", type=float, default=10.0, help="the sweep's last lr (stops early if the loss blows up)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"sweep steps (default: {lr_find.STEPS_PER_DECADE} per decade of lr, 301 for 1e-6..10)",
    )
    p.add_argument(
        "--out",
        metavar="PLOT.png",
        default=None,
        help="write the plot here and its data beside it (PLOT.json) instead of into out_dir",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing --out files gradtune did not write")


def _out_files(args: argparse.Namespace) -> Optional[tuple[Path, Path]]:
    """(plot, data) named by --out, both checked (runtime/outfile.py); None without --out."""
    if args.out is None:
        return None
    if Path(args.out).suffix.lower() != ".png":
        raise GradtuneError(f"lr-find: --out {args.out}: give a file name ending in .png (the plot)")
    plot = outfile.check(args.out, args.overwrite, "lr-find: --out")
    data = outfile.check(plot.with_suffix(".json"), args.overwrite, "lr-find: --out")
    return plot, data


def run(args: argparse.Namespace) -> int:
    cfg = config_args.config(args)
    if not (math.isfinite(args.min_lr) and math.isfinite(args.max_lr) and 0 < args.min_lr < args.max_lr):
        raise GradtuneError(f"lr-find: need finite 0 < --min-lr ({args.min_lr}) < --max-lr ({args.max_lr})")
    if args.steps is not None and args.steps < 2:
        raise GradtuneError(f"lr-find: --steps must be >= 2 (a curve needs points), got {args.steps}")
    path, _ = config_args.split(args.items)
    inputs = [*run_inputs(cfg), *([path] if path else [])]
    files, created = _out_files(args), False
    if files is None:  # the default out_dir: a folder of its own, never a training run's
        out_dir, created = runfolder.choose(cfg.out_dir, f"{runfolder.stem(cfg.model)}-lr-find", lambda f: False)
        cfg = dataclasses.replace(cfg, out_dir=out_dir)
        outdir.check(cfg.out_dir, inputs, FILES)  # before the test runs: a refusal should not cost its steps
    with lock.holding(cfg.out_dir, files is None, created):
        r = lr_find.lr_find(cfg, args.min_lr, args.max_lr, args.steps)
        if files is None:
            outdir.claim(cfg.out_dir, inputs, FILES)
        out, data = files or (Path(cfg.out_dir) / "lr_find.png", Path(cfg.out_dir) / "lr_find.json")
        title = f"lr range test: {cfg.model} on {data_name(cfg.data)}, batch_size={cfg.batch_size}"
        lr_find.plot(r, out, title)  # each written beside and renamed into place
        lr_find.save(r, data, args.min_lr, args.max_lr)
        if files is not None:
            outfile.record(out)
            outfile.record(data)
    end = f"diverged at lr {r.divergence:.3g}" if r.divergence is not None else "reached --max-lr"
    print(
        f"lr-find: {len(r.lrs)} of {r.steps} steps from {args.min_lr:g} ({end}); loss lowest at lr "
        f"{r.lowest:.3g}; suggested lr = {r.suggestion:.3g} (that / {lr_find.FRACTION:g})"
    )
    if r.note:
        print(f"lr-find: note: {r.note}")
    print(f"plot: {out}; data: {data}")
    return 0
