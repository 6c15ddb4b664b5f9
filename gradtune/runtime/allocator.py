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

Both only pay when shapes vary. With batches of one shape (texts all truncated to max_length:
every batch full length) the heap reuses the same blocks each step and never grows, while the
fixed threshold would make every large activation fault its pages in afresh, each step. So the
policy is adaptive: ``arm`` (``gradtune.train.train``, CPU runs with variable-length data; a
library caller of ``fit`` keeps their process's malloc as it is) only marks it wanted; the loop
feeds each step's sequence length to ``Adaptive``, which applies it once the length has
changed CHANGES times within the last WINDOW steps, and trims after every step from then on.
Rare changes (a short last batch, a few untruncated texts) leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import platform
from collections import deque
from typing import Optional

import torch

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number (malloc.h)
THRESHOLD = 1 << 20  # bytes
WINDOW = 16  # steps looked back at
CHANGES = 4  # sequence-length changes within WINDOW steps that switch the policy on

_libc: Optional[ctypes.CDLL] = None  # set once the policy is applied
_armed = False


def release_large_blocks() -> bool:
    """Fix glibc's mmap threshold at 1 MB and enable ``trim`` now; False (nothing done) elsewhere."""
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


def arm() -> None:
    """Ask for the policy on this process's run; ``Adaptive`` applies it once shapes vary."""
    global _armed
    _armed = True


def armed() -> bool:
    return _armed


def tuned() -> bool:
    return _libc is not None


def trim() -> None:
    """Return free heap memory to the system (glibc malloc_trim)."""
    if _libc is not None:
        _libc.malloc_trim(0)


def describe() -> str:
    """One phrase for logs and benches: what the policy is doing in this process."""
    if tuned():
        return "memory policy on (batch lengths vary)"
    return "memory policy armed, off (batch lengths fixed)" if _armed else "memory policy off"


class Adaptive:
    """Watches each step's padded sequence length and applies the policy once it varies.

    ``lengths`` (N,) tokens per training sample; a batch of samples ``idx`` is padded to the
    longest, rounded up to ``multiple`` (data/sequences.py), which is the length watched."""

    def __init__(self, lengths: torch.Tensor, multiple: int = 1) -> None:
        self.lengths, self.multiple = lengths, max(1, multiple)
        self.recent: deque[bool] = deque(maxlen=WINDOW)
        self.last: Optional[int] = None
        self.on = tuned()

    def after_step(self, micro: list[torch.Tensor]) -> None:
        """Called after each optimizer step with the step's micro-batches of sample indices."""
        if self.on:
            trim()  # hand the freed activations back to the system
            return
        longest = max(int(self.lengths.index_select(0, idx).max()) for idx in micro if len(idx))
        length = -(-longest // self.multiple) * self.multiple
        self.recent.append(self.last is not None and length != self.last)
        self.last = length
        if sum(self.recent) >= CHANGES:
            release_large_blocks()  # False off glibc: trim is then a no-op
            self.on = True
            trim()
