"""Host memory policy for CPU training on text: keep the heap while shapes are fixed, release it
once they vary (dynamic padding).

glibc's malloc serves large blocks with mmap and unmaps them on free; after the first such free
it raises its mmap threshold (up to 32 MB) so that later blocks of that size come from the heap,
and it trims the heap's free top back to the system once that exceeds twice the threshold. A
training step frees most of what it allocated (activations, gradients), so by default each step
hands hundreds of MB back and the next faults them in afresh, page by page, each fault zeroed by
the kernel; a block over 32 MB (the dense gradient of a trained vocabulary embedding: 30522 x 384
floats for MiniLM, more for any LLM) is a fresh mmap every step whatever happens. Three modes:

  * keep (``arm``: loop/run_setup.py, CPU runs on sequences, from the start): blocks up to KEEP
    come from the heap and freed heap stays mapped, so a step reuses the pages of the one
    before. Safe while shapes are fixed: the heap holds what one step needs.
  * release, once batch lengths vary (CHANGES changes of the padded length within the last
    WINDOW steps): each step allocates activations of new sizes and a kept heap would grow well
    past what is ever live at once. The mmap threshold is fixed at 1 MB (large activations go
    back on free; a lower one would fault more) and ``malloc_trim(0)`` after every optimizer step
    returns free heap pages (the step's small activations) too -- much cheaper than activation
    checkpointing for a similar saving.
  * release too, as a safety valve, when the resident size in keep mode grows past GROWTH times
    its size after WARM steps: a heap block that a 64-byte-aligned ``posix_memalign`` (torch's)
    cannot reuse once small allocations have taken its padding would otherwise be replaced by a
    fresh one from the top every step (seen on a 47 MB gradient block).

The settings are the process's: they outlast the run (a later run in the same process starts
from them). Off glibc nothing is done. Rare changes (a short last batch, a few untruncated texts)
leave keep mode on.
"""

from __future__ import annotations

import ctypes
import platform
from collections import deque
from typing import Optional

import torch

from gradtune.runtime.memory_peak import current_bytes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameter numbers (malloc.h)
KEEP = 1 << 30  # bytes: blocks up to this size come from the heap in keep mode; free top kept up to it
THRESHOLD = 1 << 20  # bytes: the mmap threshold in release mode
WINDOW = 16  # steps looked back at
CHANGES = 4  # sequence-length changes within WINDOW steps that switch to release
WARM = 4  # steps after which keep mode takes the resident size as its reference
GROWTH = 1.5  # resident size over that reference that switches to release
CPU = torch.device("cpu")

_libc: Optional[ctypes.CDLL] = None  # set once release mode is applied
_armed = False
_kept = False  # keep mode on (until release mode replaces it)


def _glibc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_large_blocks() -> bool:
    """Keep mode now: blocks up to KEEP from the heap, its free top kept mapped; False (nothing
    done) off glibc."""
    global _kept
    libc = _glibc()
    # The mmap threshold first: glibc refuses one over its maximum and changes nothing; the trim
    # threshold, always taken, would also freeze the adaptive mmap threshold at its 128 KB start.
    if libc is None or not (libc.mallopt(M_MMAP_THRESHOLD, KEEP) and libc.mallopt(M_TRIM_THRESHOLD, KEEP)):
        return False
    _kept = True
    return True


def release_large_blocks() -> bool:
    """Release mode now: the mmap threshold fixed at 1 MB and ``trim`` enabled; False (nothing
    done) off glibc."""
    global _libc, _kept
    libc = _glibc()
    if libc is None or not libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD):
        return False
    _libc, _kept = libc, False
    return True


def arm() -> None:
    """Ask for the policy on this process's run: keep mode from now, ``Adaptive`` switches to
    release when shapes vary or memory grows."""
    global _armed
    _armed = True
    if not tuned():  # a process already in release mode stays there
        keep_large_blocks()


def armed() -> bool:
    return _armed


def tuned() -> bool:
    return _libc is not None


def kept() -> bool:
    return _kept


def trim() -> None:
    """Return free heap memory to the system (glibc malloc_trim)."""
    if _libc is not None:
        _libc.malloc_trim(0)


def describe() -> str:
    """One phrase for logs and benches: what the policy is doing in this process."""
    if tuned():
        return "memory policy release (batch lengths vary)"
    if kept():
        return "memory policy keep (batch lengths fixed)"
    return "memory policy armed, off" if _armed else "memory policy off"


class Adaptive:
    """Watches each step's padded sequence length (and, in keep mode, the resident size) and
    switches to release mode once the length varies or memory grows.

    ``lengths`` (N,) tokens per training sample; a batch of samples ``idx`` is padded to the
    longest, rounded up to ``multiple`` (data/sequences.py), which is the length watched."""

    def __init__(self, lengths: torch.Tensor, multiple: int = 1) -> None:
        self.lengths, self.multiple = lengths, max(1, multiple)
        self.recent: deque[bool] = deque(maxlen=WINDOW)
        self.last: Optional[int] = None
        self.on = tuned()
        self.steps = 0
        self.reference = 0  # resident bytes after WARM steps in keep mode

    def after_step(self, micro: list[torch.Tensor]) -> None:
        """Called after each optimizer step with the step's micro-batches of sample indices."""
        if self.on:
            trim()  # hand the freed activations back to the system
            return
        longest = max(int(self.lengths.index_select(0, idx).max()) for idx in micro if len(idx))
        length = -(-longest // self.multiple) * self.multiple
        self.recent.append(self.last is not None and length != self.last)
        self.last = length
        if sum(self.recent) >= CHANGES or self._grew():
            release_large_blocks()  # False off glibc: trim is then a no-op
            self.on = True
            trim()

    def _grew(self) -> bool:
        """Keep mode's valve: the resident size past GROWTH x its size after WARM steps."""
        if not kept():
            return False
        self.steps += 1
        resident = current_bytes(CPU) or 0  # 0 where it cannot be read: the valve stays shut
        if self.steps <= WARM:
            self.reference = resident
            return False
        return self.reference > 0 and resident > GROWTH * self.reference
