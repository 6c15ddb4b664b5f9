"""The machine's peak matmul throughput, the denominator of model FLOPs utilisation (MFU).

CPUs vary too much for a table, so we measure once per machine (the best of several short square
matmul loops, about half a second in all: the best, because a busy moment only ever slows a
probe down) and cache the result; a run whose MFU comes out above 1 measures again (the cached
figure was taken at a busy moment). GPUs use their datasheet dense peaks.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from gradtune.runtime import cache
from gradtune.runtime.atomic import write_text

# Dense (no sparsity) peak FLOP/s by device-name fragment: (fp32/tf32, bf16).
GPU_PEAKS = {
    "H200": (494e12, 989e12),
    "H100": (494e12, 989e12),
    "A100": (156e12, 312e12),
    "L40S": (183e12, 362e12),
    "A10": (62.5e12, 125e12),
    "RTX 4090": (82.6e12, 165e12),
    "V100": (15.7e12, 125e12),
}


def _cache_file() -> Path:
    return cache.path("peak.json")


PROBES = 5  # short probes; the fastest is the machine's peak


def measure_cpu(dtype: torch.dtype, n: int = 1024, seconds: float = 0.5, probes: int = PROBES) -> float:
    """FLOP/s of an (n, n) @ (n, n) matmul: the best of ``probes`` loops of seconds / probes each."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(probes):
        reps, t0 = 0, time.perf_counter()
        while reps == 0 or time.perf_counter() - t0 < seconds / probes:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device, bf16: bool = False, remeasure: bool = False) -> float:
    """Peak FLOP/s for the dtype the matmuls run in (cached per machine, threads and dtype).
    ``remeasure``: measure again and keep the larger of the cached and the new figure."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for frag, (fp32, b16) in GPU_PEAKS.items():
            if frag in name:
                return b16 if bf16 else fp32
        return float("nan")
    cpu = platform.processor() or platform.machine()
    key = f"{platform.node()}|{cpu}|{torch.get_num_threads()}t|{'bf16' if bf16 else 'fp32'}"
    path = _cache_file()
    cache = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
    if key not in cache or remeasure:
        cache[key] = max(float(cache.get(key, 0.0)), measure_cpu(torch.bfloat16 if bf16 else torch.float32))
        try:
            write_text(path, json.dumps(cache, indent=1))
        except OSError:
            pass  # an unwritable cache only costs a re-measurement
    return float(cache[key])
