"""Token sequences of different lengths, tokenised once, padded per batch (dynamic padding).

Why pad per batch rather than to ``max_length``: most texts are short, and a batch padded to its
longest member does far less attention and MLP work on padding than one padded to the maximum.

Two label shapes: one label per sample (text classification / regression, ``labels`` (B,)), or
one per token (causal LM, ``labels`` (B, T), aligned with ``input_ids`` as in transformers, -100
= not trained, the objective shifts by one). Padding is on the right; ``attention_mask`` (B, T)
is 1 on real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradtune.data.dataset import Batch

IGNORE = -100  # label of tokens kept out of the loss (prompt, padding): torch's ignore_index


def pad(seqs: Sequence[Sequence[int]], value: int, multiple: int = 1) -> torch.Tensor:
    """Right-pad to the longest, rounded up to ``multiple``: list of B lists -> (B, T) long."""
    longest = max(len(s) for s in seqs)
    out = torch.full((len(seqs), -(-longest // multiple) * multiple), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


class TokenLists:
    """Base of the datasets whose samples are token-id lists, ``input_ids`` (one list a sample):
    their count, their lengths and the lists a batch's indices pick."""

    input_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens per sample, (N,) long: for grouping batches by length (data/sampler.py)."""
        return torch.tensor([len(s) for s in self.input_ids], dtype=torch.long)

    def pick(self, rows: Sequence[int]) -> list[list[int]]:
        """The token lists of the samples ``rows`` (a batch's indices, in order)."""
        return [self.input_ids[i] for i in rows]


class SequenceDataset(TokenLists):
    """``input_ids`` per sample; ``labels`` a (N,) tensor, or a list of per-token label lists."""

    def __init__(self, input_ids: list[list[int]], labels: torch.Tensor | list[list[int]], pad_id: int) -> None:
        if len(input_ids) != len(labels):
            raise ValueError(f"{len(input_ids)} sequences but {len(labels)} labels")
        self.input_ids, self.labels, self.pad_id = input_ids, labels, pad_id
        self.token_labels = not isinstance(labels, torch.Tensor)
        # Batch lengths rounded up to this (text.pad_to_multiple_of): fewer distinct shapes.
        self.pad_multiple = 1

    def get(self, idx: torch.Tensor) -> Batch:
        rows = idx.tolist()
        seqs = self.pick(rows)
        m = self.pad_multiple
        input_ids = pad(seqs, self.pad_id, m)
        attention_mask = pad([[1] * len(s) for s in seqs], 0, m)
        if self.token_labels:
            labels = pad([self.labels[i] for i in rows], IGNORE, m)
        else:
            labels = self.labels.index_select(0, idx)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "sample_id": idx}

    def subset(self, indices: Sequence[int]) -> SequenceDataset:
        """The samples at ``indices`` (e.g. a train / eval split), renumbered from 0."""
        labels = (
            self.labels[torch.as_tensor(list(indices), dtype=torch.long)]
            if not self.token_labels
            else [self.labels[i] for i in indices]
        )
        out = SequenceDataset(self.pick(indices), labels, self.pad_id)
        out.pad_multiple = self.pad_multiple
        return out


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id (Llama has no pad token), else 0; never trained."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
