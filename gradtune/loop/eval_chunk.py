"""How many samples one evaluation forward takes: the largest chunk whose memory fits a budget.

Evaluation runs under ``no_grad``: a forward keeps no activations for a backward, so its peak is
about one layer's working set, where a training step keeps every layer's. A chunk several times
the training batch then fits in the memory training already used. The chunk is chosen from two
probe forwards (``probe``): one sample and two copies of it (the longest sample, so every later
chunk, padded to its own longest, needs no more per sample), whose peak bytes differ by one
sample's activations:

    per_sample = peak(2) - peak(1)        fixed = peak(1) - per_sample
    chunk      = largest c with fixed + c * per_sample <= room, in [1, n]

``room`` is the memory the evaluation may add:

- in training, a training micro-batch's activations, measured by the same probe with gradients
  on (``room_in_training``): the evaluation reuses the memory the step freed, so the run's peak
  is its training peak;
- for ``gradtune eval`` of a finished run, the training peak recorded in summary.json
  (``job.memory.train_peak_bytes``) minus what the eval process holds now (``room_for_run``).

How peaks are read: on CUDA the caching allocator's own count (``max_memory_allocated``, reset
before each probe). On the CPU nothing counts tensor bytes, and the resident set is no measure
of one forward (freed heap stays resident; its high-water mark only rises past the old peak), so
``LiveBytes`` counts them itself: every tensor an aten op returns in new storage, from creation
until its last Python reference dies, exactly, whatever the allocator does and whatever else
runs on the machine.

On the CPU a larger chunk is not a faster one: past a few MiB per operation the activations
leave the core's cache and the elementwise operations (norms, rotary, activations) wait on
memory. The chunk is capped there at ``CPU_CHUNK_BYTES`` of activations (README: measured).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from gradtune.data.dataset import Dataset
from gradtune.jobs.job import Job
from gradtune.loop.gradient import to_device
from gradtune.objectives.output import Objective
from gradtune.runtime import distributed
from gradtune.runtime.memory_peak import current_bytes

# CPU: activation bytes per evaluation chunk at most (the probe's per-sample bytes times the
# chunk). Measured on 2 AVX-512 cores with 2 MiB of L2 each: a GPT window chunk of 4 (~9 MiB)
# took 0.64 s per 64 windows, 64 of them 0.91 s; MiniLM, 16 texts 1.24 s, 256 texts 3.1 s.
CPU_CHUNK_BYTES = 16 << 20


class LiveBytes(TorchDispatchMode):
    """Bytes of tensors created under it and still alive: ``now``, and ``peak`` since entry.

    An op's output whose storage is not one of its inputs' is new memory; a view or in-place
    result shares an input's storage and adds a reference to it (the storage lives while any of
    its tensors does). Storage the mode did not see created (weights, the batch) is not counted."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Not wrapped in dynamo's "disable": that wrapper imports torch._dynamo at the first op
        # (1.3 s and 85 MB of resident memory), and nothing here is ever compiled.
        return False

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, live tensors]
        self.now = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.layout == torch.strided
        }
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self._track(t, inputs)
        return out

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        entry = self.live.get(key)
        if entry is None:
            if key == 0 or key in inputs:  # empty, or a view of memory from before the mode
                return
            entry = self.live[key] = [storage.nbytes(), 0]
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        weakref.finalize(t, self._drop, key)

    def _drop(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self.live[key]
            self.now -= entry[0]


@dataclass
class Probe:
    """Evaluation memory of one chunk of c samples: ``fixed + c * per_sample`` bytes."""

    fixed: int
    per_sample: int


def _peak(run: Any, device: torch.device) -> int:
    """Peak bytes ``run()`` adds while it runs (and what it returns lives)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        kept = run()
        torch.cuda.synchronize(device)
        del kept
        return int(torch.cuda.max_memory_allocated(device) - base)
    with LiveBytes() as live:
        kept = run()
        del kept
    return live.peak


def probe(
    model: nn.Module,
    objective: Objective,
    data: Dataset,
    device: torch.device,
    amp: contextlib.AbstractContextManager,
    grad: bool = False,
) -> Probe:
    """Bytes of one and two copies of ``data``'s longest sample through ``objective`` (under
    ``no_grad`` unless ``grad``: then what a training micro-batch keeps for its backward)."""
    lengths = getattr(data, "lengths", None)
    longest = int(torch.argmax(lengths)) if lengths is not None and len(lengths) else 0
    was_training = model.training
    model.eval()  # no dropout masks: the figures are a lower bound of a training step's

    def one(n: int) -> int:
        batch = to_device(data.get(torch.full((n,), longest, dtype=torch.long)), device)

        def run() -> Any:
            with torch.set_grad_enabled(grad), amp:
                return objective(model, batch).loss_sum

        return _peak(run, device)

    try:
        p1, p2 = one(1), one(2)
    finally:
        model.train(was_training)
    per = max(p2 - p1, 1)
    return Probe(max(p1 - per, 0), per)


def choose(room: Optional[float], found: Probe, n: int, device: torch.device) -> int:
    """The largest chunk of ``found``'s bytes within ``room`` (None: no limit), at least 1 and at
    most ``n`` samples; on the CPU also within CPU_CHUNK_BYTES of activations."""
    fit = n if room is None else int((room - found.fixed) // found.per_sample)
    if device.type == "cpu":
        fit = min(fit, CPU_CHUNK_BYTES // found.per_sample)
    return max(1, min(n, fit))


def room_in_training(
    model: nn.Module,
    objective: Objective,
    data: Dataset,
    micro: int,
    device: torch.device,
    amp: contextlib.AbstractContextManager,
) -> int:
    """Bytes a training micro-batch of ``micro`` samples of ``data`` keeps for its backward."""
    found = probe(model, objective, data, device, amp, grad=True)
    return found.fixed + micro * found.per_sample


def room_for_run(info: dict[str, Any], device: torch.device) -> Optional[float]:
    """What ``gradtune eval`` may add on ``device``: the run's recorded training peak minus what
    this process holds now; None when the run recorded none (then no memory limit applies) or
    recorded it for another device type."""
    mem = info.get("memory") or {}
    peak, now = mem.get("train_peak_bytes"), current_bytes(device)
    if peak is None or now is None or mem.get("device") != device.type:
        return None
    return float(peak) - now


# Tasks whose objective is a plain forward (preference runs hold a reference model, RL samples
# completions inside its objective: neither is probed, they keep the training batch).
PROBED = ("regression", "classification", "lm")


def for_training(
    job: Job, micro: int, device: torch.device, amp: contextlib.AbstractContextManager, fallback: int
) -> int:
    """The in-training evaluation chunk: ``choose`` within a training micro-batch's activations
    (``room_in_training``). ``fallback`` (the training batch rule) where there is nothing to
    choose (validation fits one such chunk), the task is not PROBED, or ranks would have to agree
    on a measurement (torchrun)."""
    val = job.val
    if val is None or len(val) <= fallback or job.task not in PROBED or distributed.active():
        return fallback
    room = room_in_training(job.model, job.objective, job.train, micro, device, amp)
    return choose(room, probe(job.model, job.objective, val, device, amp), len(val), device)
