"""Packed sequences: documents concatenated into windows of ``max_length`` tokens, no attention
across documents, so no compute is spent on padding.

A *document* is one sample of a token-label ``SequenceDataset`` (an instruction conversation, a
chunk of a causal-LM text), already truncated to ``max_length`` by its loader: packing keeps
exactly its tokens and labels, so the loss has exactly the unpacked terms. A window carries, per
token (all (T,)):

    input_ids      the documents' tokens one after another, then padding
    labels         the documents' labels (transformers' convention, aligned with input_ids, the
                   objective shifts by one), except the first token of each document: IGNORE.
                   After the shift that label is the target of the *previous* document's last
                   token, a pair that does not exist unpacked (where label 0 is never a target)
    position_ids   0, 1, ... restarting at each document: each sees the positions it sees alone
    document_ids   0, 1, ... per document within the window, -1 on padding

``block_causal_mask`` turns document_ids into the attention mask: a token attends to earlier
tokens of its own document only. Padding is a document of its own (causal among itself), so no
row of the mask is empty (an all-masked softmax row is NaN) and no real token sees it.

Which documents share a window: best-fit decreasing (longest first, each into the fullest
window it fits), ties in a seeded order. The windows are a pure function of (documents, seed),
built once: a resumed run rebuilds the same windows, and the sampler shuffles them per epoch.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Optional

import torch

from gradtune.data.dataset import Batch
from gradtune.data.sequences import IGNORE, SequenceDataset


def pack_bins(lengths: list[int], capacity: int, seed: int) -> list[list[int]]:
    """Document indices per window, best-fit decreasing into windows of ``capacity`` tokens.

    ``free`` holds (room left, window) sorted, so the fullest window a document fits in is one
    bisection: O(N log N) for N documents. Empty documents are left out (nothing to train).
    """
    too_long = [n for n in lengths if n > capacity]
    if too_long:
        raise ValueError(f"a document of {too_long[0]} tokens does not fit a window of {capacity}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the seeded order
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if n == 0:
            continue
        k = bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            room, b = capacity - n, len(bins) - 1
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            room -= n
        if room > 0:
            insort(free, (room, b))
    return bins


def block_causal_mask(document_ids: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) mask: query t may attend key s iff s <= t and both
    are in the same document. ``dtype`` None: bool (True = attend, what SDPA takes); a float
    dtype: additive (0 / -inf), what eager attention implementations add to the scores."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    allowed = (document_ids[:, :, None] == document_ids[:, None, :]) & causal  # (B, T, T)
    if dtype is None or dtype == torch.bool:
        return allowed.unsqueeze(1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=document_ids.device)
    return mask.masked_fill_(~allowed, float("-inf")).unsqueeze(1)


class PackedDataset:
    """Windows of packed documents; sample i is window i (its ``sample_id``).

    The windows are stored flat, (total tokens,) per field with ``offsets`` (W + 1,), so
    gathering a batch is one slice copy per window and no per-token Python work.
    """

    def __init__(self, docs: SequenceDataset, max_length: int, seed: int) -> None:
        if not docs.token_labels:
            raise ValueError("packing needs per-token labels (causal LM / instruction data)")
        self.max_length, self.pad_id = max_length, docs.pad_id
        self.pad_multiple = docs.pad_multiple
        self.dropped = getattr(docs, "dropped", 0)
        self.windows = pack_bins([len(s) for s in docs.input_ids], max_length, seed)
        self.documents = sum(len(w) for w in self.windows)
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        doc: list[int] = []
        offsets = [0]
        for w in self.windows:
            for k, i in enumerate(w):
                n = len(docs.input_ids[i])
                ids += docs.input_ids[i]
                labels += [IGNORE] + list(docs.labels[i][1:])  # module doc: no target across documents
                pos += range(n)
                doc += [k] * n
            offsets.append(len(ids))
        self.input_ids, self.labels = torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)
        self.position_ids, self.document_ids = torch.tensor(pos, dtype=torch.long), torch.tensor(doc, dtype=torch.long)
        self.offsets = torch.tensor(offsets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def window_lengths(self) -> torch.Tensor:
        """Real tokens per window, (W,) long. Not named ``lengths``: the sampler would group
        windows by length, and nearly full windows gain nothing from it but less random batches."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def efficiency(self) -> float:
        """Real tokens / window tokens (W * max_length): the share of compute not spent on padding."""
        return float(self.offsets[-1]) / max(len(self.windows) * self.max_length, 1)

    def get(self, idx: torch.Tensor) -> Batch:
        rows = idx.tolist()
        lengths = [int(self.offsets[w + 1] - self.offsets[w]) for w in rows]
        m = self.pad_multiple
        T = -(-max(lengths) // m) * m
        B = len(rows)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        document_ids = torch.full((B, T), -1, dtype=torch.long)
        position_ids = torch.zeros((B, T), dtype=torch.long)
        for r, (w, n) in enumerate(zip(rows, lengths)):
            s = int(self.offsets[w])
            input_ids[r, :n] = self.input_ids[s : s + n]
            labels[r, :n] = self.labels[s : s + n]
            document_ids[r, :n] = self.document_ids[s : s + n]
            position_ids[r, :n] = self.position_ids[s : s + n]
            position_ids[r, n:] = torch.arange(T - n)  # padding: a document of its own
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "document_ids": document_ids,
            "sample_id": idx,
        }


def pack(docs: SequenceDataset, max_length: int, seed: int) -> PackedDataset:
    """``docs`` packed into windows of ``max_length`` tokens (module doc)."""
    return PackedDataset(docs, max_length, seed)
