"""Python's cyclic garbage collector paused while a process loads what it keeps.

Importing torch, transformers or matplotlib and building a pretrained model create hundreds of
thousands of objects that live as long as the process. While they load, the collector's full
passes walk all of them again and again and free nothing: a large share of a short command's
start-up. Reference counting still frees whatever is not in a cycle; the collector resumes (if it
was on) when the block ends. Used as ``with paused():`` or as a decorator.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
