"""One run per ``out_dir`` at a time: an advisory lock held while a command writes a run folder.

Two ``gradtune train`` processes writing one folder would interleave checkpoints and
metrics.jsonl and one would die on a half-replaced file. The first to arrive takes the lock
(``fcntl.lockf`` on ``out_dir/.gradtune-lock``, a POSIX record lock: the kernel drops it when the
holder exits, ``kill -9`` included, and NFS's lock manager carries it between hosts); any other
is refused with one line naming the holder (pid, host, since when), exit 2, before it writes a
byte. The file's content only names the holder: a file left by a dead process holds no lock, so
the next run takes it over and says so.

The lock is re-entrant within a process (``train()`` and ``fit()`` both take it) and released by
the process that took it: a forked child does not inherit POSIX locks, nor, here, the count. On
release the file is removed, so a finished or refused run leaves no trace of it; a process that
acquired the file's old inode after the removal notices (inode check) and retries on the new one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from gradtune.runtime.errors import GradtuneError

NAME = ".gradtune-lock"


class Busy(GradtuneError):
    """``out_dir`` is held by another running gradtune process (exit 2: choose another folder)."""


@dataclass
class Lease:
    folder: Path
    fd: int
    pid: int  # the process that holds it (a fork's copy of the table is not the lock)
    count: int = 1
    created: bool = False  # the folder did not exist before: removed again if left empty


_HELD: dict[Path, Lease] = {}


def _holder_text() -> str:
    return json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(["gradtune", *sys.argv[1:3]]),
        }
    )


def _describe(raw: str) -> str:
    """'gradtune pid 123 on host h (since 2026-...)' from the lock file's content."""
    try:
        info = json.loads(raw)
        return f"gradtune pid {info['pid']} on host {info['host']} (since {info['since']})"
    except (ValueError, KeyError, TypeError):
        return "another gradtune process"


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode("utf-8", "replace").strip()


def _lock_once(path: Path) -> Optional[int]:
    """The locked fd of ``path``, or None when the file was replaced under us (retry)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        raw = _read(fd)
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise Busy(
                f"out_dir {path.parent} is in use by {_describe(raw)}; wait for it to end, or choose another out_dir"
            ) from None
        raise
    try:
        same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        same = False
    if not same:  # removed by its releasing holder between our open and our lock
        os.close(fd)
        return None
    return fd


def acquire(out_dir: "str | Path", created: bool = False) -> Lease:
    """Hold ``out_dir`` (created if absent) for this process; raises ``Busy`` when another holds it.
    Call after ``outdir.check`` has accepted the folder: this writes the lock file into it.
    ``created``: the caller has just made the folder (removed again if the run leaves it empty)."""
    folder = Path(os.path.abspath(os.path.expanduser(str(out_dir))))
    lease = _HELD.get(folder)
    if lease is not None and lease.pid == os.getpid():
        lease.count += 1
        return lease
    created = created or not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = _lock_once(folder / NAME)
            if fd is not None:
                break
        else:
            raise Busy(f"out_dir {folder}: its lock keeps changing hands; try again")
        previous = _read(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text().encode(), 0)
    except OSError as e:
        raise GradtuneError(f"out_dir {out_dir}: cannot lock it ({e.strerror or e})") from None
    if previous:
        try:
            stale_pid = json.loads(previous).get("pid")
        except (ValueError, AttributeError):
            stale_pid = None
        if stale_pid != os.getpid():
            print(
                f"out_dir {out_dir}: taking over the lock left by {_describe(previous)}, no longer running",
                file=sys.stderr,
                flush=True,
            )
    lease = Lease(folder, fd, os.getpid(), created=created)
    _HELD[folder] = lease
    return lease


def release(lease: Optional[Lease]) -> None:
    """Give the lease back; at the last release the lock file goes (and a folder this run created
    and left empty, so that a refused run leaves nothing behind)."""
    if lease is None or lease.pid != os.getpid() or _HELD.get(lease.folder) is not lease:
        return
    lease.count -= 1
    if lease.count > 0:
        return
    del _HELD[lease.folder]
    with contextlib.suppress(OSError):
        os.unlink(lease.folder / NAME)  # still locked: a waiter on the old inode retries
    os.close(lease.fd)
    if lease.created:
        with contextlib.suppress(OSError):
            lease.folder.rmdir()  # only if empty


def release_all() -> None:
    """Drop every lease of this process (a command ending at once on a signal)."""
    for lease in list(_HELD.values()):
        lease.count = 1
        release(lease)


@contextlib.contextmanager
def holding(out_dir: "str | Path", enabled: bool = True, created: bool = False) -> Iterator[Optional[Lease]]:
    """``acquire`` for the block (nothing when ``enabled`` is false: ranks other than 0)."""
    lease = acquire(out_dir, created) if enabled else None
    try:
        yield lease
    finally:
        release(lease)
