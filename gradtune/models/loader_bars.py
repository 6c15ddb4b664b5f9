"""Third-party loaders' progress bars: on a terminal, nowhere in a log file.

transformers converts a .gguf with a tqdm bar of its own ("Converting and de-quantizing GGUF
tensors...") that ignores its logging switches, and ``save_pretrained`` draws "Writing model
shards" through its logging's bar; written to a file or a pipe, their carriage-return redraws
join into one long line. tqdm's ``disable=None`` means "only on a terminal": the bar is given
that for the duration of a load, and transformers' own switch is turned off when stderr is not
a terminal.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
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
    switch = None
    if not sys.stderr.isatty():
        try:
            from transformers.utils import logging as switch  # lazy: heavy import
        except ImportError:
            switch = None
    was = switch.is_progress_bar_enabled() if switch is not None else False
    if switch is not None:
        switch.disable_progress_bar()
    try:
        yield
    finally:
        for module, bar in patched:
            module.tqdm = bar
        if switch is not None and was:
            switch.enable_progress_bar()
