"""``fit(job, cfg, out_dir)``: the importable entry point of the loop, for objects built in
Python as for configs (``gradtune.train.train``). Resume is decided here, before anything is
written; the signal handlers that turn SIGTERM/SIGINT into a checkpoint are installed here.
``out_dir`` is claimed here too (``runtime/outdir.py``), so a library caller gets the same
protection as the CLI: never a foreign folder, never over one of the run's own inputs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from gradtune.config import Config
from gradtune.config.defaults import is_pretrained
from gradtune.data import fingerprint
from gradtune.jobs import precision
from gradtune.jobs.job import Job
from gradtune.loop.callbacks import Callback, from_spec
from gradtune.loop.early_stopping import EarlyStopping
from gradtune.loop.loop import Loop
from gradtune.runtime import distributed, outdir
from gradtune.runtime.device import cpu_threads, resolve_device
from gradtune.state import preempt, resume
from gradtune.telemetry.metrics_log import MetricsLog
from gradtune.telemetry.tensorboard import TensorBoardSink


@dataclass
class Result:
    steps: int
    epochs: float
    stop_reason: str
    train_loss: float  # loss of the last evaluation (epoch mean for SGD/mini-batch; exact for full)
    val_loss: Optional[float]
    metrics: dict[str, float]
    wall_time: float
    history: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Optional[Path] = None
    info: dict[str, Any] = field(default_factory=dict)  # the job's facts (closed-form loss, classes...)


def run_inputs(cfg: Config) -> list[str]:
    """The files and folders a run of ``cfg`` reads: none may lie where the run writes."""
    found = [str(fingerprint.data_path(cfg.data) or cfg.data), cfg.finetune.eval_data]
    if cfg.init != "random":
        found.append(cfg.init)
    if cfg.text.tokenizer not in ("byte", "char"):
        found.append(cfg.text.tokenizer)
    if is_pretrained(cfg.model):
        found.append(cfg.model)
    return [f for f in found if f]


def run_callbacks(cfg: Config, given: Optional[list[Callback]]) -> list[Callback]:
    """Yours (``fit(callbacks=...)``), then the config's (``callbacks:``), then early stopping."""
    found = list(given or []) + [from_spec(spec) for spec in cfg.callbacks]
    if cfg.early_stopping.enabled:
        found.append(EarlyStopping(cfg.early_stopping))
    return found


def fit(
    job: Job,
    cfg: Config,
    out_dir: Optional[Path] = None,
    callbacks: Optional[list[Callback]] = None,
    started: Optional[float] = None,
) -> Result:
    """Train ``job`` with ``cfg``; write metrics.jsonl and checkpoints under ``out_dir`` if given.

    With ``resume: auto`` a run finding a verified checkpoint in ``out_dir`` continues from it.
    Every check (which checkpoint, does the config match) happens before anything is written.
    ``callbacks``: your code at the loop's events (gradtune.loop.callbacks).
    ``started``: ``time.perf_counter()`` at which the ``max_time`` clock started (default: now).
    """
    started = time.perf_counter() if started is None else started
    cfg = precision.resolve(job, cfg)  # precision auto (train() has resolved it already)
    torch.manual_seed(cfg.seed)
    distributed.init(resolve_device(cfg.device), cfg.dist_timeout)
    inputs = run_inputs(cfg)
    if out_dir is not None:
        outdir.check(out_dir, inputs)  # every rank: a refusal must not leave the others waiting
        stamp = fingerprint.fingerprint(cfg.data)
        if stamp is not None:  # checkpoints record it (Loop.state_dict); resume compares
            job.info.setdefault("data_fingerprint", stamp)
    plan = resume.plan(cfg, out_dir, job)
    loop = Loop(job, cfg, out_dir, MetricsLog(None), run_callbacks(cfg, callbacks), started)
    if plan is not None:
        loop.restore(plan)
        if cfg.resume == "force":
            loop.finished = None  # forcing on (say with a lower lr) reopens a converged/diverged run
    # Only now is anything written, on rank 0: the folder claimed, old checkpoints, one log.
    if out_dir is not None and distributed.is_main():
        outdir.claim(out_dir, inputs)
        if plan is None and cfg.resume == "never":
            resume.discard(out_dir)
    main = distributed.is_main()
    sinks = [TensorBoardSink(out_dir / "tb")] if main and out_dir is not None and "tensorboard" in cfg.log_to else []
    loop.log = log = resume.open_log(out_dir, plan, sinks) if main else MetricsLog(None)
    t0 = time.perf_counter()
    try:
        with cpu_threads(job.model, loop.device), preempt.catch() as flag:
            loop.preempt = flag if out_dir is not None else None
            stop_reason, train_loss = loop.run()
        log.commit()  # a finished run replaces the old log even if it measured nothing
    finally:
        log.close()
        loop.probe.close()
    last = next((r for r in reversed(log.rows) if r.get("kind") == "eval"), {})
    metrics = {k: v for k, v in last.items() if k not in ("kind", "step", "epoch", "lr", "time")}
    result = Result(
        loop.step,
        loop.step / loop.sampler.steps_per_epoch,
        stop_reason,
        last.get("loss", train_loss),
        last.get("val_loss"),
        metrics,
        time.perf_counter() - t0,
        log.rows,
        out_dir,
        job.info,
    )
    loop.callbacks.end(result)  # early stopping puts the best weights back here
    return result
