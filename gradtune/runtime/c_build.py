"""Small C kernels built once per machine with the system compiler, cached, loaded by ctypes.

Why not torch's cpp_extension: compiling against torch/extension.h and pybind11 is slow; a C
file that needs no torch headers builds in a second or two. The .so is cached under gradtune's
cache root (``$GRADTUNE_CACHE/kernels``) under a hash of source, flags, compiler and CPU, so
later processes only load it. ``-fopenmp`` binds to the libgomp.so.1 torch has already loaded,
so a kernel's threads and torch's are one pool. Users, each through one ``Library`` and each
falling back to torch ops when it cannot be built: the fused optimizer (optim/fused.py), the
dropout mask (models/mask_kernel.py) and the decoding steps (models/decode_kernel.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional

from gradtune.runtime import cache

# -ffp-contract=off: no FMA unless written (optim/kernel_source.py); -fno-math-errno lets sqrt
# vectorise; -march=native is safe because the CPU model and flags are part of the cache key.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared", "-std=c11"]


def cache_dir() -> Path:
    """Where built kernels live; one file per (source, flags, compiler, CPU) hash."""
    return cache.path("kernels")


def compiler() -> str | None:
    for name in (os.environ.get("GRADTUNE_CC"), os.environ.get("CC"), "gcc", "cc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cpu_id() -> str:
    """CPU model + flags (Linux); elsewhere the machine name. Keys -march=native builds."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() + platform.machine()


def build(cc: str, target: Path, source: str) -> None:
    """Compile into a temp file next to target, then rename: concurrent processes are safe."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / f"{target.stem}.c", Path(tmp) / target.name
        src.write_text(source)
        proc = subprocess.run(
            [cc, *CFLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed:\n{proc.stderr[-2000:]}")
        os.replace(out, target)


def compiled(source: str, stem: str) -> Path:
    """The shared library built from C ``source`` with ``CFLAGS``: ``cache_dir()/<stem>_<key>.so``,
    keyed by source, flags, compiler and CPU, built on first use. RuntimeError when there is no
    compiler or the build fails."""
    cc = compiler()
    key = hashlib.sha256("\0".join([source, *CFLAGS, str(cc), cpu_id()]).encode()).hexdigest()
    target = cache_dir() / f"{stem}_{key[:20]}.so"
    if not target.exists():
        if cc is None:
            raise RuntimeError("no C compiler found (tried $GRADTUNE_CC, $CC, gcc, cc, clang)")
        build(cc, target, source)
    return target


class Library:
    """A C library built from ``source`` on the first ``load()`` (``compiled``), its functions typed
    by ``bind``; ``load()`` is None when it cannot be built or bound, and the caller takes its torch
    path (saying so once with ``warn`` and the reason, when given). Tried once per process;
    ``reset()`` forgets it (tests simulate a missing compiler)."""

    def __init__(self, source: str, stem: str, bind: Callable[[ctypes.CDLL], object], warn: str = "") -> None:
        self.source, self.stem, self.bind, self.warn = source, stem, bind, warn
        self.lib: Optional[ctypes.CDLL] = None
        self.tried = False

    def load(self) -> Optional[ctypes.CDLL]:
        if not self.tried:
            self.tried = True
            try:
                lib = ctypes.CDLL(str(compiled(self.source, self.stem)))
                self.bind(lib)
                self.lib = lib
            except Exception as err:  # no compiler, a failed build or a missing symbol: the torch path
                self.lib = None
                if self.warn:
                    warnings.warn(f"{self.warn} Reason: {err}", RuntimeWarning, stacklevel=3)
        return self.lib

    def reset(self) -> None:
        self.lib, self.tried = None, False


def bind_per_type(lib: ctypes.CDLL, signatures: dict[str, list], types: Iterable[str]) -> None:
    """Type ``lib``'s functions ``<name>_<type>`` for every name and type: argument types from
    ``signatures[name]``, no result (kernels generated per element type: c_vectors.PER_TYPE)."""
    for t in types:
        for name, args in signatures.items():
            f = getattr(lib, f"{name}_{t}")
            f.argtypes, f.restype = args, None
