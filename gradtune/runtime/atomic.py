"""Atomic file writes: write to a temporary sibling, fsync, then rename over the target.

A reader (or a resumed run) sees either the old file or the new one, never half of one, even if
the process is killed mid-write or the disk fills up.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from gradtune.runtime.errors import GradtuneError


def umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc), else by the
    set-and-restore dance."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode every written file gets: what ``open()`` gives a new file under the umask
    (mkstemp's temporary is 0600 whatever the umask; a replaced file gets it too, so a run's
    files all read alike)."""
    return 0o666 & ~umask()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``target`` atomically. A target
    that exists and is not a regular file (a device such as /dev/null, a pipe, a socket, a
    folder) is refused: renaming over it would replace the device node or pipe itself."""
    target = Path(target)
    if target.exists() and not target.is_file():
        raise GradtuneError(f"{target}: not a regular file; gradtune writes files only")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fchmod(f.fileno(), file_mode())
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(target: Path | str, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
