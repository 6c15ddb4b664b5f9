"""Which base model a run's trained weights belong to: path, size and sha256 of its weights files.

A LoRA / head / BitFit run stores only what trained and is reloaded by applying it to the base
(jobs/trained_only.py); the fingerprint taken at save time tells, at reload, whether that base
is still there and still the same bytes. Hashing a multi-GB file on every reload would cost
seconds to minutes, so each file's sha256 is kept in the cache root (``base-hashes/``), keyed
by its path, size, mtime and inode: recomputed only when the file changed (or the cache was
deleted).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from gradtune.models import hf
from gradtune.runtime import cache
from gradtune.runtime.atomic import write_text
from gradtune.runtime.errors import GradtuneError

_CHUNK = 1 << 20  # bytes read per hash update


def weight_files(source: "str | Path") -> list[Path]:
    """The files holding ``source``'s weights: the .gguf, or the folder's *.safetensors."""
    folder, gguf = hf.resolve(source)
    return [folder / gguf] if gguf else sorted(folder.glob("*.safetensors"))


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"


def sha256(path: Path) -> str:
    """The file's sha256, from the cache when the file is unchanged since it was hashed."""
    key = _stat_key(path)
    entry = cache.path("base-hashes", hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(entry.read_text())
        if saved["key"] == key:
            return str(saved["sha256"])
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with contextlib.suppress(OSError):
        write_text(entry, json.dumps({"key": key, "sha256": digest}))
    return digest


def take(source: "str | Path") -> dict[str, Any]:
    """{"path": the model as given (absolute), "files": [{"name", "size", "sha256"}, ...]}."""
    files = weight_files(source)
    return {
        "path": os.path.abspath(os.path.expanduser(str(source))),
        "files": [{"name": p.name, "size": p.stat().st_size, "sha256": sha256(p)} for p in files],
    }


def mismatch(saved: dict[str, Any]) -> Optional[str]:
    """None when the base at ``saved["path"]`` is the one fingerprinted; else why not (one line)."""
    path = saved["path"]
    if not Path(path).exists():
        return f"base model {path} is gone"
    try:
        now = {f.name: f for f in weight_files(path)}
    except GradtuneError as e:
        return f"base model {path} no longer loads ({e})"
    for want in saved["files"]:
        have = now.get(want["name"])
        if have is None:
            return f"base model {path} no longer has {want['name']}"
        if have.stat().st_size != want["size"] or sha256(have) != want["sha256"]:
            return f"base model {path} changed since the run ({want['name']}: other bytes)"
    return None
