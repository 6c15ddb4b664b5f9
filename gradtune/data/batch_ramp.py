"""A batch-size ramp: the samples per step grow linearly from a start size to ``batch_size``.

    size(t) = start + (batch - start) * t // steps    for optimizer steps t < steps
    size(t) = batch                                    from step ``steps`` on

Integer arithmetic only, a pure function of the optimizer step (not of the batches drawn): a
step the guard skips draws its replacement at the same size, a resumed run (the step is in the
checkpoint) draws the same sizes, and every rank of a distributed run agrees. Early in training
the gradient's noise scale is small (McCandlish et al. 2018), so a small batch buys nearly as
much progress per step as a large one for a fraction of the samples; the ramp spends the saved
samples on more steps later (GPT-3 ramped its batch over its first few billion tokens).

What depends on samples per step uses this module rather than ``batch_size``: the step total of
an ``epochs`` budget (``total_steps``), and ``max_time``'s planner, which prices a step at its
share of a full batch's time (``full_steps``; loop/budget.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class BatchRamp:
    start: int  # samples in step 0
    steps: int  # optimizer steps over which the size grows; step ``steps`` is the first at ``batch``
    batch: int  # the full batch (the config's batch_size, capped at the training set)
    _cum: list[int] = field(default_factory=list, repr=False)  # _cum[t]: samples in steps [0, t)

    @classmethod
    def create(cls, start: int, steps: int, batch: int) -> Optional["BatchRamp"]:
        """The ramp, or None when there is nothing to ramp (steps 0, or start >= batch)."""
        if steps <= 0 or start >= batch:
            return None
        return cls(max(1, start), steps, batch)

    def size(self, step: int) -> int:
        """Samples in optimizer step ``step`` (0-based)."""
        if step >= self.steps:
            return self.batch
        return self.start + (self.batch - self.start) * step // self.steps

    def samples(self, step: int) -> int:
        """Samples in steps [0, step) (no epoch ends: a short epoch-end batch is the sampler's)."""
        if not self._cum:
            self._cum = [0, *itertools.accumulate(self.size(t) for t in range(self.steps))]
        if step <= self.steps:
            return self._cum[step]
        return self._cum[-1] + (step - self.steps) * self.batch

    def full_steps(self, lo: int, hi: int) -> float:
        """Steps [lo, hi) counted in full batches: what they cost next to full steps."""
        return (self.samples(max(hi, lo)) - self.samples(lo)) / self.batch

    def total_steps(self, n: int, epochs: int) -> int:
        """Steps that make ``epochs`` passes over ``n`` samples, as the sampler cuts them: each
        epoch ends with a short batch where the step's size overruns its end."""
        step = epoch = index = 0
        while step < self.steps and epoch < epochs:  # the ramp: sizes vary, walk it
            index = min(index + self.size(step), n)
            step += 1
            if index >= n:
                epoch, index = epoch + 1, 0
        if epoch >= epochs:
            return step
        rest = -(-(n - index) // self.batch) if index else 0  # the current epoch's remaining full-size steps
        whole = epochs - epoch - (1 if index else 0)
        return step + rest + whole * -(-n // self.batch)
