"""Where and how a run computes: the device, bf16 / fp16 autocast, CPU threads for tiny models."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

_RESOLVED: dict[str, torch.device] = {}  # name -> device: the answer cannot change within a process


def _resolve(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; otherwise the named device. Resolved
    once per process and name: the memory preflight, the run setup and the loop ask the same."""
    found = _RESOLVED.get(name)
    if found is None:
        found = _RESOLVED[name] = _resolve(name)
    return found


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for matmuls when ``precision == "bf16"``, fp16 autocast for ``"fp16"`` on a GPU
    (the loop's dynamic loss scale keeps its gradients in range: loop/loss_scale.py); a no-op
    context otherwise. fp16 reaches a CPU only under the test hook GRADTUNE_TEST_FP16 (the run
    setup refuses it there), and computes in fp32: the loss scale's logic is tested without a GPU."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16" and device.type != "cpu":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def cpu_threads(model: nn.Module, device: torch.device) -> Iterator[None]:
    """One intra-op thread for tiny models on CPU: splitting a (32, 5) matmul across cores costs
    more in synchronisation than it saves (and stalls badly when other processes share the
    cores). Restored afterwards."""
    before = torch.get_num_threads()
    tiny = device.type == "cpu" and sum(p.numel() for p in model.parameters()) < 100_000
    if tiny:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if tiny:
            torch.set_num_threads(before)
