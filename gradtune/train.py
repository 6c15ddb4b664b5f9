"""``train(cfg)``: build the job the config describes, run the one loop, write the outputs.

    job    = jobs.build(cfg)          every input validated, nothing written yet
    result = loop.fit(job, cfg, out)  resume, train, checkpoints, metrics.jsonl
    outputs.save_outputs(...)         weights, config, summary, plot, reload files
"""

from __future__ import annotations

from pathlib import Path

from gradtune.config import Config
from gradtune.jobs.registry import build
from gradtune.loop.fit import Result, fit
from gradtune.outputs import save_outputs
from gradtune.runtime import allocator, distributed
from gradtune.runtime.device import resolve_device


def train(cfg: Config) -> Result:
    """Build the job from ``cfg`` (validating every input first), train it, write the outputs."""
    job = build(cfg)  # all bad input is rejected here, before anything is written
    device = resolve_device(cfg.device)
    if getattr(job.train, "lengths", None) is not None and device.type == "cpu":
        allocator.release_large_blocks()  # variable batch shapes would fragment the heap
    out_dir = Path(cfg.out_dir)
    with distributed.session(device, cfg.dist_timeout):  # a no-op in one process
        result = fit(job, cfg, out_dir)
        save_outputs(job, cfg, result, out_dir)
    return result
