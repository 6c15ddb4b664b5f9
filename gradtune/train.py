"""``train(cfg)``: build the job the config describes, run the one loop, write the outputs.

    job    = jobs.build(cfg)          every input validated, nothing written yet
    cfg    = curvature.resolve(...)   lr/momentum "auto" -> numbers (the saved config holds them)
    outdir.check(out_dir, inputs)     out_dir is gradtune's or new; no input where it writes
    result = loop.fit(job, cfg, out)  claims out_dir; resume, train, checkpoints, metrics.jsonl
    outputs.save_outputs(...)         weights, config, summary, plot, reload files
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from gradtune.config import Config
from gradtune.jobs import curvature
from gradtune.jobs.job import Job
from gradtune.jobs.registry import build
from gradtune.loop.fit import Result, fit, run_inputs
from gradtune.outputs import save_outputs
from gradtune.runtime import allocator, distributed, outdir
from gradtune.runtime.device import resolve_device


def train(cfg: Config, inputs: Iterable[str] = ()) -> Result:
    """Build the job from ``cfg`` (validating every input first), train it, write the outputs.
    ``inputs``: files read besides those ``cfg`` names (the config file), which the run must
    not overwrite either."""
    job = build(cfg)  # all bad input is rejected here, before anything is written
    cfg = resolve_auto(job, cfg)
    out_dir = Path(cfg.out_dir)
    # Read-only, on every rank (a refusal on rank 0 alone would leave the others waiting); fit
    # checks again and claims the folder on rank 0 once resume is decided.
    outdir.check(out_dir, [*run_inputs(cfg), *inputs])
    device = resolve_device(cfg.device)
    if getattr(job.train, "lengths", None) is not None and device.type == "cpu":
        allocator.release_large_blocks()  # variable batch shapes would fragment the heap
    with distributed.session(device, cfg.dist_timeout):  # a no-op in one process
        result = fit(job, cfg, out_dir)
        save_outputs(job, cfg, result, out_dir)
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
