"""One JSON object (a config.json, a JSONL line) from bytes or text, or one line of error that
names where it came from (``file`` or ``file:line``) and what to do about it."""

from __future__ import annotations

import json
from typing import Any

from gradtune.runtime.errors import InputError


def parse_object(raw: bytes | str, where: str, error: type[InputError] = InputError) -> dict[str, Any]:
    """``json.loads(raw)`` when it is an object; else ``error`` naming ``where``."""
    try:
        value = json.loads(raw)
    except UnicodeDecodeError:
        raise error(f"{where}: not UTF-8 text; save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno}, column {e.colno}"
        raise error(f"{where}: not valid JSON ({e.msg} at {at})") from None
    if not isinstance(value, dict):
        raise error(f"{where}: expected a JSON object, found {type(value).__name__}")
    return value
