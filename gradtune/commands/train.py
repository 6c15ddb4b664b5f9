"""``gradtune train [CONFIG.yaml] [key=value ...]``: train a model, write its run folder."""

from __future__ import annotations

import argparse

from gradtune.commands import config_args
from gradtune.runtime import distributed
from gradtune.train import train

HELP = "train a model from a config and key=value settings"
EPILOG = config_args.epilog()


def setup(p: argparse.ArgumentParser) -> None:
    config_args.add(p)


def run(args: argparse.Namespace) -> int:
    cfg = config_args.config(args)
    path, _ = config_args.split(args.items)
    r = train(cfg, [path] if path else [])  # the config file read must not be overwritten
    if not distributed.is_main():  # one summary per job, from rank 0
        return 0
    metrics = " ".join(f"{k}={v:.6g}" for k, v in r.metrics.items() if isinstance(v, float))
    print(f"done: {r.steps} steps ({r.epochs:.3g} epochs) in {r.wall_time:.2f}s; stopped: {r.stop_reason}")
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
