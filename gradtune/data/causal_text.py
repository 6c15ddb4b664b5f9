"""Causal-LM fine-tuning on plain text: the token stream cut into windows of ``max_length``.

Windows overlap by one token (stride ``max_length - 1``): the objective predicts token t+1 from
tokens <= t inside a window, so without the overlap the pair across each window boundary would
never be trained. Every token of the stream is a target exactly once (but the first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradtune.data.sequences import SequenceDataset, pad_id
from gradtune.data.text import read_utf8
from gradtune.data.text_tasks import DataError, data_file, read_rows


def load_causal_text(
    path: str | Path, tokenizer: Any, max_length: int = 512, text_column: str = "text", documents: bool = False
) -> SequenceDataset:
    """A .txt file (one document) or .jsonl (one document per line in ``text_column``);
    documents are joined with the eos token so the model learns where one ends.
    ``documents`` (text.packing): each document (with its eos) cut into windows on its own, so
    no window spans two documents; data/packing.py then packs them without cross-attention."""
    path = Path(path)
    if max_length < 2:
        raise DataError(f"max_length must be >= 2 for causal LM windows, got {max_length}")
    if path.suffix == ".jsonl":
        docs = [str(r[text_column]) for _, r in read_rows(path) if r.get(text_column)]
    else:
        docs = [read_utf8(data_file(path))]
    eos = tokenizer.eos_token_id
    streams = [tokenizer(doc)["input_ids"] + ([eos] if eos is not None else []) for doc in docs]
    if not documents:
        streams = [[t for s in streams for t in s]]
    if max((len(s) for s in streams), default=0) < 2:
        raise DataError(f"{path}: no text to train on")
    stride = max_length - 1
    windows = [s[i : i + max_length] for s in streams for i in range(0, len(s) - 1, stride)]
    return SequenceDataset(windows, [list(w) for w in windows], pad_id(tokenizer))
