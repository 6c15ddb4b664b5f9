"""Instruction fine-tuning data: rows of any ``chat_formats`` shape (prompt/response, Alpaca,
ShareGPT, messages) from JSONL, CSV, Parquet or ``datasets`` folders.

Each sample is rendered with the tokenizer's chat template when it has one (so the model sees
the format it was instruction-tuned with), else as prompt tokens followed by response tokens.
Only the assistant's tokens are trained: prompt tokens get label -100, and the end-of-sequence
token after each answer is trained, so the model learns to stop.

Why render the conversation turn by turn: the template output for messages[:i] is a prefix of
the output for messages[:i+1], so each assistant turn is the text between two renders; each
piece is tokenised on its own and its ids are labelled trained or not, with no guessing where
the prompt ends in token space.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradtune.data import chat_formats
from gradtune.data.sequences import IGNORE, SequenceDataset, pad_id
from gradtune.data.text_tasks import DataError

Segment = tuple[str, bool]  # (text, trained?)


def _segments(tokenizer: Any, msgs: list[dict[str, str]], where: str) -> list[Segment]:
    """Chat-template pieces between successive renders; assistant pieces are trained."""
    segments: list[Segment] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
            if not prompt.startswith(done):
                raise DataError(f"{where}: the chat template does not render turn by turn")
            segments.append((prompt[len(done) :], False))
            done = prompt
        upto = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not upto.startswith(done):
            raise DataError(f"{where}: the chat template does not render turn by turn")
        segments.append((upto[len(done) :], m["role"] == "assistant"))
        done = upto
    return [s for s in segments if s[0]]


def encode(tokenizer: Any, msgs: list[dict[str, str]], where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are -100 except on assistant tokens."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    if getattr(tokenizer, "chat_template", None):
        for text, trained in _segments(tokenizer, msgs, where):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        if eos is not None and eos not in [t for t in labels if t != IGNORE]:
            ids.append(eos)  # a template that does not close the answer with eos: add it
            labels.append(eos)
        return ids, labels
    # No template: prompt (with the tokenizer's BOS if it adds one), then response and eos.
    prompt = "\n".join(m["content"] for m in msgs if m["role"] != "assistant")
    response = [m["content"] for m in msgs if m["role"] == "assistant"][-1]
    p = tokenizer(prompt)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    return p + r, [IGNORE] * len(p) + r


def load_instructions(
    path: str | Path, tokenizer: Any, max_length: int = 512, fmt: str = "auto", fields: dict[str, str] | None = None
) -> SequenceDataset:
    """The rows (any ``chat_formats`` shape: prompt/response, Alpaca, ShareGPT, messages; keys
    mapped by ``fields``) as (input_ids, token labels) samples, truncated to ``max_length``.

    A sample whose answer starts beyond ``max_length`` has nothing to train and is dropped
    (``dataset.dropped`` counts them); if all are, that is an error.
    """
    keys = chat_formats.Fields(fields)
    auto, first = fmt == "auto", True
    input_ids, labels, dropped = [], [], 0
    for where, row in chat_formats.rows(path):
        if first:  # auto: the first row's shape, said once; a later row of another shape is read as its own
            fmt, first = chat_formats.resolve(path, fmt, keys, (where, row)), False
        shape = (chat_formats.guess(row, keys) or fmt) if auto else fmt
        ids, lab = encode(tokenizer, chat_formats.to_messages(row, shape, keys, where), where)
        ids, lab = ids[:max_length], lab[:max_length]
        # labels[0] is never a target after the shift, so a sample needs a trained label at t >= 1
        if all(t == IGNORE for t in lab[1:]):
            dropped += 1
            continue
        input_ids.append(ids)
        labels.append(lab)
    if not input_ids:
        raise DataError(f"{path}: no sample has a response within max_length={max_length} tokens")
    dataset = SequenceDataset(input_ids, labels, pad_id(tokenizer))
    dataset.dropped = dropped
    return dataset
