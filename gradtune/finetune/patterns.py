"""Name patterns that select modules or parameters, shared by freeze, lora and bitfit.

A pattern is a glob on the dotted name (``encoder.layer.*.attention.*``); a pattern without a
dot also matches the last components (``query`` matches ``encoder.layer.0.attention.self.query``,
like PEFT's ``target_modules``). ``re:`` starts a regular expression matched on the whole name.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True if ``name`` matches any pattern (see the module doc for the syntax)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern):
            return True
    return False
