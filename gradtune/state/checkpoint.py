"""Atomic, verifiable checkpoints: ``out_dir/checkpoints/step-00001234/``.

A checkpoint folder holds
    model.safetensors   the unwrapped model weights
    state.safetensors   every other tensor: optimizer state, torch RNG states, epoch sums
    state.json          everything else (plain JSON): step, data position, guard, RNGs, ...
    config.json         the resolved config and its hash
    manifest.json       sha256 and size of each file above; written last

Why this shape: nothing is ever unpickled (a checkpoint may come from anywhere), a torn or
tampered folder is detected by the manifest before any byte of it is used, and a reader never
sees a half-written folder: files are written into ``.tmp-step-...``, each file and the folder
are fsynced, then the folder is renamed into place (rename is atomic on POSIX filesystems).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from gradtune.runtime import testhooks
from gradtune.runtime.atomic import fsync_dir
from gradtune.runtime.errors import GradtuneError

FORMAT = 1
FILES = ("model.safetensors", "state.safetensors", "state.json", "config.json")
_NAME = re.compile(r"^step-(\d{8,})$")


class WriteError(GradtuneError):
    """A checkpoint could not be written (disk full, permissions): the run stops, the previous
    checkpoint is intact. Exit code 74 (EX_IOERR): the input was fine, the environment was not."""

    exit_code = 74


# --- a tree of tensors and Python values <-> (JSON tree, flat tensor dict) ---------------------


def split_tensors(tree: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able copy of ``tree``; tensors move to ``tensors`` under a dotted key and leave a
    ``{"__tensor__": key}`` marker. Tuples and dicts with non-string keys (optimizer state is
    keyed by int) are tagged so they come back as they were."""
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree.detach()
        return {"__tensor__": prefix}
    if isinstance(tree, dict):
        if all(isinstance(k, str) for k in tree):
            return {k: split_tensors(v, f"{prefix}.{k}", tensors) for k, v in tree.items()}
        return {"__items__": [[k, split_tensors(v, f"{prefix}.{k}", tensors)] for k, v in tree.items()]}
    if isinstance(tree, (tuple, list)):
        if all(type(v) in (int, float) for v in tree):  # fast path: RNG keys, loss windows
            items = list(tree)
        else:
            items = [split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(tree)]
        return {"__tuple__": items} if isinstance(tree, tuple) else items
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"cannot checkpoint a {type(tree).__name__} at '{prefix}'")


def join_tensors(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``split_tensors``."""
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        if set(tree) == {"__items__"}:
            return {k: join_tensors(v, tensors) for k, v in tree["__items__"]}
        if set(tree) == {"__tuple__"}:
            return tuple(join_tensors(v, tensors) for v in tree["__tuple__"])
        return {k: join_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [join_tensors(v, tensors) for v in tree]
    return tree


def _host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no shared storage (safetensors refuses aliases, e.g. tied embeddings)."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if ptr is not None and ptr in seen:
            v = v.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = v
    return out


# --- random states ---------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) CUDA generator states."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# --- writing ---------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as f:
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))
    _fsync_file(path)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(_host(tensors), str(path), metadata={"format": "pt"})
    _fsync_file(path)


def root(out_dir: Path) -> Path:
    """Where a run's checkpoints live: ``out_dir/checkpoints``."""
    return Path(out_dir) / "checkpoints"


def folder_name(step: int) -> str:
    return f"step-{step:08d}"


def sweep(root: Path) -> None:
    """Remove what killed writers left behind (``.tmp-*`` / ``.old-*``): never a checkpoint."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


def save(
    root: Path,
    step: int,
    model: dict[str, torch.Tensor],
    state: dict[str, Any],
    config: dict[str, Any],
    config_hash: str,
    keep: int,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; keep the newest ``keep``.

    On a write error the temporary folder is removed, the previous checkpoints are untouched,
    and ``WriteError`` names the path and the last good step.
    """
    final = root / folder_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        sweep(root)
        tmp.mkdir()
        tensors: dict[str, torch.Tensor] = {}
        state_json = split_tensors(state, "state", tensors)
        _write_tensors(tmp / "model.safetensors", model)
        testhooks.hit("ckpt.model")
        _write_tensors(tmp / "state.safetensors", tensors)
        _write_json(tmp / "state.json", state_json)
        _write_json(tmp / "config.json", {"hash": config_hash, "config": config})
        testhooks.hit("ckpt.files")
        write_manifest(tmp, FILES, FORMAT, step, config_hash)
        fsync_dir(tmp)
        testhooks.hit("ckpt.rename")
        into_place(root, tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        good = newest_step(root)
        last = f"step {good} ({root / folder_name(good)})" if good is not None else "none yet"
        reason = e.strerror or str(e)
        raise WriteError(f"cannot write checkpoint {final}: {reason}; last good checkpoint: {last}") from None
    testhooks.hit("ckpt.after")
    prune(root, keep)
    return final


def write_manifest(tmp: Path, names: Sequence[str], fmt: Any, step: int, config_hash: str) -> None:
    """manifest.json, written last: the format, the step, and each file's sha256 and size."""
    files = {n: {"sha256": _sha256(tmp / n), "bytes": (tmp / n).stat().st_size} for n in names}
    _write_json(tmp / "manifest.json", {"format": fmt, "step": step, "config_hash": config_hash, "files": files})


def into_place(root: Path, tmp: Path, final: Path) -> None:
    """Rename the complete temporary folder ``tmp`` to ``final`` (atomic on POSIX filesystems); the
    same step saved again (a resumed run's final checkpoint) replaces the old folder."""
    if final.exists():
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)


def listing(root: Path) -> list[tuple[int, Path]]:
    """Checkpoint folders under ``root``, oldest first (by name; not yet verified)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def newest_step(root: Path) -> Optional[int]:
    found = listing(root)
    return found[-1][0] if found else None


def prune(root: Path, keep: int) -> None:
    for _, path in listing(root)[:-keep]:
        remove(path)


def remove(folder: Path) -> None:
    """Delete ``folder`` so that a kill at any moment leaves it whole under its name or not under
    it at all: renamed out of the listing first (atomic), then deleted; what a killed process
    left half deleted is an ``.old-*`` folder, which ``sweep`` removes, and so does the next removal
    of the same name (``resume: never``'s whole checkpoints folder). (Deleted in place, a kill
    inside rmtree left a checkpoint name on a folder missing some of its files.)"""
    trash = folder.parent / f".old-{folder.name}-{os.getpid()}"
    for stale in folder.parent.glob(f".old-{folder.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(folder, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


# --- verifying and reading -------------------------------------------------------------------


def read_manifest(folder: Path, fmt: Any) -> tuple[Any, Optional[str]]:
    """(the manifest's files entry, None) of a checkpoint folder of format ``fmt``; else (None, why)."""
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        return None, "manifest.json missing (half-written?)"
    try:
        manifest = json.loads(mpath.read_text())
        files, found = manifest["files"], manifest.get("format")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None, "manifest.json is not a valid manifest"
    return (files, None) if found == fmt else (None, f"unknown format {found!r}")


def verify(folder: Path) -> Optional[str]:
    """None if ``folder`` is a complete, untampered checkpoint; else why not (one phrase)."""
    files, why = read_manifest(folder, FORMAT)
    if why:
        return why
    if not isinstance(files, dict) or sorted(files) != sorted(FILES):
        return f"manifest lists {sorted(files) if isinstance(files, dict) else files!r}, expected {sorted(FILES)}"
    return check_files(folder, files)


def check_files(folder: Path, files: dict[str, Any]) -> Optional[str]:
    """None if every file a manifest lists ({name: {"bytes", "sha256"}}) is in ``folder`` with
    that size and digest; else why not (one phrase). Both checkpoint formats verify with it."""
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        try:
            size, digest = int(entry["bytes"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError):
            return f"manifest entry for {name} is malformed"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, manifest says {size} (truncated?)"
        if _sha256(path) != digest:
            return f"{name} checksum mismatch (modified or corrupt)"
    return None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))  # safetensors only: a planted pickle is rejected, never run
    except (SafetensorError, OSError, ValueError) as e:
        raise GradtuneError(f"{path}: not a readable safetensors file ({e})") from None


def load(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model weights, state tree, {"hash", "config"}) of a verified checkpoint folder."""
    why = verify(folder)
    if why:
        raise GradtuneError(f"checkpoint {folder}: {why}")
    model = _read_tensors(folder / "model.safetensors")
    tensors = _read_tensors(folder / "state.safetensors")
    try:
        state = join_tensors(json.loads((folder / "state.json").read_text()), tensors)
        config = json.loads((folder / "config.json").read_text())
    except (ValueError, KeyError) as e:
        raise GradtuneError(f"checkpoint {folder}: unreadable state ({e})") from None
    return model, state, config
