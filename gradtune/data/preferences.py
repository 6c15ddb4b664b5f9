"""Preference pairs (DPO) from JSONL, Parquet or ``datasets`` folders (keys mapped by
``text.fields``, turns as {role, content} or ShareGPT's {from, value}): a prompt, a preferred
(``chosen``) and a dispreferred (``rejected``) response.

Three row shapes, each giving one prompt and two one-message responses:

    {"prompt": "2+2?", "chosen": "4.", "rejected": "5."}                   (optional "system")
    {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}
    {"chosen": [...conversation...], "rejected": [...conversation...]}   the turns before the
                                                                         last are the shared prompt

Each side is rendered and tokenised exactly like instruction data (``instructions.encode``: the
chat template when the tokenizer has one), and only the response's tokens are scored: labels
are IGNORE on the prompt (and on any earlier assistant turn of a multi-turn prompt, which is the
same in both sequences). A *sample* is a pair: the sampler, micro-batches and ranks split pairs,
never a chosen sequence from its rejected one. A batch of B pairs is one forward over 2B
sequences: rows [0, B) chosen, rows [B, 2B) rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from gradtune.data import chat_formats
from gradtune.data.dataset import Batch
from gradtune.data.instructions import encode
from gradtune.data.sequences import IGNORE, pad, pad_id
from gradtune.data.text import warn
from gradtune.data.text_tasks import DataError

Messages = list[dict[str, str]]


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    )


def _response(value: Any, key: str, where: str) -> Messages:
    """One assistant message from a string or a one-message list; empty text is an error."""
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    if not _is_messages(value):
        raise DataError(f"{where}: {key!r} must be a string or a list of {{role, content}} messages")
    if len(value) != 1 or value[0]["role"] != "assistant":
        raise DataError(f"{where}: {key!r} must be one assistant message after the prompt")
    if not value[0]["content"].strip():
        raise DataError(f"{where}: {key!r} is empty")
    return value


def _prompt(row: dict[str, Any], where: str) -> Optional[Messages]:
    prompt = row.get("prompt")
    if prompt is None:
        return None
    if isinstance(prompt, str):
        system = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []
        return system + [{"role": "user", "content": prompt}]
    if not _is_messages(prompt):
        raise DataError(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages")
    return prompt


def _turns(value: Any, key: str, fields: chat_formats.Fields, where: str) -> Any:
    """A list of turns in the file's own keys ({from, value} or {role, content}, through
    ``text.fields``) as {role, content}; anything else as it is (checked later)."""
    if isinstance(value, list) and value and all(isinstance(t, dict) for t in value):
        sharegpt = fields("from") in value[0] and fields("role") not in value[0]
        return chat_formats.chat(value, key, fields, where, sharegpt)
    return value


def standard(row: dict[str, Any], fmt: str, fields: chat_formats.Fields, where: str) -> dict[str, Any]:
    """The row with the standard keys (prompt, chosen, rejected, system) from ``text.fields``."""
    if fmt == "alpaca":
        raise DataError(
            f"{where}: text.format 'alpaca' has no preference shape; preference rows are prompt / chosen / "
            f"rejected (map your keys with text.fields)"
        )
    out = {}
    for name in ("prompt", "chosen", "rejected", "system"):
        if fields(name) in row:
            out[name] = _turns(row[fields(name)], name, fields, where)
        elif name in ("chosen", "rejected") and fields(name) != name:
            raise DataError(f"{where}: missing {fields(name)!r} (the {name!r} field by text.fields)")
    return out


def conversations(row: dict[str, Any], where: str) -> tuple[Messages, Messages]:
    """(chosen conversation, rejected conversation): the same prompt turns, then one assistant
    message each."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(
                f"{where}: missing {key!r} (need 'chosen' and 'rejected', and 'prompt' "
                f"unless they are whole conversations)"
            )
    prompt = _prompt(row, where)
    chosen, rejected = row["chosen"], row["rejected"]
    if prompt is None:  # whole conversations: the turns they share are the prompt
        if not (_is_messages(chosen) and _is_messages(rejected)):
            raise DataError(f"{where}: missing 'prompt' (or give 'chosen' and 'rejected' as whole conversations)")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        if row["rejected"][:-1] != prompt:
            raise DataError(f"{where}: 'chosen' and 'rejected' must share every turn but the last")
    return prompt + _response(chosen, "chosen", where), prompt + _response(rejected, "rejected", where)


def response_only(labels: list[int]) -> list[int]:
    """Labels of the last trained run only (the final assistant message and the end token after
    it); earlier trained tokens (assistant turns inside the prompt) become IGNORE."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return [IGNORE] * start + labels[start:]


class PairDataset:
    """Pairs of token sequences: ``chosen[i]`` and ``rejected[i]`` are (input_ids, labels).

    ``ref`` (N, 2), when set, holds the reference model's summed response log-probabilities of
    (chosen, rejected) per pair, precomputed once (``jobs/preference.py``); batches carry it as
    ``ref_logps`` (B, 2).
    """

    def __init__(
        self, chosen: list[tuple[list[int], list[int]]], rejected: list[tuple[list[int], list[int]]], pad_id: int
    ) -> None:
        if len(chosen) != len(rejected):
            raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected sequences")
        self.chosen, self.rejected, self.pad_id = chosen, rejected, pad_id
        self.pad_multiple = 1  # batch lengths rounded up to this (text.pad_to_multiple_of)
        self.ref: Optional[torch.Tensor] = None
        self.label: Optional[torch.Tensor] = None  # (N,) bool: KTO rows (data/unpaired.py), good or bad
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def lengths(self) -> torch.Tensor:
        """Padded length each pair needs, (N,) long: the longer of its two sequences."""
        return torch.tensor([max(len(c[0]), len(r[0])) for c, r in zip(self.chosen, self.rejected)], dtype=torch.long)

    def get(self, idx: torch.Tensor) -> Batch:
        rows = idx.tolist()
        seqs = [self.chosen[i] for i in rows] + [self.rejected[i] for i in rows]  # 2B: chosen, then rejected
        m = self.pad_multiple
        batch = {
            "input_ids": pad([s[0] for s in seqs], self.pad_id, m),
            "attention_mask": pad([[1] * len(s[0]) for s in seqs], 0, m),
            "labels": pad([s[1] for s in seqs], IGNORE, m),
            "sample_id": idx,
        }
        if self.ref is not None:
            batch["ref_logps"] = self.ref.index_select(0, idx)
        if self.label is not None:
            batch["label"] = self.label.index_select(0, idx)
        return batch

    def subset(self, indices: Sequence[int]) -> PairDataset:
        """The pairs at ``indices`` (a train / eval split), renumbered from 0."""
        out = PairDataset([self.chosen[i] for i in indices], [self.rejected[i] for i in indices], self.pad_id)
        out.pad_multiple = self.pad_multiple
        if self.ref is not None:
            out.ref = self.ref[torch.as_tensor(list(indices), dtype=torch.long)]
        if self.label is not None:
            out.label = self.label[torch.as_tensor(list(indices), dtype=torch.long)]
        return out


def _side(tokenizer: Any, msgs: Messages, where: str, max_length: int) -> tuple[list[int], list[int]]:
    ids, labels = encode(tokenizer, msgs, where)
    return ids[:max_length], response_only(labels)[:max_length]


def load_preferences(
    path: str | Path, tokenizer: Any, max_length: int = 512, fmt: str = "auto", fields: dict[str, str] | None = None
) -> PairDataset:
    """The JSONL file as pairs, each sequence truncated to ``max_length`` tokens.

    A pair either of whose responses starts beyond ``max_length`` has nothing to compare and is
    dropped, as is a pair whose two responses are the same text (no gradient, a constant loss);
    ``dataset.dropped`` counts both, a warning names the identical ones; if every pair is
    dropped, that is an error.
    """
    keys = chat_formats.Fields(fields)
    chosen, rejected, dropped, same = [], [], 0, []
    for where, row in chat_formats.rows(path):
        c_msgs, r_msgs = conversations(standard(row, fmt, keys, where), where)
        if c_msgs[-1]["content"] == r_msgs[-1]["content"]:
            same.append(where.rsplit(":", 1)[1])
            continue
        c, r = _side(tokenizer, c_msgs, where, max_length), _side(tokenizer, r_msgs, where, max_length)
        # labels[0] is never a target after the shift: each side needs a scored label at t >= 1
        if all(t == IGNORE for t in c[1][1:]) or all(t == IGNORE for t in r[1][1:]):
            dropped += 1
            continue
        chosen.append(c)
        rejected.append(r)
    if same:
        lines = ", ".join(map(str, same[:5])) + (f" and {len(same) - 5} more" if len(same) > 5 else "")
        warn(f"{path}: line {lines}: 'chosen' equals 'rejected'; pair dropped (nothing to prefer)")
    if not chosen:
        raise DataError(
            f"{path}: no usable preference pair (each needs both responses within "
            f"max_length={max_length} tokens, and different)"
        )
    dataset = PairDataset(chosen, rejected, pad_id(tokenizer))
    dataset.dropped = dropped + len(same)
    return dataset
