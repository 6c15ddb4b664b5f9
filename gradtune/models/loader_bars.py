"""Third-party loaders' progress bars: on a terminal, nowhere in a log file.

transformers converts a .gguf with a tqdm bar of its own ("Converting and de-quantizing GGUF
tensors...") that ignores its logging switches; written to a file or a pipe, its carriage-return
redraws join into one long line per load. tqdm's ``disable=None`` means "only on a terminal":
the bar is given that for the duration of a load.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Iterator

# Modules that bind tqdm at import and draw a bar while loading weights.
_MODULES = ("transformers.modeling_gguf_pytorch_utils",)


@contextlib.contextmanager
def terminal_only() -> Iterator[None]:
    patched = []
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # an optional part missing (no gguf support): nothing to quiet
            continue
        bar = getattr(module, "tqdm", None)
        if bar is not None and not isinstance(bar, functools.partial):
            module.tqdm = functools.partial(bar, disable=None)
            patched.append((module, bar))
    try:
        yield
    finally:
        for module, bar in patched:
            module.tqdm = bar
