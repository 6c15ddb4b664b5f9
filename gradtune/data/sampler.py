"""Batch, stochastic and mini-batch gradient descent as one setting: which indices form a step.

    batch_size="full"  batch GD: every training sample, each step is one epoch (exact gradient)
    batch_size=1       stochastic GD: one sample per step, reshuffled every epoch
    batch_size=k       mini-batch GD: k samples per step, reshuffled every epoch, last one short
    batch_ramp_steps   k grows from batch_ramp_start over the first steps (data/batch_ramp.py)

Each step's batch is split into micro-batches of ``micro_batch_size`` (memory only: the loop
sums the micro-batch losses and divides by the batch's total count, so the gradient is exact).
The order is a pure function of (seed, epoch), so the data position is just (epoch, index):
resuming needs two integers, and every process of a distributed run agrees on the order.

Grouping by length (sequences padded per batch): the shuffled order is cut into pools of
``pool`` batches, each pool sorted by length, cut into batches, and the batches shuffled. A
batch then holds texts of similar length, so padding (compute spent on nothing) shrinks (the
README's fine-tuning section gives the measured effect). Small pools keep batches nearly as
random as plain shuffling (a pool of 8 batches of 16 is 128 texts, not the whole set), so
labels that correlate with length do not cluster into whole batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch

from gradtune.data.batch_ramp import BatchRamp
from gradtune.runtime.errors import GradtuneError


def epoch_order(
    n: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    lengths: Optional[torch.Tensor] = None,
    batch: int = 1,
    pool: int = 0,
) -> torch.Tensor:
    """The permutation of sample indices for ``epoch``: (n,) long. With ``lengths`` (n,) and
    ``pool`` > 0, consecutive ``batch``-sized slices are length-grouped batches (module doc);
    the one short batch, if any, stays last."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    if lengths is None or pool <= 0 or batch <= 1:
        return order
    span = pool * batch
    pools = [p[torch.argsort(lengths[p], descending=True, stable=True)] for p in order.split(span)]
    batches = list(torch.cat(pools).split(batch))
    short = [batches.pop()] if len(batches[-1]) < batch else []
    perm = torch.randperm(len(batches), generator=g).tolist()
    return torch.cat([batches[i] for i in perm] + short)


@dataclass
class Step:
    epoch: int
    index: int  # position of the batch's first sample within the epoch order
    micro: list[torch.Tensor]  # micro-batches of sample indices, (<= micro_batch_size,) each
    epoch_end: bool  # this step finishes its epoch


def make_sampler(job, cfg) -> "Sampler":
    """The sampler a config asks for; variable-length sequences grouped by length if enabled;
    a dataset with its own sampling rule (a mixture: data/mixture.py) makes its own."""
    own = getattr(job.train, "make_sampler", None)
    if own is not None:
        if cfg.batch_ramp_steps:
            raise GradtuneError(
                "config: batch_ramp_steps: a data mixture draws fixed-size batches by weight; "
                "train on one corpus or set batch_ramp_steps=0"
            )
        return own(cfg.batch_size, cfg.micro_batch_size, cfg.seed)
    lengths = getattr(job.train, "lengths", None) if cfg.text.group_by_length else None
    sampler = Sampler(
        len(job.train),
        cfg.batch_size,
        cfg.micro_batch_size,
        cfg.seed,
        lengths=lengths,
        pool=cfg.text.length_pool if lengths is not None else 0,
    )
    if cfg.batch_ramp_steps and cfg.batch_size != "full":
        sampler.ramp = BatchRamp.create(cfg.batch_ramp_start, cfg.batch_ramp_steps, sampler.batch)
    return sampler


class Sampler:
    """Yields the steps of training, epoch after epoch, from a resumable position."""

    def __init__(
        self,
        n: int,
        batch_size: Union[int, str],
        micro_batch_size: Optional[int] = None,
        seed: int = 0,
        shuffle: Optional[bool] = None,
        lengths: Optional[torch.Tensor] = None,
        pool: int = 0,
    ) -> None:
        if n <= 0:
            raise ValueError("the training set is empty")
        self.n = n
        self.batch = n if batch_size == "full" else min(int(batch_size), n)
        self.micro = min(micro_batch_size or self.batch, self.batch)
        # Batch GD's gradient does not depend on order; keep it sequential (cache friendly).
        self.shuffle = (batch_size != "full") if shuffle is None else shuffle
        self.seed = seed
        self.lengths, self.pool = lengths, pool  # length grouping (module doc); pool 0: off
        self.epoch, self.index = 0, 0
        self._order: Optional[torch.Tensor] = None
        # batch_ramp_steps: the step's size is ramp.size(step) (``draw``); None: always ``batch``.
        # The epoch order (and its length-grouped batches) is cut for the full batch either way.
        self.ramp: Optional[BatchRamp] = None

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n // self.batch)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None

    def order_digest(self) -> str:
        """sha256 of this epoch's permutation: a checkpoint records it so a resume can prove the
        order it regenerates from (seed, epoch) is the one the run was using."""
        import hashlib

        order = self._epoch_order()
        return hashlib.sha256(order.numpy().tobytes()).hexdigest()

    def _epoch_order(self) -> torch.Tensor:
        return epoch_order(self.n, self.seed, self.epoch, self.shuffle, self.lengths, self.batch, self.pool)

    def __iter__(self) -> Iterator[Step]:
        return self

    def total_steps(self, epochs: int) -> int:
        """Steps that make ``epochs`` passes over the training set."""
        return epochs * self.steps_per_epoch if self.ramp is None else self.ramp.total_steps(self.n, epochs)

    def epochs_done(self, step: int) -> float:
        """Passes over the training set after ``step`` optimizer steps: steps / steps per epoch, or
        with a batch ramp (steps of varying size) this sampler's position."""
        return step / self.steps_per_epoch if self.ramp is None else self.epoch + self.index / self.n

    def __next__(self) -> Step:
        return self.draw(None)

    def draw(self, step: Optional[int]) -> Step:
        """The next batch: the ramp's size at optimizer step ``step`` (the loop's), else the
        full batch; the data position advances by what was drawn."""
        if self._order is None:
            self._order = self._epoch_order()
        size = self.batch if self.ramp is None or step is None else self.ramp.size(step)
        start, stop = self.index, min(self.index + size, self.n)
        idx = self._order[start:stop]
        micro = [idx] if stop - start <= self.micro else list(idx.split(self.micro))
        step = Step(self.epoch, start, micro, stop >= self.n)
        self.index = stop
        if step.epoch_end:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        return step
