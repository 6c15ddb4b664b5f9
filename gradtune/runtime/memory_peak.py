"""A process's memory, now and at its peak, in bytes: the budget evaluation chunks are sized to.

CPU: the resident set (``/proc/self/statm``) now, and its high-water mark since the process
started (``getrusage``'s ``ru_maxrss``: KiB on Linux, bytes on macOS). The high-water mark is
what ``/usr/bin/time -v`` reports as "Maximum resident set size", so a run's training peak and a
later ``gradtune eval``'s peak are compared in the same unit. CUDA: the caching allocator's
bytes in tensors now and at peak (``torch.cuda.memory_allocated`` / ``max_memory_allocated``).
None where it cannot be read (no ``/proc``, other devices).
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Optional

import torch


def peak_bytes(device: torch.device) -> Optional[int]:
    """The process's peak memory on ``device`` so far."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type != "cpu":
        return None
    kib_or_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kib_or_bytes if sys.platform == "darwin" else kib_or_bytes * 1024)


def current_bytes(device: torch.device) -> Optional[int]:
    """The process's memory on ``device`` now (CPU: resident pages, freed heap included)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        with open("/proc/self/statm") as f:
            resident = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident * os.sysconf("SC_PAGE_SIZE")
