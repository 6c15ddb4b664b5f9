"""Which components a run has, in the order they hear each event. The list is a function of
the config and the job alone, so ``--dry-run`` prints it and run.json records it before the
first step. Order matters where two components touch one thing: the progress display reports an
evaluation before the plateau schedule notes its cut; the row gets update ratios, the noise
scale and throughput in that order; the user's callbacks (and early stopping) come last."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from gradtune.config import Config
from gradtune.data.sampler import Sampler, make_sampler
from gradtune.jobs.job import Job
from gradtune.loop.callbacks import Callback
from gradtune.loop.components import Component, Events
from gradtune.loop.instruments import ProgressDisplay, TensorBoard, Throughput, UpdateRatios
from gradtune.loop.loss_scale import LossScaler
from gradtune.loop.noise_scale import NoiseScaleMeter
from gradtune.loop.plateau import PlateauSchedule
from gradtune.loop.run_hooks import AllocatorPolicy, Audit, TestProbe
from gradtune.loop.time_budget import TimeBudget
from gradtune.loop.trackers import Tracker
from gradtune.runtime import allocator, distributed, testhooks


def components(
    job: Job, cfg: Config, out_dir: Optional[Path], total: int, split: bool, started: Optional[float] = None
) -> list[Component]:
    """The run's components. ``total``: the config's step total; ``split``: micro-batches are
    smaller than the batch (the noise scale needs two batch sizes per step)."""
    main = distributed.is_main()
    found: list[Component] = []
    if main and cfg.progress != "off":
        found.append(ProgressDisplay(cfg.progress))
    if cfg.max_time:
        found.append(TimeBudget(cfg, started, total))
    found.append(UpdateRatios())
    if cfg.noise_scale and split and not distributed.active():
        found.append(NoiseScaleMeter(job.unit))
    if job.unit == "tokens":
        found.append(Throughput())
    if cfg.schedule == "plateau":
        found.append(PlateauSchedule(cfg))
    lengths = getattr(job.train, "lengths", None)
    if lengths is not None and allocator.armed():
        found.append(AllocatorPolicy(lengths, getattr(job.train, "pad_multiple", 1)))
    if job.at_start is not None or job.after_first_step is not None:
        found.append(Audit())
    if main and testhooks.probe_dir() is not None:
        found.append(TestProbe())
    if main and out_dir is not None and "tensorboard" in cfg.log_to:
        found.append(TensorBoard(out_dir))
    if main and out_dir is not None:  # experiment trackers: rank 0 logs, as it writes metrics.jsonl
        found.extend(Tracker(name, out_dir, cfg) for name in ("mlflow", "wandb") if name in cfg.log_to)
    if cfg.precision == "fp16":  # last: its stop (scale under the floor) ends a step the others have heard
        found.append(LossScaler())
    return found


def step_total(cfg: Config, sampler: Sampler) -> int:
    """The config's own step total: epochs (the sampler's steps for them: a batch ramp's small
    steps make more), capped by max_steps (max_time may lower it later)."""
    by_epochs = sampler.total_steps(cfg.epochs)
    return by_epochs if cfg.max_steps is None else min(cfg.max_steps, by_epochs)


def planned(job: Job, cfg: Config, out_dir: Optional[Path], callbacks: list[Callback]) -> list[str]:
    """The component list a run of ``job`` would have, without building the loop (--dry-run)."""
    sampler = make_sampler(job, cfg)
    found = components(job, cfg, out_dir, step_total(cfg, sampler), sampler.micro < sampler.batch)
    return Events([*found, *callbacks], distributed.is_main()).describe()
