"""Files named by ``--out`` (predict, compare, export --gguf, lr-find): one rule for every command.

The file is written into a temporary sibling and renamed over the target (a reader sees the old
file or the new one, never half of one; a failed write leaves the old one). A target that exists
is replaced only when gradtune wrote it and nobody changed it since, or with ``--overwrite``:
anything else is a file of the user's, refused with one line (exit 2).

Which files gradtune wrote: a ledger in the cache root, ``outputs/<hash of the path>.json``, one
entry per file holding its size, mtime and inode just after the rename. A file edited, replaced or
copied over since no longer matches and counts as the user's. Deleting the cache only makes
gradtune more careful (``--overwrite`` needed once). A symlink is written through (its target
gets the content, the link stays a link).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from gradtune.runtime import cache
from gradtune.runtime.atomic import atomic_path, write_text
from gradtune.runtime.errors import GradtuneError


def _resolved(path: "str | Path") -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()


def _entry(target: Path) -> Path:
    return cache.path("outputs", hashlib.sha256(str(target).encode()).hexdigest()[:32] + ".json")


def _identity(target: Path) -> dict[str, int]:
    st = target.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def wrote(target: "str | Path") -> bool:
    """Did gradtune write the file at ``target``, unchanged since?"""
    path = _resolved(target)
    try:
        saved = json.loads(_entry(path).read_text())
        return saved.get("path") == str(path) and saved.get("id") == _identity(path)
    except (OSError, ValueError, AttributeError):
        return False


def record(target: "str | Path") -> None:
    """Remember that gradtune has just written ``target`` (a failure to remember is harmless)."""
    path = _resolved(target)
    with contextlib.suppress(OSError):
        write_text(_entry(path), json.dumps({"path": str(path), "id": _identity(path)}))


def check(out: "str | Path", overwrite: bool, what: str) -> Path:
    """The resolved file ``out`` may be written by ``what`` (e.g. 'predict: --out'); writes nothing.
    Refuses a folder, a device or pipe, a parent that is a file or not writable, and a file of the
    user's unless ``overwrite``."""
    try:
        target = _resolved(out)
        if target.is_dir():
            raise GradtuneError(f"{what} {out}: is a folder; give a file name")
        if target.exists() and not target.is_file():
            raise GradtuneError(f"{what} {out}: not a regular file (a device or a pipe); give a file name")
        parent = target.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise GradtuneError(f"{what} {out}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise GradtuneError(f"{what} {out}: {parent} is not writable")
        if target.exists() and not overwrite and not wrote(target):
            raise GradtuneError(
                f"{what} {out}: exists and gradtune did not write it; give --overwrite to replace it, "
                f"or choose a new name"
            )
    except OSError as e:
        raise GradtuneError(f"{what} {out}: {e.strerror or e}") from None
    return target


@contextlib.contextmanager
def writing(target: "str | Path") -> Iterator[Path]:
    """Yield a temporary sibling to fill (absent: writers that create their file may); on success
    it replaces ``target`` in one rename and the ledger records it. Call ``check`` first."""
    path = _resolved(target)
    with atomic_path(path) as tmp:
        tmp.unlink()
        yield tmp
        if not tmp.exists():
            raise GradtuneError(f"{target}: nothing was written")
    record(path)


def write(target: "str | Path", text: str) -> None:
    with writing(target) as tmp:
        tmp.write_text(text)
