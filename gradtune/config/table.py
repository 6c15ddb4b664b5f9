"""The README's settings table, generated from the schema's field comments (the single source):
``python -m gradtune.config`` prints it."""

from __future__ import annotations

import dataclasses
import inspect

from gradtune.config.schema import Config

def field_docs() -> list[tuple[str, str, str]]:
    """(key, default, comment) for every top-level setting; the README table is made from this."""
    src = inspect.getsource(Config).splitlines()
    docs = []
    for f in dataclasses.fields(Config):
        line = next((s for s in src if s.strip().startswith(f"{f.name}:")), "")
        comment = line.split("#", 1)[1].strip() if "#" in line else ""
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        docs.append((f.name, repr(default), comment))
    return docs


def markdown_table() -> str:
    """The README's settings table, made from the dataclass (the single source)."""
    sections = {f.name for f in dataclasses.fields(Config)
                if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory())}
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, comment in field_docs():
        if key not in sections:
            rows.append(f"| `{key}` | `{default}` | {comment.replace('|', '/')} |")
    return "\n".join(rows)
