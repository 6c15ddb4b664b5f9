"""Python's cyclic garbage collector paused while a process loads what it keeps.

Importing torch, transformers or matplotlib and building a pretrained model create hundreds of
thousands of objects that live as long as the process. While they load, the collector's full
passes walk all of them again and again and free nothing: a large share of a short command's
start-up. Reference counting still frees whatever is not in a cycle; the collector resumes (if it
was on) when the block ends. Used as ``with paused():`` or as a decorator.

Resumed, the collector would still walk everything the block loaded once or twice more (the
objects are young: the first collections after the block scan all of them). A command, whose
loads live until it exits, calls ``keep_loaded()``: from then on each block ends by freezing what
exists (``gc.freeze``: out of every later pass). A library user's process is left as it was.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

_KEEP = False  # this process is a command: what it loads lives until it exits


def keep_loaded() -> None:
    """What exists now, and what each later ``paused`` block loads, is never walked again."""
    global _KEEP
    _KEEP = True
    gc.freeze()


@contextlib.contextmanager
def paused() -> Iterator[None]:
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if _KEEP:
            gc.freeze()
        if was_on:
            gc.enable()
