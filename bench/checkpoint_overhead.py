"""Checkpoint overhead as a share of step time, for the classic MLP and a bigger one.

    python bench/checkpoint_overhead.py [--every 100]

Measures the mean time of a training step (no checkpoints) and of one checkpoint save (weights,
optimizer state, RNGs, manifest with sha256, fsyncs, rename, retention), then reports
save / (every * step): the share of wall time spent checkpointing at ``checkpoint_every``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from gradtune.config import load_config
from gradtune.jobs.registry import build
from gradtune.loop.loop import Loop
from gradtune.telemetry.metrics_log import MetricsLog

MODELS = {
    "mlp 10-5-1": ["model=mlp", "hidden=[5]"],
    "mlp 10-1024-1024-1 (1.1M params)": ["model=mlp", "hidden=[1024,1024]"],
}


def measure(settings: list[str], steps: int, saves: int) -> tuple[float, float, int]:
    out = Path(tempfile.mkdtemp(prefix="gt-bench-"))
    try:
        cfg = load_config(
            None,
            [
                *settings,
                "batch_size=32",
                "momentum=0.9",
                "standardize_target=true",
                f"max_steps={steps}",
                "epochs=1000",
                "progress=off",
                f"out_dir={out}",
            ],
        )
        job = build(cfg)
        loop = Loop(job, cfg, out, MetricsLog(None))
        t0 = time.perf_counter()
        loop.run()
        step_s = (time.perf_counter() - t0) / steps
        t0 = time.perf_counter()
        for _ in range(saves):
            loop.save_checkpoint()
        save_s = (time.perf_counter() - t0) / saves
        return step_s, save_s, sum(p.numel() for p in job.model.parameters())
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--saves", type=int, default=10)
    a = ap.parse_args()
    for name, settings in MODELS.items():
        step_s, save_s, n = measure(settings, a.steps, a.saves)
        share = save_s / (save_s + a.every * step_s)
        print(
            f"{name}: {n} params, step {step_s * 1e3:.2f} ms, checkpoint {save_s * 1e3:.1f} ms "
            f"= {save_s / step_s:.0f} steps; at checkpoint_every={a.every}: {share:.1%} of wall time"
        )


if __name__ == "__main__":
    main()
