"""``train(cfg)``: build the job the config describes, run the one loop, write the outputs.

job    = jobs.build(cfg)             every input validated, nothing written yet
cfg    = curvature.resolve(...)      lr/momentum "auto" -> numbers (the saved config holds them)
setup  = run_setup.prepare(...)      out_dir, callbacks, monitor, precision, device, process
                                     group, resume: resolved and checked once, nothing written
result = loop.fit(job, setup=setup)  claims out_dir; run.json; resume, train, checkpoints, metrics.jsonl
outputs.save_outputs(...)            weights, config, summary, plot, reload files
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

from gradtune.config import Config
from gradtune.jobs import curvature
from gradtune.jobs.job import Job
from gradtune.jobs.registry import build
from gradtune.loop import budget
from gradtune.loop.fit import Result, fit
from gradtune.loop.run_setup import RunSetup, prepare, saved_precision
from gradtune.outputs import save_outputs
from gradtune.runtime import distributed

__all__ = ["resolve_auto", "saved_precision", "setup_run", "train"]


def setup_run(cfg: Config, inputs: Iterable[str] = (), hold: bool = True) -> tuple[Job, RunSetup]:
    """The job and the resolved run of ``cfg``, every check passed, nothing written but out_dir's
    lock (``hold``; ``gradtune train --dry-run`` stops here, holding nothing)."""
    started = budget.origin()
    job = build(cfg)  # all bad input is rejected here, before anything is written
    cfg = resolve_auto(job, cfg)
    return job, prepare(job, cfg, Path(cfg.out_dir), inputs, started=started, hold=hold)


def train(cfg: Config, inputs: Iterable[str] = ()) -> Result:
    """Build the job from ``cfg`` (validating every input first), train it, write the outputs.
    ``inputs``: files read besides those ``cfg`` names (the config file), which the run must
    not overwrite either. ``max_time`` counts from process start for a fresh process (the CLI),
    else from here (loop/budget.py)."""
    job, setup = setup_run(cfg, inputs)
    try:
        result = fit(job, setup.cfg, setup.out_dir, setup=setup)
        save_outputs(job, setup.cfg, result, setup.out_dir, setup.inputs)
    finally:
        setup.close()
    if "time_budget" in job.info:  # one total for the run, outputs included (train command's end line)
        used = time.perf_counter() - setup.started
        job.info["time_budget"]["used_s"] = round(used, 3)
        if distributed.is_main():
            print(budget.describe(job.info["time_budget"], used), flush=True)
    return result


def resolve_auto(job: Job, cfg: Config) -> Config:
    """``cfg`` with ``lr: auto`` / ``momentum: auto`` replaced by the numbers the loss's curvature
    gives (jobs/curvature.py), told in one line and kept in ``job.info["lr_auto"]``. The run, its
    config.yaml and its checkpoints then hold the numbers; a resume resolves again from the same
    data to the same numbers, so its config matches. A config without auto comes back as it is."""
    resolved, info = curvature.resolve(job, cfg)
    if info is not None:
        job.info["lr_auto"] = info
        if distributed.is_main():
            print(curvature.describe(info), flush=True)
    return resolved
