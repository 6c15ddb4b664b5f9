"""``gradtune train [CONFIG.yaml] [key=value ...]``: train a model, write its run folder."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable

from gradtune.commands import config_args
from gradtune.config import Config
from gradtune.loop.assemble import planned
from gradtune.loop.run_setup import describe
from gradtune.runtime import distributed, outdir, runfolder
from gradtune.state import checkpoint, resume
from gradtune.train import setup_run, train

HELP = "train a model from a config and key=value settings"
EPILOG = config_args.epilog()


def setup(p: argparse.ArgumentParser) -> None:
    config_args.add(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve and check everything (data, model, out_dir, callbacks, precision, resume), "
        "print the run's device, precision and components, write nothing",
    )


def dry_run(cfg, inputs: list[str]) -> int:
    job, s = setup_run(cfg, inputs, hold=False)
    try:
        facts = describe(s, planned(job, s.cfg, s.out_dir, s.callbacks))
    finally:
        s.close()
    if distributed.is_main():
        start = f"resume from {facts['resume']}" if facts["resume"] else "fresh"
        print(f"dry run: nothing written; {job.task} job, {len(job.train):,} training samples")
        print(f"  device {facts['device']}, precision {facts['precision']}, world size {facts['world_size']}")
        print(f"  out_dir {facts['out_dir']} ({start})")
        print("  components: " + ", ".join(facts["components"]))
    return 0


def resumable(cfg: Config) -> Callable[[Path], bool]:
    """Would ``cfg`` resume the run in a folder: its newest checkpoint's config differs from
    ``cfg`` only in settings that do not change the run (state/resume.py's rule)?"""

    def check(folder: Path) -> bool:
        if cfg.resume == "never":
            return False
        current = dataclasses.replace(cfg, out_dir=str(folder)).to_dict()
        for _, ckpt in reversed(checkpoint.listing(checkpoint.root(folder))):
            try:
                saved = json.loads((ckpt / "config.json").read_text())["config"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            return not resume.config_diff(saved, current)
        return False

    return check


def run_folder(cfg: Config) -> tuple[Config, bool]:
    """``cfg`` with the default out_dir replaced by the run's own folder (runtime/runfolder.py),
    and whether that folder was made here."""
    out_dir, created = runfolder.choose(
        cfg.out_dir, cfg.model, resumable(cfg), distributed.launched(), distributed.is_main()
    )
    if out_dir != cfg.out_dir and distributed.is_main():
        print(f"out_dir: {out_dir} ({'new' if created else 'resuming its checkpoint'}; runs/latest links the newest)")
    return dataclasses.replace(cfg, out_dir=out_dir), created


def run(args: argparse.Namespace) -> int:
    cfg = config_args.config(args)
    path, _ = config_args.split(args.items)
    if args.dry_run:  # before the run folder is chosen: a dry run writes nothing
        return dry_run(cfg, [path] if path else [])
    default = runfolder.is_default(cfg.out_dir)
    cfg, created = run_folder(cfg)
    # train() checks out_dir, then holds its lock (a second process is refused, naming the holder).
    try:
        r = train(cfg, [path] if path else [])  # the config file read must not be overwritten
    except BaseException:
        if created and distributed.is_main():
            with contextlib.suppress(OSError):
                Path(cfg.out_dir).rmdir()  # a refused run leaves no empty run folder behind
        raise
    finally:
        if default and distributed.is_main() and outdir.is_run_folder(cfg.out_dir):
            said = runfolder.point_latest(cfg.out_dir)  # finished or preempted: the newest run
            if said:
                print(f"gradtune: note: {said}", file=sys.stderr)
    if not distributed.is_main():  # one summary per job, from rank 0
        return 0
    metrics = " ".join(f"{k}={v:.6g}" for k, v in r.metrics.items() if isinstance(v, float))
    used = r.info.get("time_budget", {}).get("used_s")  # max_time: the one total, start-up and outputs included
    took = f"{used:.2f}s in all" if used is not None else f"{r.wall_time:.2f}s"
    print(f"done: {r.steps} steps ({r.epochs:.3g} epochs) in {took}; stopped: {r.stop_reason}")
    print(f"final: {metrics}")
    if r.info.get("noise_scale"):
        print(f"advice: {r.info['noise_scale']['advice']}")
    best = r.info.get("early_stopping")
    if best and best["restored"]:
        print(
            f"weights: the best evaluation's, step {best['best_step']} ({best['monitor']}={best['best']:.6g}); "
            f"its checkpoint is in {cfg.out_dir}/best/"
        )
    plots = ", loss.png, report.html" if cfg.plot else ""
    print(f"outputs: {cfg.out_dir}/ (model.safetensors, metrics.jsonl, summary.json{plots})")
    tracked = r.info.get("trackers", {})
    if "mlflow" in tracked:
        print(f"mlflow: run {tracked['mlflow']['run_id']} in {tracked['mlflow']['tracking_uri']}")
    if "wandb" in tracked:
        print(f"wandb: run {tracked['wandb']['run_id']} in {tracked['wandb']['dir']}")
    return 0
