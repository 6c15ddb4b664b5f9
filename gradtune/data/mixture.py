"""A mixture of corpora sampled by weight: ``data: [{path: a, weight: 0.7}, {path: b, weight: 0.3}]``.

Which source fills a batch slot is a pure function of (seed, slot): slot ``g`` (the g-th sample
of the run, ``g = step * batch + j``) goes to the source whose cumulative-weight interval holds
``u_g = frac(offset(seed) + g * phi)``, phi the golden ratio's fraction. That low-discrepancy
sequence gives every source its weight's share of any run of slots to within a few samples (an
i.i.d. draw would be off by sqrt(n) samples), needs no state, and is the same on every rank and
after any resume. The k-th slot given to source s takes its window ``perm_s(e)[k mod n_s]``,
``e = k // n_s``, ``perm_s(e)`` a permutation seeded by (seed, s, e): without replacement within
a source's pass. A sampler's position is just (epoch, index); the per-source counts it needs
are recounted from the slot sequence on resume (vectorised, one pass).

Sample ids are global: source s's windows are ids ``offset_s .. offset_s + n_s - 1``, and a
batch carries ``source`` (B,) long so that the objective can count each source's tokens.
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Optional

import numpy as np
import torch

from gradtune.data.dataset import Batch
from gradtune.data.sampler import Step
from gradtune.data.text import TextWindows

PHI = 0.6180339887498949  # the golden ratio's fraction: the most evenly spread additive sequence


def source_of(slots: np.ndarray, cum: np.ndarray, seed: int) -> np.ndarray:
    """The source of each global slot index: (n,) int64 -> (n,) int64 in [0, S)."""
    offset = (seed * PHI * PHI) % 1.0
    u = np.mod(offset + slots.astype(np.float64) * PHI, 1.0)
    return np.minimum(np.searchsorted(cum, u, side="right"), len(cum) - 1)


class MixtureWindows:
    """The sources' windows as one dataset of global ids (module doc)."""

    def __init__(self, sources: list[TextWindows], names: list[str], weights: list[float]) -> None:
        self.sources, self.names, self.weights = sources, names, weights
        self.sizes = np.array([len(s) for s in sources], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.block_size = sources[0].block_size
        self.n_tokens = sum(s.n_tokens for s in sources)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, idx: torch.Tensor) -> Batch:
        ids = idx.numpy()
        src = np.searchsorted(self.offsets, ids, side="right") - 1  # (B,)
        rows = np.empty((len(ids), self.block_size + 1), dtype=np.int64)
        for s in np.unique(src):
            at = src == s
            rows[at] = self.sources[s].windows[ids[at] - self.offsets[s]]
        w = torch.from_numpy(rows)
        return {"input_ids": w[:, :-1], "labels": w[:, 1:], "sample_id": idx, "source": torch.from_numpy(src)}

    def make_sampler(self, batch_size: int | str, micro_batch_size: Optional[int], seed: int) -> "MixtureSampler":
        """data/sampler.make_sampler calls this: a mixture is sampled by weight, not shuffled."""
        batch = len(self) if batch_size == "full" else min(int(batch_size), len(self))
        return MixtureSampler(self, self.weights, batch, micro_batch_size, seed)


class MixtureSampler:
    """Batches of ``batch`` global window ids drawn by weight (module doc); the Sampler interface."""

    def __init__(self, data: MixtureWindows, weights: list[float], batch: int, micro: Optional[int], seed: int):
        self.data, self.seed = data, seed
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.cum = np.cumsum(self.weights)
        self.n = len(data)
        self.batch = batch
        self.micro = min(micro or batch, batch)
        self.shuffle = True
        self.epoch, self.index = 0, 0
        self.counts = np.zeros(len(w), dtype=np.int64)  # slots given to each source so far
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n // self.batch)  # an "epoch" is as many samples as all sources hold

    def _slot(self) -> int:
        return (self.epoch * self.steps_per_epoch + self.index // self.batch) * self.batch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.counts = np.zeros(len(self.weights), dtype=np.int64)
        done, chunk = self._slot(), 1 << 22
        for start in range(0, done, chunk):  # recount the slots before this position
            src = source_of(np.arange(start, min(start + chunk, done)), self.cum, self.seed)
            self.counts += np.bincount(src, minlength=len(self.weights))
        self._perms.clear()

    def order_digest(self) -> str:
        """Proves a resume regenerates the same stream: the position, counts, weights and sizes."""
        h = hashlib.sha256(f"{self.seed}|{self.epoch}|{self.index}|{self.batch}".encode())
        for a in (self.counts, self.weights, self.data.sizes):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def _perm(self, s: int, e: int) -> np.ndarray:
        if (s, e) not in self._perms:
            if len(self._perms) > 2 * len(self.weights):
                self._perms.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * s + 104_729 * e + 1)
            self._perms[(s, e)] = torch.randperm(int(self.data.sizes[s]), generator=g).numpy()
        return self._perms[(s, e)]

    def _draw(self, src: np.ndarray) -> np.ndarray:
        out = np.empty(len(src), dtype=np.int64)
        for j, s in enumerate(src):
            k, n = int(self.counts[s]), int(self.data.sizes[s])
            out[j] = self.data.offsets[s] + self._perm(int(s), k // n)[k % n]
            self.counts[s] += 1
        return out

    def __iter__(self) -> Iterator[Step]:
        return self

    def total_steps(self, epochs: int) -> int:
        return epochs * self.steps_per_epoch

    def epochs_done(self, step: int) -> float:
        return step / self.steps_per_epoch

    def draw(self, step: Optional[int]) -> Step:
        """The Sampler interface: a mixture has no batch ramp (data/sampler.make_sampler refuses one)."""
        return next(self)

    def __next__(self) -> Step:
        start = self._slot()
        src = source_of(np.arange(start, start + self.batch), self.cum, self.seed)
        idx = torch.from_numpy(self._draw(src))
        micro = [idx] if self.batch <= self.micro else list(idx.split(self.micro))
        step = Step(self.epoch, self.index, micro, self.index + self.batch >= self.steps_per_epoch * self.batch)
        self.index += self.batch
        if step.epoch_end:
            self.epoch, self.index = self.epoch + 1, 0
        return step


class SourceTokens:
    """An objective that also sums each source's trained tokens, as metrics ``tokens_<name>``
    (summed over micro-batches and ranks by the loop, like every metric sum)."""

    def __init__(self, inner, names: list[str]) -> None:
        self.inner, self.names = inner, names

    def __call__(self, model, batch: Batch):
        out = self.inner(model, batch)
        src = batch.get("source")
        if src is not None:
            per = (batch["labels"] >= 0).sum(dim=1)  # (B,) trained tokens per window
            sums = torch.zeros(len(self.names), dtype=torch.long, device=per.device)
            sums.index_add_(0, src.to(per.device), per)
            out.metrics.update({f"tokens_{n}": sums[i] for i, n in enumerate(self.names)})
        return out
