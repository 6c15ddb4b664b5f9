"""Unpaired preference rows (KTO) from JSONL: a prompt, one completion and whether it is good.

    {"prompt": "2+2?", "completion": "4.", "label": true}              (optional "system")
    {"prompt": [{"role": "user", ...}], "completion": [{"role": "assistant", ...}], "label": false}

Each row becomes two sequences, held as a ``PairDataset`` so that batching, reference
precomputation and the LoRA reference are the pairs' (rows [0, B) of a batch the responses,
rows [B, 2B) their partners):

* the row itself, prompt + completion, the completion's tokens scored;
* its mismatched partner, the same prompt + the completion of the row before it (the last
  row's for the first; TRL's pairing), which estimates KTO's reference point, the KL term.

``dataset.label`` (N,) bool: true for a desirable completion. The label must be a JSON boolean
(TRL's field): a missing label, or "yes" / 1, is an error naming the line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gradtune.data.instructions import encode
from gradtune.data.preferences import Messages, PairDataset, _prompt, _response, response_only
from gradtune.data.sequences import IGNORE, pad_id
from gradtune.data.text_tasks import DataError, read_rows


def _row(row: dict[str, Any], where: str) -> tuple[Messages, Messages, bool]:
    """(prompt turns, the one-message completion, label)."""
    for key in ("prompt", "completion", "label"):
        if key not in row:
            raise DataError(f"{where}: missing {key!r} (KTO rows need 'prompt', 'completion' and 'label': true|false)")
    if not isinstance(row["label"], bool):
        raise DataError(f"{where}: 'label' must be true or false, got {row['label']!r}")
    prompt = _prompt(row, where)
    return prompt, _response(row["completion"], "completion", where), row["label"]


def _encode(tokenizer: Any, msgs: Messages, where: str, max_length: int) -> tuple[list[int], list[int]]:
    ids, labels = encode(tokenizer, msgs, where)
    return ids[:max_length], response_only(labels)[:max_length]


def _scored(seq: tuple[list[int], list[int]]) -> bool:
    return any(t != IGNORE for t in seq[1][1:])  # labels[0] is never a target after the shift


def load_unpaired(path: str | Path, tokenizer: Any, max_length: int = 512) -> PairDataset:
    """The JSONL file's rows, each with its mismatched partner, truncated to ``max_length``
    tokens; a row whose completion starts beyond ``max_length`` is dropped (``dropped``)."""
    path = Path(path)
    rows = [_row(row, f"{path}:{n}") + (f"{path}:{n}",) for n, row in read_rows(path)]
    if not rows:
        raise DataError(f"{path}: no rows")
    own, partner, labels, dropped = [], [], [], 0
    for i, (prompt, completion, label, where) in enumerate(rows):
        seq = _encode(tokenizer, prompt + completion, where, max_length)
        other = _encode(tokenizer, prompt + rows[i - 1][1], where, max_length)  # i - 1 = -1: the last row
        if not (_scored(seq) and _scored(other)):
            dropped += 1
            continue
        own.append(seq)
        partner.append(other)
        labels.append(label)
    if not own:
        raise DataError(f"{path}: no usable KTO row (each completion must start within max_length={max_length} tokens)")
    data = PairDataset(own, partner, pad_id(tokenizer))
    data.label = torch.tensor(labels, dtype=torch.bool)
    data.dropped = dropped
    return data
