"""The README's settings table, generated from the schema's field comments (the single source):
``python -m gradtune.config`` prints it."""

from __future__ import annotations

import dataclasses
import inspect

from gradtune.config.schema import Config


def field_docs(cls: type = Config, obj: object | None = None) -> list[tuple[str, str, str]]:
    """(key, default, comment) for every field of ``cls`` (the top-level settings by default; a
    section's class for its own); the README table is made from this. ``obj``: take the defaults
    from this instance instead (a model family's defaults)."""
    src = [s.strip() for s in inspect.getsource(cls).splitlines()]
    docs = []
    for f in dataclasses.fields(cls):
        at = next((i for i, s in enumerate(src) if s.startswith(f"{f.name}:")), None)
        if obj is not None:
            default = getattr(obj, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        docs.append((f.name, repr(default), _comment(src, at)))
    return docs


def sections() -> dict[str, tuple[type, str]]:
    """Section name (``gpt``, ``lora``...) -> (its class, its one-line description)."""
    out = {}
    for f in dataclasses.fields(Config):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
            cls = type(f.default_factory())
            out[f.name] = (cls, (inspect.getdoc(cls) or "").splitlines()[0])
    return out


def _comment(src: list[str], at: int | None) -> str:
    """A field's comment: on its own line, or (when that would pass 120 characters) the block above it."""
    if at is None:
        return ""
    if "#" in src[at]:
        return src[at].split("#", 1)[1].strip()
    above = []
    for line in reversed(src[:at]):
        if not line.startswith("#") or line.startswith("# ---"):
            break
        above.insert(0, line[1:].strip())
    return " ".join(above)


def markdown_table() -> str:
    """The README's settings table, made from the dataclass (the single source)."""
    names = sections()
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, comment in field_docs():
        if key not in names:
            rows.append(f"| `{key}` | `{default}` | {comment.replace('|', '/')} |")
    return "\n".join(rows)
