"""Run folders that never mix: a run given no ``out_dir`` gets a folder of its own.

    runs/mlp-20261205-201500        the run (a second one in the same second: ...-201500-2)
    runs/latest -> mlp-20261205-201500   a relative symlink to the newest run, replaced atomically

``out_dir: runs/latest`` (the default) means "a new folder under runs/"; each run's files stay
in its own folder, so an early-stopping run's ``best/`` or an lr-find plot never lands beside a
later run's weights. ``eval``/``predict``/``generate``/``export`` take ``runs/latest`` like any
run folder (the link is followed).

Rerunning the same command resumes: the newest unfinished run folder of the same model (it has
checkpoints and no summary.json) whose checkpoint's config matches is chosen again instead of a
new one (the caller says what "matches" means). Under torchrun every rank must name the same
folder: the name takes the launcher's start time (the ranks' common parent), not each rank's.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Callable, Optional

from gradtune.runtime.errors import GradtuneError

DEFAULT = "runs/latest"
LATEST = "latest"
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def is_default(out_dir: str) -> bool:
    """Is ``out_dir`` the default, "a new run folder under runs/"?"""
    return os.path.normpath(out_dir) == os.path.normpath(DEFAULT)


def stem(model: str) -> str:
    """A folder-name stem for ``model``: 'mlp', 'gpt', or a pretrained model's file or folder
    name without .gguf ('SmolLM2-135M-Instruct-Q8_0'), at most 60 characters."""
    name = Path(model.rstrip("/")).name if ("/" in model or model.endswith(".gguf")) else model
    name = name[: -len(".gguf")] if name.endswith(".gguf") else name
    if name == "model":  # a package's folder named 'model': its parent names it better
        name = Path(model.rstrip("/")).parent.name or name
    return (_UNSAFE.sub("-", name).strip("-.") or "run")[:60]


def _launch_time() -> float:
    """When the launcher (the common parent of torchrun's ranks) started, in seconds since the
    epoch: the same on every rank of one node."""
    try:
        ticks = int(Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration) as e:
        raise GradtuneError(
            f"out_dir: under torchrun, give out_dir=... (the ranks cannot agree on a new folder's name: {e})"
        ) from None


def _newest_unfinished(root: Path, prefix: str, resumable: Callable[[Path], bool]) -> Optional[Path]:
    try:
        names = sorted((p for p in root.iterdir() if p.name.startswith(prefix + "-") and p.is_dir()), reverse=True)
    except OSError:
        return None
    for folder in names:
        if folder.is_symlink() or (folder / "summary.json").exists():
            continue
        if (folder / "checkpoints").is_dir() and resumable(folder):
            return folder
    return None


def choose(
    out_dir: str, model: str, resumable: Callable[[Path], bool], distributed: bool = False, main: bool = True
) -> tuple[str, bool]:
    """(the folder to use, whether this call created it). ``out_dir`` other than the default comes
    back as it is. For the default: the newest unfinished run of ``model`` that ``resumable``
    accepts, else a new, empty ``runs/<stem>-<YYYYmmdd-HHMMSS>[-n]`` (made here on the main rank,
    so that two runs started in the same second get two folders)."""
    if not is_default(out_dir):
        return out_dir, False
    root = Path(DEFAULT).parent
    prefix = stem(model)
    found = _newest_unfinished(root, prefix, resumable)
    if found is not None:
        return str(found), False
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(_launch_time() if distributed else time.time()))
    base = root / f"{prefix}-{stamp}"
    if distributed or not main:
        return str(base), False
    for n in range(1, 1000):
        candidate = base if n == 1 else root / f"{base.name}-{n}"
        try:
            root.mkdir(parents=True, exist_ok=True)
            os.mkdir(candidate)
            return str(candidate), True
        except FileExistsError:
            continue
        except OSError as e:
            raise GradtuneError(f"out_dir {candidate}: cannot create it ({e.strerror or e})") from None
    raise GradtuneError(f"out_dir {base}: a thousand runs in one second; give out_dir=...")


def point_latest(folder: "str | Path") -> Optional[str]:
    """Make ``runs/latest`` a link to ``folder`` (a folder under runs/), replacing an older link in
    one rename. Returns a line to show when it cannot: a real folder (an older gradtune's run)
    named runs/latest is left as it is."""
    folder = Path(folder)
    link = folder.parent / LATEST
    if link.exists() and not link.is_symlink():
        return f"{link} is a run folder of an older gradtune, left as it is; the newest run is {folder}"
    tmp = folder.parent / f".tmp-{LATEST}-{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(folder.name, tmp)
        os.replace(tmp, link)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        return f"{link}: not updated ({e.strerror or e}); the newest run is {folder}"
    return None
