"""What a finished run leaves in ``out_dir``: the final weights (safetensors, unwrapped names),
the resolved config, the summary, the loss plot, and what reloading needs (``Job.save_extra``:
tokenizer, label map, exports). Every file is written atomically: a run that fails while writing
leaves the previous run's file whole, never a truncated one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import yaml

from gradtune.config import Config
from gradtune.data.fingerprint import data_name
from gradtune.jobs import trained_only
from gradtune.jobs.job import Job
from gradtune.loop.fit import Result
from gradtune.loop.run_setup import run_inputs
from gradtune.models.weights import save_state
from gradtune.runtime import distributed, outdir
from gradtune.runtime.atomic import write_text
from gradtune.telemetry import mlflow_sink
from gradtune.telemetry.plots import plot_losses
from gradtune.telemetry.report import write_report


def _save_extra(job: Job, out_dir: Path) -> None:
    """``job.save_extra`` writes into an empty staging folder; each file or folder it made then
    replaces its old version in one rename (a tokenizer folder, an export: never half old)."""
    if job.save_extra is None:
        return
    stage = out_dir / f".tmp-extra-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        job.save_extra(stage)
        for item in sorted(stage.iterdir()):
            outdir.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def save_outputs(job: Job, cfg: Config, result: Result, out_dir: Path, claimed: Optional[Sequence[str]] = None) -> None:
    """``claimed``: the run's inputs when fit() has claimed ``out_dir`` for this run already
    (train()); else the folder is claimed now (refused if it is not gradtune's)."""
    state = distributed.full_state_dict(job.model)  # collective under FSDP; {} except on rank 0
    if not distributed.is_main():
        return
    if claimed is None:
        outdir.claim(out_dir, run_inputs(cfg))
    state, base = trained_only.select(job.model, cfg, state)  # LoRA/head/BitFit: the trained tensors + base
    save_state(state, out_dir / "model.safetensors", metadata={"config_hash": cfg.hash(), **base})
    write_text(out_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    _save_extra(job, out_dir)  # what reloading needs beside the weights (tokenizer, labels)
    summary = {
        "steps": result.steps,
        "epochs": result.epochs,
        "stop_reason": result.stop_reason,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "metrics": result.metrics,
        "wall_time_s": result.wall_time,
        "job": job.info,
    }
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    if cfg.plot and any(r.get("kind") == "eval" for r in result.history):
        plot_losses(
            result.history,
            out_dir / "loss.png",
            title=f"{cfg.model} on {data_name(cfg.data)}",
            optimum=job.info.get("closed_form_loss"),
        )
    if cfg.plot:  # read back from the files just written, as for any finished run
        write_report(out_dir)
    if "mlflow" in job.info.get("trackers", {}):  # the files just written, as the MLflow run's artifacts
        mlflow_sink.upload(out_dir, job.info["trackers"]["mlflow"])
