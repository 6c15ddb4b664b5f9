"""One resolved run, built once and checked once: ``RunSetup``.

``train()`` builds it after the job (``jobs.build`` has read and validated every input) and
hands it to ``fit()``; ``fit()`` called alone builds it itself. Building it resolves, once each,

    inputs      the files the run reads (``run_inputs``): none may lie where it writes
    out_dir     gradtune's own folder or a new one (``outdir.check``, read-only, every rank)
    callbacks   yours, the config's (imported now: a typo is one line), early stopping
    monitor     ``early_stopping.monitor`` (and the plateau schedule's) is a metric this job logs
    precision   ``auto`` -> fp32 | bf16 | fp16 (a resumed run keeps its checkpoint's choice);
                fp16 off a CUDA GPU is refused
    device      and the process group under torchrun
    resume      the checkpoint to continue from, with its config and data checked
    trackers    each ``log_to`` tracker's package is installed (find_spec: nothing imported)

and refuses (``GradtuneError``) before anything is written: a rejected run leaves every folder
byte-identical. The memory check runs earlier still, in ``jobs.build``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from gradtune.config import Config
from gradtune.config.defaults import is_pretrained
from gradtune.data import fingerprint
from gradtune.jobs import precision
from gradtune.jobs.job import Job
from gradtune.loop.callbacks import Callback, from_spec
from gradtune.loop.early_stopping import ALIASES, EarlyStopping
from gradtune.runtime import allocator, distributed, lock, outdir, testhooks
from gradtune.runtime.device import resolve_device
from gradtune.runtime.errors import GradtuneError
from gradtune.state import checkpoint, resume
from gradtune.telemetry import trackers


@dataclass
class RunSetup:
    cfg: Config  # resolved: precision chosen (lr/momentum auto are resolved by train() before)
    device: torch.device  # this rank's device, the process group joined
    out_dir: Optional[Path]  # None: nothing written (a library call without a folder)
    inputs: list[str]  # what the run reads: never written over
    resume: Optional[resume.Plan]  # the checkpoint to continue from; None: fresh
    callbacks: list[Callback] = field(default_factory=list)  # instances, in dispatch order
    started: float = 0.0  # perf_counter() of the max_time clock's zero
    owns_group: bool = False  # this setup joined the process group: close() leaves it
    lease: Optional[lock.Lease] = None  # rank 0's hold on out_dir (one run per folder)

    @property
    def precision(self) -> str:
        return self.cfg.precision

    def close(self) -> None:
        """Give out_dir's lock back and leave the process group this setup joined (a no-op in one
        process)."""
        lock.release(self.lease)
        self.lease = None
        if self.owns_group:
            distributed.shutdown()
            self.owns_group = False


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


def check_monitor(job: Job, cfg: Config) -> None:
    """The metric early stopping and the plateau schedule watch must be one this job logs."""
    if not (cfg.early_stopping.enabled or cfg.schedule == "plateau"):
        return
    monitor = cfg.early_stopping.monitor
    logged = job.logged()
    if ALIASES.get(monitor, monitor) not in logged:
        hint = "" if job.val is not None else "; validation metrics need val_fraction > 0"
        raise GradtuneError(
            f"early_stopping.monitor '{monitor}' is not measured by this run (it logs {', '.join(logged)}{hint})"
        )


def check_fp16(cfg: Config, device: torch.device) -> None:
    """fp16 runs on CUDA GPUs only: a CPU has no fast fp16 matmuls (bf16 is the half precision
    there), so it is refused rather than probed. The test hook GRADTUNE_TEST_FP16 lets the loss
    scale run on CPU (in fp32: runtime/device.autocast)."""
    if cfg.precision != "fp16" or device.type == "cuda" or testhooks.fp16_on_cpu():
        return
    raise GradtuneError(
        f"precision=fp16 needs a CUDA GPU (device is {device.type}); use precision=bf16 or precision=fp32 here"
    )


def saved_precision(out_dir: Path) -> Optional[str]:
    """The precision the newest readable checkpoint in ``out_dir`` ran at (``precision: auto``
    chose it then; a probe now, on a busier machine or with the cache deleted, might not)."""
    for _, folder in reversed(checkpoint.listing(checkpoint.root(out_dir))):
        try:
            found = json.loads((folder / "config.json").read_text())["config"]["precision"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if found in ("fp32", "bf16", "fp16"):
            return found
    return None


def prepare(
    job: Job,
    cfg: Config,
    out_dir: Optional[Path] = None,
    inputs: Iterable[str] = (),
    callbacks: Optional[list[Callback]] = None,
    started: Optional[float] = None,
    hold: bool = True,
) -> RunSetup:
    """Resolve and check the run (module docstring); writes nothing but, once every check has
    passed, out_dir's lock file (``hold``; a dry run holds nothing): a second process is refused
    there, naming the holder. ``inputs``: files read besides those ``cfg`` names (the config file)."""
    started = time.perf_counter() if started is None else started
    found_inputs = [*run_inputs(cfg), *inputs]
    trackers.require(cfg.log_to)  # a tracker's missing package: one line now, not after the first step
    if out_dir is not None:  # every rank: a refusal on rank 0 alone would leave the others waiting
        outdir.check(out_dir, found_inputs)
    found_callbacks = run_callbacks(cfg, [*(callbacks or []), *job.callbacks])  # the job's own too (RL's clock)
    check_monitor(job, cfg)
    device = resolve_device(cfg.device)
    if cfg.precision == "auto" and cfg.resume != "never" and out_dir is not None:
        cfg = dataclasses.replace(cfg, precision=saved_precision(out_dir) or "auto")
    cfg = precision.resolve(job, cfg, device)  # precision auto -> fp32 | bf16 | fp16, told at start
    check_fp16(cfg, device)
    if getattr(job.train, "lengths", None) is not None and device.type == "cpu":
        allocator.arm()  # applied once batch shapes vary: they would fragment the heap
    owns = distributed.launched() and not torch.distributed.is_initialized()
    device = distributed.init(device, cfg.dist_timeout)
    try:
        if out_dir is not None:
            stamp = fingerprint.fingerprint(cfg.data)
            if stamp is not None:  # checkpoints record it (Loop.state_dict); resume compares
                job.info.setdefault("data_fingerprint", stamp)
        plan = resume.plan(cfg, out_dir, job)
        lease = lock.acquire(out_dir) if hold and out_dir is not None and distributed.is_main() else None
    except BaseException:
        if owns:
            distributed.shutdown()
        raise
    return RunSetup(cfg, device, out_dir, found_inputs, plan, found_callbacks, started, owns, lease)


def describe(setup: RunSetup, components: list[str]) -> dict[str, Any]:
    """run.json (beside config.yaml) and ``--dry-run``: what was resolved and which components
    the run has."""
    plan = setup.resume
    return {
        "device": str(setup.device),
        "precision": setup.precision,
        "world_size": distributed.world_size(),
        "out_dir": str(setup.out_dir) if setup.out_dir is not None else None,
        "inputs": setup.inputs,
        "resume": plan.folder.name if plan is not None else None,
        "components": components,
    }
