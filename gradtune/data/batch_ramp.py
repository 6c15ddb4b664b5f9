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

from dataclasses import dataclass
from typing import Optional


def floor_sum(n: int, m: int, a: int, b: int) -> int:
    """sum over i in [0, n) of (a * i + b) // m, for a, b >= 0 and m >= 1, in O(log m) (the
    Euclid-like reduction of floor sums): a long ramp's sample counts without walking its steps."""
    total = 0
    while True:
        if a >= m:
            total += n * (n - 1) // 2 * (a // m)
            a %= m
        if b >= m:
            total += n * (b // m)
            b %= m
        top = a * n + b
        if top < m:
            return total
        n, b = divmod(top, m)
        m, a = a, m


@dataclass
class BatchRamp:
    start: int  # samples in step 0
    steps: int  # optimizer steps over which the size grows; step ``steps`` is the first at ``batch``
    batch: int  # the full batch (the config's batch_size, capped at the training set)

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
        k = min(step, self.steps)
        ramped = self.start * k + floor_sum(k, self.steps, self.batch - self.start, 0)
        return ramped + max(0, step - self.steps) * self.batch

    def full_steps(self, lo: int, hi: int) -> float:
        """Steps [lo, hi) counted in full batches: what they cost next to full steps."""
        return (self.samples(max(hi, lo)) - self.samples(lo)) / self.batch

    def total_steps(self, n: int, epochs: int) -> int:
        """Steps that make ``epochs`` passes over ``n`` samples, as the sampler cuts them: an epoch
        that began at step s ends at the first step e with samples(e) - samples(s) >= n (its last
        batch cut short); once the ramp is over an epoch is ceil(n / batch) steps."""
        step = 0
        for done in range(epochs):
            if step >= self.steps:
                return step + (epochs - done) * -(-n // self.batch)
            base, lo, hi = self.samples(step), step + 1, step + n  # a step takes at least 1 sample
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if self.samples(mid) - base >= n else (mid + 1, hi)
            step = lo
        return step
