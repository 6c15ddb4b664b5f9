"""Host memory policy for training on batches whose shapes vary (dynamic padding).

glibc's malloc serves large blocks with mmap and returns them to the system on free, but after
the first such free it raises its mmap threshold (up to 32 MB) so that later blocks of that size
come from the heap instead, and a fragmented heap is not returned. With variable-length batches
every step allocates activations of new sizes: the heap grows past what is ever live at once
(MiniLM fine-tuning on CPU: ~75 MB more peak RSS over 40 steps). Fixing the threshold at 1 MB
keeps large activations in mmap'd blocks that go back on free; small tensors still use the
heap. Measured time per step was unchanged (bench/finetune.py, same run).

Applied by ``gradtune.train.train`` (the command line's process) on CPU runs with
variable-length data only; a library caller of ``fit`` keeps their process's malloc as it is.
"""

from __future__ import annotations

import ctypes
import platform

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number (malloc.h)
THRESHOLD = 1 << 20  # bytes; 256 KB cut peak memory further but page faults cost ~40% more time


def release_large_blocks() -> bool:
    """Fix glibc's mmap threshold at 1 MB; False (and nothing done) on other C libraries."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):
        return False
