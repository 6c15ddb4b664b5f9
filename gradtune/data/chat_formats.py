"""Instruction and chat rows in the shapes people's files have, as one list of
``{role, content}`` messages (what ``instructions.encode`` renders with the chat template).

    prompt_response  {"prompt": ..., "response": ...}                      (optional "system")
    alpaca           {"instruction": ..., "input": ..., "output": ...}     (input optional; user
                     text = instruction, then a blank line and input when input is not empty)
    sharegpt         {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}
    messages         {"messages": [{"role": "user", "content": ...}, ...]}  (OpenAI style)

``text.fields`` maps a standard name to the file's own key ({prompt: question, response:
answer}; also role / content / from / value inside messages). ``text.format: auto`` picks the
shape from the first row's keys and says so in one line. A new format: its name in
``config/schema.py`` ``TextSection.format``, a ``detect`` rule and a branch in ``to_messages``.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gradtune.data import records
from gradtune.data.text_tasks import DataError, read_rows
from gradtune.runtime import distributed

Messages = list[dict[str, str]]
FORMATS = ("prompt_response", "alpaca", "sharegpt", "messages")
# ShareGPT's speaker names -> chat roles (the names FastChat, axolotl and TRL accept).
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
ROLES = ("system", "user", "assistant")


class Fields:
    """The file's key for each standard field name."""

    def __init__(self, mapping: dict[str, str] | None) -> None:
        self.mapping = dict(mapping or {})

    def __call__(self, name: str) -> str:
        return self.mapping.get(name, name)


def rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``file:line``, row) of a .jsonl / .csv / .tsv file, or of every record of a Parquet
    shard, a ``datasets.save_to_disk`` folder, a .jsonl.gz, a folder or a glob
    (``records.resolve``)."""
    p = Path(path)
    if p.is_dir() or (p.is_file() and p.suffix.lower() not in (".jsonl", ".csv", ".tsv")) or glob.has_magic(str(path)):
        for shard in records.resolve(str(path)):
            for line, row in records.records(shard):
                yield f"{shard.path}:{line}", row
        return
    for line, row in read_rows(p):  # a missing file, a FIFO... : one line saying what is there
        yield f"{p}:{line}", row


def resolve(path: Any, fmt: str, fields: Fields, first: tuple[str, dict[str, Any]] | None) -> str:
    """``fmt``, or (auto) the format of the first row, announced in one line."""
    if fmt != "auto" or first is None:
        return fmt
    found = detect(first[1], fields, first[0])
    announce(path, found, first[1])
    return found


def guess(row: dict[str, Any], fields: Fields) -> str | None:
    """The format a row's keys show, or None."""
    keys = set(row)
    if fields("messages") in keys:
        return "messages"
    if fields("conversations") in keys:
        return "sharegpt"
    if fields("instruction") in keys and fields("output") in keys:
        return "alpaca"
    if fields("prompt") in keys and fields("response") in keys:
        return "prompt_response"
    return None


def detect(row: dict[str, Any], fields: Fields, where: str) -> str:
    """The format of a row from its keys; a row that fits none is an error listing them."""
    found = guess(row, fields)
    if found:
        return found
    names = ", ".join(repr(k) for k in list(row)[:8])
    raise DataError(
        f"{where}: cannot tell the format from the keys ({names}): need 'messages', 'conversations', "
        f"'instruction'+'output' or 'prompt'+'response'; set text.format and text.fields (e.g. "
        f"text.fields={{prompt: question, response: answer}})"
    )


def announce(path: Any, fmt: str, row: dict[str, Any]) -> None:
    """The one line saying what auto-detection found (rank 0 only)."""
    if distributed.is_main():
        print(f"data: {path}: {fmt} format (auto-detected from the keys of the first row: {', '.join(map(str, row))})")


def _text(row: dict[str, Any], key: str, where: str, fmt: str, optional: bool = False) -> str | None:
    value = row.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        what = f"missing {key!r}" if key not in row else f"{key!r} is not a string ({type(value).__name__})"
        raise DataError(f"{where}: {what} ({fmt} format; map your keys with text.fields)")
    return value


def _system(row: dict[str, Any], fields: Fields, where: str, fmt: str) -> Messages:
    system = _text(row, fields("system"), where, fmt, optional=True)
    return [{"role": "system", "content": system}] if system else []


def chat(value: Any, key: str, fields: Fields, where: str, sharegpt: bool) -> Messages:
    """A list of turns as {role, content}: ShareGPT's {from, value} (human / gpt / system) or
    {role, content}, either through ``fields``."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of turns")
    role_key, text_key = (fields("from"), fields("value")) if sharegpt else (fields("role"), fields("content"))
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get(role_key), str) or role_key not in turn:
            raise DataError(f"{where}: {key}[{i}] has no {role_key!r} (each turn needs {role_key!r} and {text_key!r})")
        if not isinstance(turn.get(text_key), str):
            raise DataError(
                f"{where}: {key}[{i}] has no {text_key!r} text (each turn needs {role_key!r} and {text_key!r})"
            )
        role = SHAREGPT_ROLES.get(turn[role_key].lower()) if sharegpt else turn[role_key]
        if role not in ROLES:
            known = ", ".join(SHAREGPT_ROLES) if sharegpt else ", ".join(ROLES)
            raise DataError(f"{where}: {key}[{i}]: unknown role {turn[role_key]!r} (known: {known})")
        out.append({"role": role, "content": turn[text_key]})
    return out


def to_messages(row: dict[str, Any], fmt: str, fields: Fields, where: str) -> Messages:
    """One row in format ``fmt`` as chat messages with at least one assistant turn."""
    if fmt == "messages":
        msgs = chat(row.get(fields("messages")), fields("messages"), fields, where, sharegpt=False)
    elif fmt == "sharegpt":
        msgs = chat(row.get(fields("conversations")), fields("conversations"), fields, where, sharegpt=True)
    elif fmt == "alpaca":
        instruction = _text(row, fields("instruction"), where, fmt)
        extra = _text(row, fields("input"), where, fmt, optional=True)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        msgs = _system(row, fields, where, fmt) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _text(row, fields("output"), where, fmt)},
        ]
    else:
        msgs = _system(row, fields, where, fmt) + [
            {"role": "user", "content": _text(row, fields("prompt"), where, fmt)},
            {"role": "assistant", "content": _text(row, fields("response"), where, fmt)},
        ]
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: the conversation has no assistant turn to train on")
    return msgs
