"""A cheap fingerprint of a data file, so a resumed run can tell the file changed under it.

The row count alone misses an edited file of the same length (a relabelled column, a fixed
typo): the run would continue on data it never started with. Hashing a large corpus at every
resume would cost minutes, so the hash covers 16 blocks of 64 KiB at fixed offsets spread over
the file, plus its size: the whole content for files up to 1 MiB, a sample beyond. An edit that
misses every sampled block still changes the modification time, which is compared too when the
hash does not cover the whole file (a copied file then needs ``resume: force``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

from gradtune import datasets
from gradtune.data import records
from gradtune.runtime.errors import GradtuneError

BLOCKS = 16
BLOCK = 64 * 1024


def data_path(data: Any) -> Optional[Path]:
    """The file behind ``data``: an embedded data set's packaged file, else the path itself;
    None if it names no single file (a folder, glob or list). Embedded names win."""
    if not isinstance(data, str):
        return None
    if data in datasets.TEXT:
        return datasets.HERE / datasets.TEXT[data]
    if data in datasets.EMBEDDED:
        return datasets.embedded_path(data)
    path = Path(data).expanduser()
    return path if path.is_file() else None


def _sampled_sha256(path: Path, size: int) -> str:
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        if size <= BLOCKS * BLOCK:
            h.update(f.read())
        else:
            span = size - BLOCK
            for i in range(BLOCKS):  # first and last block included: headers and appended rows
                f.seek(span * i // (BLOCKS - 1))
                h.update(f.read(BLOCK))
    return h.hexdigest()


def data_name(data: Any) -> str:
    """A short name of ``data`` for titles: a file's or folder's name, or "N sources"."""
    if isinstance(data, str):
        return Path(data).name or data
    mixture = all(isinstance(d, dict) for d in data)
    return f"a mixture of {len(data)} sources" if mixture else f"{len(data)} sources"


def shard_digest(path: Path) -> str:
    """ "size:mtime_ns:sampled sha256" of one file: the token cache's key for a shard."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}:{_sampled_sha256(path, st.st_size)}"


def _paths(spec: Any) -> list[Path]:
    return [s.path for s in records.resolve(spec)]


def _many(data: Any) -> Optional[dict[str, Any]]:
    """The fingerprint of a folder, glob or list of files (a mixture: its sources' paths): the
    shards' sizes and sampled hashes combined."""
    specs = [d.get("path") if isinstance(d, dict) else d for d in data] if isinstance(data, list) else [data]
    try:
        paths = [p for spec in specs for p in ([data_path(spec)] if spec in datasets.TEXT else _paths(spec))]
        digests = [shard_digest(p) for p in paths]
    except (GradtuneError, OSError, TypeError):
        return None
    return {
        "file": str(data),
        "bytes": sum(int(d.split(":")[0]) for d in digests),
        "mtime_ns": max(int(d.split(":")[1]) for d in digests),
        "sha256": hashlib.sha256("|".join(digests).encode()).hexdigest(),
        "whole": False,
    }


def fingerprint(data: Any) -> Optional[dict[str, Any]]:
    """{"file", "bytes", "mtime_ns", "sha256", "whole"} of the file (or files) behind ``data``;
    None when it names no readable file (nothing to compare)."""
    path = data_path(data)
    if path is None:
        return _many(data) if not isinstance(data, str) or Path(data).expanduser().is_dir() or "*" in data else None
    try:
        st = os.stat(path)
        digest = _sampled_sha256(path, st.st_size)
    except OSError:
        return None
    return {
        "file": str(path),
        "bytes": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": digest,
        "whole": st.st_size <= BLOCKS * BLOCK,
    }


def changes(saved: Any, now: Optional[dict[str, Any]]) -> list[str]:
    """How the data differs from the fingerprint ``saved`` in a checkpoint (empty: same data,
    or nothing to compare: a checkpoint from before fingerprints, or no file)."""
    if not isinstance(saved, dict) or now is None:
        return []
    found = []
    if saved.get("bytes") != now["bytes"]:
        found.append(f"{saved.get('bytes')} -> {now['bytes']} bytes")
    if saved.get("sha256") != now["sha256"]:
        found.append("content differs")
    if not found and not now["whole"] and saved.get("mtime_ns") != now["mtime_ns"]:
        found.append("modified since (the sampled content matches, the rest was not read)")
    return found
