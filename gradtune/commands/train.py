"""``gradtune train [CONFIG.yaml] [key=value ...]``: train a model, write its run folder."""

from __future__ import annotations

import argparse

from gradtune.commands import config_args
from gradtune.loop.assemble import planned
from gradtune.loop.run_setup import describe
from gradtune.runtime import distributed
from gradtune.train import setup_run, train

HELP = "train a model from a config and key=value settings"


def setup(p: argparse.ArgumentParser) -> None:
    config_args.add(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve and check everything (data, model, out_dir, callbacks, precision, resume), "
        "print the run's device, precision and components, write nothing",
    )


def dry_run(cfg, inputs: list[str]) -> int:
    job, s = setup_run(cfg, inputs)
    try:
        facts = describe(s, planned(job, s.cfg, s.out_dir, s.callbacks))
    finally:
        s.close()
    if distributed.is_main():
        resume = f"resume from {facts['resume']}" if facts["resume"] else "fresh"
        print(f"dry run: nothing written; {job.task} job, {len(job.train):,} training samples")
        print(f"  device {facts['device']}, precision {facts['precision']}, world size {facts['world_size']}")
        print(f"  out_dir {facts['out_dir']} ({resume})")
        print("  components: " + ", ".join(facts["components"]))
    return 0


def run(args: argparse.Namespace) -> int:
    cfg = config_args.config(args)
    path, _ = config_args.split(args.items)
    if args.dry_run:
        return dry_run(cfg, [path] if path else [])
    r = train(cfg, [path] if path else [])  # the config file read must not be overwritten
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
    return 0
