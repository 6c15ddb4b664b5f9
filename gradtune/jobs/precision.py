"""``precision: auto``: bf16 autocast where it makes this model's training step faster here;
on a CUDA GPU without bf16 (before Ampere), fp16 autocast with its loss scale instead.

Decided by timing the model's own step (forward + backward on a real training batch), fp32 and
bf16 alternated, a few repeats each, median; the answer is cached per machine (CPU capability,
torch version, device name, threads) and model shape in ``<cache root>/precision.json``, so a
resumed run (or the next run of the same model) reads the same choice without probing again.
A probe taken while the CPU was busy (the 1-minute load at the core count or above, or the probe's
own threads running under CONTENDED of its wall time) is cached too, marked busy: later runs of the same shape
reuse it while the machine is still busy (a second busy probe would be no better, and costs as
much as a short run), and probe again once it is quiet, replacing it with the machine's answer.

Not probed, fp32:
    dtype float64           the run asked for exact float64 arithmetic
    no bf16 on the device   (CPU without AVX-512 BF16 / AMX kernels); a GPU without bf16 is
                            probed with fp16 in bf16's place (the same rules, "bf16" below)
    under TINY_PARAMS       autocast casts every matmul's inputs to bf16 and its output back:
                            on a small model those casts cost more than the faster matmul saves,
                            and the probe's own cost would dominate a short run
    under torchrun          every rank must take the same choice; a per-rank probe could differ
    a short run             under MIN_RUN_STEPS planned steps (epochs / max_steps; max_time runs
                            are probed): the probe costs about PROBE_COST_STEPS steps and bf16
                            saves at most a third of each step, so it cannot pay back
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import statistics
import time
from typing import Any, Optional

import torch

from gradtune.config import Config
from gradtune.jobs.job import Job
from gradtune.runtime import cache, distributed
from gradtune.runtime.atomic import write_text
from gradtune.runtime.device import autocast, resolve_device

TINY_PARAMS = 1_000_000  # below: fp32 without a probe (see the module docstring)
FASTER = 1.1  # bf16 must be this much faster (fp32 / bf16 step time): it also rounds more
# The probe's step has the run's own shape up to 8 x 256 tokens: a 2 x 128 probe of a small
# model measures autocast's per-op casts, not its matmuls, and can pick fp32 where the real
# step runs faster in bf16.
PROBE_BATCH = 8  # samples per probed step at most
PROBE_TOKENS = 256  # sequences cut to this many positions for the probe (B, T) -> (B, <= 256)
REPEATS = 3  # timed steps per precision (1 when a step takes over SLOW_STEP_S)
SLOW_STEP_S = 0.25
# One untimed and REPEATS timed steps in each precision: ~8 steps of the run's own size, every
# one of them forward + backward. bf16 saves at most ~1/3 of a step on the CPUs measured (1.4-1.6x),
# so a probe pays back after ~25 steps at best; under MIN_RUN_STEPS the run keeps fp32 unprobed.
PROBE_COST_STEPS = 2 * (1 + REPEATS)
MIN_RUN_STEPS = 200
# A probe whose threads got under this share of its wall time was timed on a shared machine (a
# quiet 2-core probe of the recipe measured 1.0; under a load of 10 on 2 cores, ~0.2). Probes
# shorter than JUDGED_S are not judged: too short for the process's CPU clock.
CONTENDED = 0.5
JUDGED_S = 0.05


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check()) if check is not None else False
    return False


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def cache_key(job: Job, device: torch.device, batch: dict[str, torch.Tensor]) -> str:
    """Machine (capability, torch, device, threads) | model shape | batch shape."""
    shapes = sorted((n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in job.model.named_parameters())
    shapes.append(sorted((k, tuple(v.shape)) for k, v in batch.items() if isinstance(v, torch.Tensor)))
    digest = hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]
    return (
        f"{torch.backends.cpu.get_cpu_capability()}|torch {torch.__version__}|{_device_name(device)}|"
        f"{torch.get_num_threads()}t|{digest}"
    )


def probe_batch(job: Job, cfg: Config) -> dict[str, torch.Tensor]:
    """The first PROBE_BATCH training samples (fewer when the micro-batch is smaller)."""
    size = cfg.micro_batch_size or (cfg.batch_size if cfg.batch_size != "full" else PROBE_BATCH)
    return job.train.get(torch.arange(min(len(job.train), size, PROBE_BATCH)))


def cut(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Token sequences (integer (B, T) tensors: ids, labels, masks) cut to PROBE_TOKENS positions."""
    ints = (torch.int64, torch.int32, torch.bool)
    return {
        k: v[:, :PROBE_TOKENS] if isinstance(v, torch.Tensor) and v.dim() == 2 and v.dtype in ints else v
        for k, v in batch.items()
    }


def _step_seconds(job: Job, batch: dict[str, Any], amp: Any, device: torch.device) -> float:
    t0 = time.perf_counter()
    with amp:
        out = job.objective(job.model, batch)
    out.loss_sum.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def half(device: torch.device) -> Optional[str]:
    """The half precision ``auto`` weighs against fp32 here: bf16 where the device has it, else
    fp16 on a CUDA GPU (its tensor cores; loss-scaled in the loop), else None."""
    if bf16_supported(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else None


def measure(job: Job, batch: dict[str, torch.Tensor], device: torch.device, low: str = "bf16") -> tuple[float, float]:
    """(median fp32 step seconds, median ``low`` (bf16 | fp16) step seconds): one untimed step each, then
    alternated pairs (the order swapped each repeat, so a slow moment hits both alike). The
    weights, buffers (batch-norm statistics), gradients and RNG come back as they were."""
    model = job.model.to(device)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    rng = torch.random.get_rng_state()
    was_training = model.training
    model.train()
    modes = {"fp32": autocast("fp32", device), "bf16": autocast(low, device)}
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    try:
        first = _step_seconds(job, batch, modes["fp32"], device) + _step_seconds(job, batch, modes["bf16"], device)
        repeats = REPEATS if first < 2 * SLOW_STEP_S else 1
        for r in range(repeats):
            for name in ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32"):
                times[name].append(_step_seconds(job, batch, modes[name], device))
    finally:
        for p in model.parameters():
            p.grad = None
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.random.set_rng_state(rng)
        model.train(was_training)
    return statistics.median(times["fp32"]), statistics.median(times["bf16"])


def _read() -> dict[str, Any]:
    try:
        found = json.loads(cache.path("precision.json").read_text())
        return found if isinstance(found, dict) else {}
    except (OSError, ValueError):
        return {}


def decide(job: Job, cfg: Config, device: torch.device) -> dict[str, Any]:
    """{"precision": "bf16" | "fp16" | "fp32", "why": ..., "ratio": fp32 / half step time or None}."""
    n = sum(p.numel() for p in job.model.parameters())
    if cfg.dtype == "float64":
        return {"precision": "fp32", "why": "dtype float64", "ratio": None}
    low = half(device)
    if low is None:
        return {"precision": "fp32", "why": f"no bf16 on {device.type}", "ratio": None}
    found = _decide(job, cfg, device, n, low)
    if low != "bf16" and found["precision"] == "bf16":  # the probe's slot named bf16 held fp16
        found = {**found, "precision": low}
    # The precision weighed against fp32 (the start-up line names it; an older cache entry has no "half").
    return {**found, "half": low}


def _decide(job: Job, cfg: Config, device: torch.device, n: int, low: str) -> dict[str, Any]:
    """``decide`` once a half precision ``low`` is available; "bf16" in the answer stands for it."""
    if n < TINY_PARAMS:
        return {"precision": "fp32", "why": f"{n:,} parameters: too small for {low} to pay", "ratio": None}
    if distributed.launched():
        choice = "bf16" if device.type == "cuda" else "fp32"
        return {"precision": choice, "why": "torchrun: no per-rank probe", "ratio": None}
    planned = planned_steps(job, cfg)
    if planned is not None and planned < MIN_RUN_STEPS:
        return {
            "precision": "fp32",
            "why": f"a {planned:,}-step run is too short for a probe (~{PROBE_COST_STEPS} steps) to pay; "
            f"precision={low} chooses {low}",
            "ratio": None,
        }
    batch = probe_batch(job, cfg)
    key = cache_key(job, device, batch)
    known = _read()
    busy = busy_cpu(device)  # read before the probe: its own threads would count as load
    cached = known.get(key)
    if isinstance(cached, dict) and cached.get("precision") in ("fp32", "bf16", "fp16"):
        if not cached.get("busy"):
            return {**cached, "why": "cached probe"}
        if busy:  # still busy: a new probe would be no better than the one kept
            return {**cached, "why": f"cached probe taken on a busy machine ({cached['busy']}); re-probed when quiet"}
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        fp32, bf16 = measure(job, cut(batch), device, low)
    except (RuntimeError, IndexError, ValueError):  # an objective that needs whole sequences
        fp32, bf16 = measure(job, batch, device, low)
    share = cpu_share(device, time.perf_counter() - t0, time.process_time() - cpu0)
    if share is not None and share < CONTENDED and not busy:
        busy = f"the probe ran {share:.0%} of the time on {torch.get_num_threads()} threads"
    ratio = fp32 / max(bf16, 1e-12)
    found = {
        "precision": low if ratio >= FASTER else "fp32",
        "ratio": round(ratio, 3),
        "fp32_s": fp32,
        "bf16_s": bf16,
        "probe_s": round(time.perf_counter() - t0, 3),
    }
    if share is not None:
        found["cpu_share"] = round(share, 2)
    if busy:  # kept, marked busy: reused while the machine stays busy, replaced once it is quiet
        found["busy"] = busy
    known[key] = found
    try:
        write_text(cache.path("precision.json"), json.dumps(known, indent=1))
    except OSError:
        pass  # an unwritable cache only costs a probe next time
    said = f", busy: {busy}; probed again when quiet" if busy else ""
    return {**found, "why": f"probe {found['probe_s']:.2g} s{said}"}


def planned_steps(job: Job, cfg: Config) -> int | None:
    """The run's step count from epochs / max_steps, or None when max_time fixes it (later)."""
    if cfg.max_time is not None:
        return None
    n = len(job.train)
    per_epoch = 1 if cfg.batch_size == "full" else -(-n // max(1, min(int(cfg.batch_size), max(n, 1))))
    total = cfg.epochs * per_epoch
    return total if cfg.max_steps is None else min(cfg.max_steps, total)


def busy_cpu(device: torch.device) -> str:
    """Why a CPU probe now is not the machine's answer ('' when it is): other processes are
    using the cores (1-minute load at least the core count), so fp32 and bf16 were timed
    on a share of the machine that may never recur; cached, one bad probe would decide every
    later run of this model."""
    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0]
    return f"load {load:.1f} on {cores} cores" if load >= cores else ""


def cpu_share(device: torch.device, wall: float, cpu: float) -> float | None:
    """The share of its wall time the probe's threads ran (CPU seconds / (wall seconds x threads));
    under CONTENDED, other processes took the cores during the probe, which the load average
    misses (it lags by a minute: a neighbour starting with the probe leaves it low)."""
    if device.type != "cpu" or wall < JUDGED_S:
        return None
    return cpu / (wall * torch.get_num_threads())


def resolve(job: Job, cfg: Config, device: Optional[torch.device] = None) -> Config:
    """``cfg`` with ``precision: auto`` replaced by the choice (kept in ``job.info["precision"]``,
    told in one line at start); any other precision comes back as it is. ``device``: the run's,
    when already resolved."""
    if cfg.precision != "auto":
        return cfg
    found = decide(job, cfg, device if device is not None else resolve_device(cfg.device))
    job.info["precision"] = found
    if distributed.is_main():
        low = found.get("half", "bf16")  # what the probe timed against fp32: bf16, or fp16 on a GPU without bf16
        ratio = f", {low} step {found['ratio']:.2f}x as fast as fp32" if found.get("ratio") else ""
        print(f"precision auto: {found['precision']} ({found['why']}{ratio})", flush=True)  # stdout, like lr: auto
    return dataclasses.replace(cfg, precision=found["precision"])
