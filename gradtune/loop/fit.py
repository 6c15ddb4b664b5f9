"""``fit(job, cfg, out_dir)``: the importable entry point of the loop, for objects built in
Python as for configs (``gradtune.train.train``). Everything that can refuse the run is
resolved and checked first, in a ``RunSetup`` (loop/run_setup.py: train() builds it and passes
it; fit builds it when called alone); only then is anything written. ``out_dir`` is claimed here
(``runtime/outdir.py``), so a library caller gets the same protection as the CLI: never a
foreign folder, never over one of the run's own inputs. The signal handlers that turn
SIGTERM/SIGINT into a checkpoint are installed here."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from gradtune.config import Config
from gradtune.jobs.job import Job
from gradtune.loop.callbacks import Callback
from gradtune.loop.loop import Loop
from gradtune.loop.run_setup import RunSetup, describe, prepare
from gradtune.runtime import distributed, outdir
from gradtune.runtime.atomic import write_text
from gradtune.runtime.device import cpu_threads
from gradtune.runtime.memory_peak import peak_bytes
from gradtune.state import preempt, resume
from gradtune.telemetry.metrics_log import MetricsLog


@dataclass
class Result:
    steps: int
    epochs: float
    stop_reason: str
    train_loss: float  # loss of the last evaluation (mean since the previous one for SGD/mini-batch; exact for full)
    val_loss: Optional[float]
    metrics: dict[str, float]
    wall_time: float
    history: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Optional[Path] = None
    info: dict[str, Any] = field(default_factory=dict)  # the job's facts (closed-form loss, classes...)


def fit(
    job: Job,
    cfg: Config,
    out_dir: Optional[Path] = None,
    callbacks: Optional[list[Callback]] = None,
    started: Optional[float] = None,
    setup: Optional[RunSetup] = None,
) -> Result:
    """Train ``job`` with ``cfg``; write metrics.jsonl and checkpoints under ``out_dir`` if given.

    With ``resume: auto`` a run finding a verified checkpoint in ``out_dir`` continues from it.
    Every check (which checkpoint, does the config match, do the callbacks import, is the
    monitored metric logged) happens before anything is written.
    ``callbacks``: your code at the loop's events (gradtune.loop.callbacks).
    ``started``: ``time.perf_counter()`` at which the ``max_time`` clock started (default: now).
    ``setup``: the resolved run from ``train()`` (then ``cfg``, ``out_dir``, ``callbacks`` and
    ``started`` are its own).
    """
    own = setup is None
    if setup is None:
        setup = prepare(job, cfg, out_dir, (), callbacks, started)
    try:
        return _fit(job, setup)
    finally:
        if own:
            setup.close()


def _fit(job: Job, setup: RunSetup) -> Result:
    cfg, out_dir, plan = setup.cfg, setup.out_dir, setup.resume
    torch.manual_seed(cfg.seed)
    loop = Loop(job, cfg, out_dir, MetricsLog(None), setup.callbacks, setup.started, setup.device)
    if plan is not None:
        loop.restore(plan)
        if cfg.resume == "force":
            loop.finished = None  # forcing on (say with a lower lr) reopens a converged/diverged run
    # Only now is anything written, on rank 0: the folder claimed, old checkpoints, one log.
    main = distributed.is_main()
    if out_dir is not None and main:
        outdir.claim(out_dir, setup.inputs, checked=True)  # RunSetup checked it, on every rank
        if plan is None and cfg.resume == "never":
            resume.discard(out_dir)
        write_text(out_dir / "run.json", json.dumps(describe(setup, loop.component_names()), indent=2) + "\n")
    sinks = [c.log_sink() for c in loop.events.all if hasattr(c, "log_sink")] if main else []
    loop.log = log = resume.open_log(out_dir, plan, sinks) if main else MetricsLog(None)
    t0 = time.perf_counter()
    grace = cfg.dist_timeout if distributed.active() else None  # a rank stuck past a signal (state/preempt.py)
    try:
        with cpu_threads(job.model, loop.device), preempt.catch(grace) as flag:
            loop.preempt = flag if out_dir is not None else None
            stop_reason, train_loss = loop.run()
        log.commit()  # a finished run replaces the old log even if it measured nothing
        # The budget `gradtune eval` sizes its chunks to (loop/eval_chunk.room_for_run).
        peak = peak_bytes(loop.device)
        if peak is not None:
            job.info["memory"] = {"train_peak_bytes": peak, "device": loop.device.type}
    finally:
        log.close()
        loop.events.close()
    last = next((r for r in reversed(log.rows) if r.get("kind") == "eval"), {})
    metrics = {k: v for k, v in last.items() if k not in ("kind", "step", "epoch", "lr", "time")}
    result = Result(
        loop.step,
        loop.sampler.epochs_done(loop.step),
        stop_reason,
        last.get("loss", train_loss),
        last.get("val_loss"),
        metrics,
        time.perf_counter() - t0,
        log.rows,
        out_dir,
        job.info,
    )
    loop.events.emit("on_train_end", result)  # early stopping puts the best weights back here
    return result
