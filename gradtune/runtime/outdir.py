"""Which folders gradtune may write into, decided before a byte is written.

An output folder is gradtune's own or it is new: it holds the marker ``.gradtune-run`` (written
when gradtune creates or first claims it), or it is absent or empty. A pretrained model folder,
a project folder holding a hand-written config.yaml, a data folder: each is refused with one
line naming it, because replacing model.safetensors or config.yaml there would destroy a file
gradtune does not own. So is an output folder that is not a folder or not writable, and an input
(data, init weights, the config file read, the model) that sits at a path the run is about to
replace: it would be read, then overwritten.

Export folders (a PEFT adapter, a merged HF folder) are plain HF folders, not runs: they must be
absent or empty, are written into a temporary sibling and renamed into place, so a failed export
leaves nothing half-written behind.

Runs made before the marker existed are recognised, narrowly: every entry is a name a run
writes, and there is a finished run's summary.json or a verifiable-looking checkpoint (refusing
them would strand their checkpoints). A lone metrics.jsonl or config.yaml is not enough: those
names are common outside gradtune.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from gradtune.runtime import lock
from gradtune.runtime.atomic import fsync_dir, write_text
from gradtune.runtime.errors import GradtuneError

MARKER = ".gradtune-run"
# What a run writes in its out_dir: files replaced atomically, folders replaced whole (mlflow.db, mlartifacts
# and wandb: the trackers' own stores, which they grow).
RUN_FILES = (
    "model.safetensors",
    "config.yaml",
    "summary.json",
    "metrics.jsonl",
    "loss.png",
    "lr_find.png",
    "report.html",
    "tokenizer.json",
    "labels.json",
    "run.json",
    "mlflow.db",  # log_to: mlflow's default store (MLflow's SQLite database)
)
RUN_FOLDERS = ("checkpoints", "best", "tb", "tokenizer", "adapter", "merged", "mlartifacts", "wandb")
_REPLACED = ("tokenizer", "adapter", "merged")  # folders a finished run swaps whole for new ones
_TEMP_PREFIXES = (".tmp-", ".old-")  # interrupted writers' leftovers (atomic.py, this module)

Inputs = Iterable["str | Path | None"]


def _resolved(path: "str | Path") -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _is_temp(name: str) -> bool:
    # The lock file names a run in progress (or a dead one): not a file of the run's own.
    return name == lock.NAME or name.startswith(_TEMP_PREFIXES) or (name.startswith(".") and name.endswith(".tmp"))


@contextlib.contextmanager
def _os_errors(what: str, path: "str | Path") -> Iterator[None]:
    """A name the filesystem refuses (a component over 255 bytes, a path over PATH_MAX), a
    parent that cannot be searched or written: one line naming the path, not a traceback."""
    try:
        yield
    except OSError as e:
        why = {
            errno.ENAMETOOLONG: "name too long for the filesystem (at most 255 bytes a component)",
            errno.EACCES: "permission denied",
            errno.EPERM: "permission denied",
            errno.EROFS: "read-only filesystem",
            errno.ELOOP: "too many levels of symbolic links",
        }.get(e.errno or 0, e.strerror or str(e))
        raise GradtuneError(f"{what} {path}: {why}; choose another folder") from None


def _nearest_existing(path: Path, what: str) -> Path:
    """``path`` or its closest existing ancestor; refuses one that is a file (``under a file``)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe != path and not probe.is_dir():
        raise GradtuneError(f"{what} {path}: {probe} is a file, not a folder; choose another folder")
    return probe


def _check_writable(path: Path, what: str) -> None:
    target = _nearest_existing(path, what)
    if target == path and not path.is_dir():
        kind = "a file" if path.is_file() else "not a folder"
        raise GradtuneError(f"{what} {path}: exists and is {kind}; choose a new or empty folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise GradtuneError(f"{what} {path}: {target} is not writable")


def _entries(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if not _is_temp(p.name))
    except OSError as e:
        raise GradtuneError(f"out_dir {folder}: cannot list it ({e.strerror or e})") from None


def is_run_folder(folder: "str | Path") -> bool:
    """Has gradtune marked ``folder`` as one of its run folders?"""
    return (Path(folder) / MARKER).is_file()


def looks_like_run(folder: Path) -> bool:
    """An unmarked folder made by gradtune before the marker: a summary.json with a run's keys,
    or a checkpoint folder with its manifest."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
        if isinstance(summary, dict) and {"steps", "stop_reason", "job"} <= set(summary):
            return True
    except (OSError, ValueError):
        pass
    ckpts = folder / "checkpoints"
    return ckpts.is_dir() and any((p / "manifest.json").is_file() for p in ckpts.glob("step-*"))


def _ownership(folder: Path, files: Sequence[str], folders: Sequence[str]) -> str:
    """'absent' | 'empty' | 'owned' | 'legacy' (an unmarked run made before the marker existed,
    or a folder of such runs, as ``gradtune demo`` writes)."""
    if not folder.exists():
        return "absent"
    if is_run_folder(folder):
        return "owned"
    names = _entries(folder)
    if not names:
        return "empty"
    own = set(files) | set(folders) | {MARKER}
    subruns = [folder / n for n in folders if (folder / n).is_dir()]
    if set(names) <= own and (looks_like_run(folder) or any(is_run_folder(p) or looks_like_run(p) for p in subruns)):
        return "legacy"
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    raise GradtuneError(
        f"out_dir {folder}: not a gradtune run folder (no {MARKER}) and not empty "
        f"({shown}); refusing to write into it: choose a new or empty out_dir"
    )


def _check_layout(folder: Path, files: Sequence[str], folders: Sequence[str]) -> None:
    """What gradtune replaces must have the kind it writes: a file where a file goes, a folder
    (and not another run) where a folder goes."""
    for name in folders:
        p = folder / name
        if p.exists() and not p.is_dir():
            raise GradtuneError(f"out_dir {folder}: {p} exists but is not a folder; move it away")
        if name in _REPLACED and p.is_dir() and is_run_folder(p):
            raise GradtuneError(f"out_dir {folder}: {p} is another gradtune run folder; move it away")
    for name in files:
        if (folder / name).is_dir():
            raise GradtuneError(f"out_dir {folder}: {folder / name} is a folder where gradtune writes a file")


def _check_inputs(folder: Path, inputs: Inputs, files: Sequence[str], folders: Sequence[str]) -> None:
    """No input may be the output folder or lie at a path the run writes (read, then replaced)."""
    written = [folder / n for n in (*files, *folders, MARKER)]
    for item in inputs:
        if item is None or str(item) == "":
            continue
        path = _resolved(item)
        if path == folder or any(_inside(path, w) for w in written):
            raise GradtuneError(
                f"input {item} lies in out_dir {folder} at a path gradtune writes "
                f"and would be overwritten; move it or choose another out_dir"
            )


def check(
    out_dir: "str | Path", inputs: Inputs = (), files: Sequence[str] = RUN_FILES, folders: Sequence[str] = RUN_FOLDERS
) -> str:
    """Refuse (GradtuneError) an ``out_dir`` gradtune must not write into; writes nothing.
    Returns its state: 'absent', 'empty', 'owned' or 'legacy'."""
    with _os_errors("out_dir", out_dir):
        folder = _resolved(out_dir)
        _check_writable(folder, "out_dir")
        state = _ownership(folder, files, folders)
        _check_layout(folder, files, folders)
        _check_inputs(folder, list(inputs), files, folders)
    return state


def claim(
    out_dir: "str | Path",
    inputs: Inputs = (),
    files: Sequence[str] = RUN_FILES,
    folders: Sequence[str] = RUN_FOLDERS,
    checked: bool = False,
) -> Path:
    """``check`` (unless ``checked``: a run's setup did it before anything else), then create
    ``out_dir`` and mark it as gradtune's. Idempotent: a marked folder is left as it is.
    Returns the folder."""
    if not checked:
        check(out_dir, inputs, files, folders)
    folder = Path(out_dir)
    if not is_run_folder(folder):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_text(
                folder / MARKER,
                "This folder is a gradtune run: gradtune replaces the files it "
                "wrote here. Keep other files elsewhere.\n",
            )
        except OSError as e:
            raise GradtuneError(f"out_dir {folder}: cannot create it ({e.strerror or e})") from None
    return folder


def check_dest(dest: "str | Path", inputs: Inputs = ()) -> Path:
    """Refuse an export folder that is a run folder, an input (or holds or lies in one), or not
    empty; writes nothing. Returns the resolved folder."""
    with _os_errors("export folder", dest):
        return _check_dest(dest, inputs)


def _check_dest(dest: "str | Path", inputs: Inputs) -> Path:
    folder = _resolved(dest)
    _check_writable(folder, "export folder")
    if folder.exists():
        if is_run_folder(folder):
            raise GradtuneError(f"export folder {dest}: a gradtune run folder; choose a new or empty folder")
        if _entries(folder):
            raise GradtuneError(f"export folder {dest}: not empty; choose a new or empty folder")
    for item in inputs:
        if item is None or str(item) == "":
            continue
        path = _resolved(item)
        if _inside(folder, path) or _inside(path, folder):
            raise GradtuneError(f"export folder {dest}: overlaps the input {item}; choose a folder outside it")
    return folder


@contextlib.contextmanager
def staged(dest: "str | Path", inputs: Inputs = ()) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``dest`` to fill; on success it is renamed to
    ``dest`` (absent or empty, see ``check_dest``), on failure removed."""
    folder = check_dest(dest, inputs)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, folder)  # replaces an empty folder; refuses one filled meanwhile
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise GradtuneError(
                    f"export folder {dest}: filled by someone else meanwhile; nothing written"
                ) from None
            raise
        fsync_dir(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace(src: Path, dst: Path) -> None:
    """Move the finished file or folder ``src`` onto ``dst`` (same filesystem): a file atomically;
    a folder by two renames, so ``dst`` is the old whole folder or the new one, never a mix."""
    if src.is_dir() and dst.is_dir():
        old = dst.parent / f".old-{dst.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    fsync_dir(dst.parent)
