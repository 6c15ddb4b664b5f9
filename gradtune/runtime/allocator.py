"""Host memory policy for training on batches whose shapes vary (dynamic padding).

glibc's malloc serves large blocks with mmap and returns them to the system on free, but after
the first such free it raises its mmap threshold (up to 32 MB) so that later blocks of that size
come from the heap instead, and the heap is not given back while fragmented. With
variable-length batches every step allocates activations of new sizes, so the heap grows well
past what is ever live at once. Two measures (their measured effect on peak memory and step
time: README, fine-tuning):
  * the mmap threshold fixed at 1 MB: large activations live in mmap'd blocks that go back on
    free. A lower threshold returns more memory but makes every large allocation fault its
    pages in afresh, which costs time.
  * ``malloc_trim(0)`` after each optimizer step: free heap pages (the step's small
    activations) go back too, for a little time per step - much less than activation
    checkpointing costs for a similar saving.

Applied by ``gradtune.train.train`` (the command line's process) on CPU runs with
variable-length data only; a library caller of ``fit`` keeps their process's malloc as it is.
"""

from __future__ import annotations

import ctypes
import platform
from typing import Optional

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number (malloc.h)
THRESHOLD = 1 << 20  # bytes

_libc: Optional[ctypes.CDLL] = None  # set once the policy is applied


def release_large_blocks() -> bool:
    """Fix glibc's mmap threshold at 1 MB and enable ``trim``; False (nothing done) elsewhere."""
    global _libc
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        if not libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD):
            return False
    except (OSError, AttributeError):
        return False
    _libc = libc
    return True


def tuned() -> bool:
    return _libc is not None


def trim() -> None:
    """Return free heap memory to the system (glibc malloc_trim); the loop calls it per step."""
    if _libc is not None:
        _libc.malloc_trim(0)
