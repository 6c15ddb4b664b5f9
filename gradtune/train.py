"""``train(cfg)``: build the job the config describes, run the one loop, write the outputs.

job    = jobs.build(cfg)          every input validated, nothing written yet
cfg    = curvature.resolve(...)   lr/momentum "auto" -> numbers (the saved config holds them)
outdir.check(out_dir, inputs)     out_dir is gradtune's or new; no input where it writes
result = loop.fit(job, cfg, out)  claims out_dir; resume, train, checkpoints, metrics.jsonl
outputs.save_outputs(...)         weights, config, summary, plot, reload files
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Iterable, Optional

from gradtune.config import Config
from gradtune.jobs import curvature, precision
from gradtune.jobs.job import Job
from gradtune.jobs.registry import build
from gradtune.loop import budget
from gradtune.loop.fit import Result, fit, run_inputs
from gradtune.outputs import save_outputs
from gradtune.runtime import allocator, distributed, outdir
from gradtune.runtime.device import resolve_device
from gradtune.state import checkpoint


def train(cfg: Config, inputs: Iterable[str] = ()) -> Result:
    """Build the job from ``cfg`` (validating every input first), train it, write the outputs.
    ``inputs``: files read besides those ``cfg`` names (the config file), which the run must
    not overwrite either. ``max_time`` counts from process start for a fresh process (the CLI),
    else from here (loop/budget.py)."""
    started = budget.origin()
    job = build(cfg)  # all bad input is rejected here, before anything is written
    cfg = resolve_auto(job, cfg)
    out_dir = Path(cfg.out_dir)
    # Read-only, on every rank (a refusal on rank 0 alone would leave the others waiting); fit
    # checks again and claims the folder on rank 0 once resume is decided. Before the precision
    # probe: a refused out_dir is one line, with no probe run or told first.
    outdir.check(out_dir, [*run_inputs(cfg), *inputs])
    if cfg.precision == "auto" and cfg.resume != "never":  # a resumed run keeps its checkpoint's choice
        cfg = dataclasses.replace(cfg, precision=saved_precision(out_dir) or "auto")
    cfg = precision.resolve(job, cfg)  # precision auto -> fp32 | bf16, told at start
    device = resolve_device(cfg.device)
    if getattr(job.train, "lengths", None) is not None and device.type == "cpu":
        allocator.arm()  # applied once batch shapes vary: they would fragment the heap
    with distributed.session(device, cfg.dist_timeout):  # a no-op in one process
        result = fit(job, cfg, out_dir, callbacks=job.callbacks, started=started)
        save_outputs(job, cfg, result, out_dir)
    if "time_budget" in job.info and distributed.is_main():  # how max_time was spent, outputs included
        print(budget.describe(job.info["time_budget"], time.perf_counter() - started), flush=True)
    return result


def saved_precision(out_dir: Path) -> Optional[str]:
    """The precision the newest readable checkpoint in ``out_dir`` ran at (``precision: auto``
    chose it then; a probe now, on a busier machine or with the cache deleted, might not)."""
    for _, folder in reversed(checkpoint.listing(checkpoint.root(out_dir))):
        try:
            found = json.loads((folder / "config.json").read_text())["config"]["precision"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if found in ("fp32", "bf16"):
            return found
    return None


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
