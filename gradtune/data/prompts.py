"""Prompts for reinforcement learning (``task: rl``, GRPO) from JSONL: the model writes the
responses, reward functions score them.

    {"prompt": "What is 2+3? Answer inside <answer></answer>.", "answer": "5"}     (optional "system")
    {"prompt": [{"role": "system", ...}, {"role": "user", ...}], "answer": "5"}

Each prompt is rendered like instruction data: the chat template with the generation prompt
(the assistant header) when the tokenizer has one, else the prompt's tokens (with the
tokenizer's BOS). Every other column of the row is kept as it is and handed to the reward
functions (``fn(prompts, completions, answer=[...], ...)``). A *sample* is a prompt: the sampler,
micro-batches and ranks split prompts, and all ``num_generations`` completions of one prompt
are sampled and scored together.

A batch holds the prompts right-padded: ``prompt_ids`` (B, P), ``prompt_len`` (B,), the row
index ``row`` (B,) into ``rows`` / ``texts``, and ``source`` (B,), the dataset's ``tag`` (0:
training, 1: validation), so that one objective finds the rows of either set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gradtune.data.dataset import Batch
from gradtune.data.preferences import _is_messages
from gradtune.data.sequences import TokenLists, pad, pad_id
from gradtune.data.text_tasks import DataError, read_rows

Messages = list[dict[str, str]]


def prompt_messages(row: dict[str, Any], where: str) -> Messages:
    """The row's prompt as chat messages: a string (plus an optional ``system``) or a list."""
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: 'prompt' is empty")
        system = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []
        return system + [{"role": "user", "content": prompt}]
    if prompt is None:
        raise DataError(f"{where}: missing 'prompt' (a string or a list of {{role, content}} messages)")
    if not _is_messages(prompt) or prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: 'prompt' must be a string or {{role, content}} messages ending with a user turn")
    return prompt


def render(tokenizer: Any, msgs: Messages) -> tuple[str, list[int]]:
    """(the prompt as text, its token ids): the chat template with the assistant header, else
    the messages' contents joined by newlines (with the tokenizer's BOS)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return text, tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "\n".join(m["content"] for m in msgs)
    return text, tokenizer(text)["input_ids"]


class PromptDataset(TokenLists):
    """Prompts as token ids, with their rows (the reward functions' extra columns) and the
    prompts as the file gives them (``texts``: a string or messages, what a reward function is
    given, as TRL does)."""

    def __init__(self, ids: list[list[int]], texts: list[Any], rows: list[dict[str, Any]], pad_id: int) -> None:
        self.input_ids, self.texts, self.rows, self.pad_id = ids, texts, rows, pad_id
        self.tag = 0  # 0: training set, 1: validation set (batch["source"])
        self.dropped = 0

    def get(self, idx: torch.Tensor) -> Batch:
        seqs = self.pick(idx.tolist())
        return {
            "prompt_ids": pad(seqs, self.pad_id, 1),
            "prompt_len": torch.tensor([len(s) for s in seqs], dtype=torch.long),
            "row": idx.clone(),
            "source": torch.full((len(seqs),), self.tag, dtype=torch.long),
            "sample_id": idx,
        }

    def subset(self, indices: Sequence[int]) -> PromptDataset:
        """The prompts at ``indices`` (a train / eval split), renumbered from 0."""
        rows = list(indices)
        out = PromptDataset(self.pick(rows), [self.texts[i] for i in rows], [self.rows[i] for i in rows], 0)
        out.pad_id = self.pad_id
        out.tag = self.tag
        return out


def load_prompts(path: str | Path, tokenizer: Any, max_length: int = 512) -> PromptDataset:
    """The JSONL file's prompts; a prompt longer than ``max_length`` tokens is dropped (cutting
    it would cut the question or the assistant header), counted in ``dropped``."""
    path = Path(path)
    ids, texts, rows, dropped = [], [], [], 0
    for line_no, row in read_rows(path):
        msgs = prompt_messages(row, f"{path}:{line_no}")
        _, tokens = render(tokenizer, msgs)
        if len(tokens) > max_length:
            dropped += 1
            continue
        ids.append(tokens)
        texts.append(row["prompt"])
        rows.append({k: v for k, v in row.items() if k not in ("prompt", "system")})
    if not ids:
        raise DataError(f"{path}: no prompt within text.max_length={max_length} tokens")
    data = PromptDataset(ids, texts, rows, pad_id(tokenizer))
    data.dropped = dropped
    return data
