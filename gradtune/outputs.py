"""What a finished run leaves in ``out_dir``: the final weights (safetensors, unwrapped names),
the resolved config, the summary, the loss plot, and what reloading needs (``Job.save_extra``:
tokenizer, label map, exports). Every file is written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from gradtune.config import Config
from gradtune.jobs.job import Job
from gradtune.loop.fit import Result
from gradtune.models.weights import save_state
from gradtune.runtime import distributed
from gradtune.runtime.atomic import write_text
from gradtune.telemetry.plots import plot_losses


def save_outputs(job: Job, cfg: Config, result: Result, out_dir: Path) -> None:
    state = distributed.full_state_dict(job.model)  # collective under FSDP; {} except on rank 0
    if not distributed.is_main():
        return
    save_state(state, out_dir / "model.safetensors", metadata={"config_hash": cfg.hash()})
    write_text(out_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if job.save_extra is not None:  # what reloading needs beside the weights (tokenizer, labels)
        job.save_extra(out_dir)
    summary = {"steps": result.steps, "epochs": result.epochs, "stop_reason": result.stop_reason,
               "train_loss": result.train_loss, "val_loss": result.val_loss, "metrics": result.metrics,
               "wall_time_s": result.wall_time, "job": job.info}
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    if cfg.plot and any(r.get("kind") == "eval" for r in result.history):
        plot_losses(result.history, out_dir / "loss.png", title=f"{cfg.model} on {Path(cfg.data).name}",
                    optimum=job.info.get("closed_form_loss"))
