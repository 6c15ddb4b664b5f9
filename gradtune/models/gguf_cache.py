"""A converted copy of a GGUF model in gradtune's cache, so a .gguf base is converted once.

Why: transformers reads a .gguf through gguf's pure-Python reader three times (config, weights,
tokenizer; most of it parsing the vocabulary's strings) and dequantises every tensor: ~25 s for
SmolLM2-135M on 2 cores, paid again by every run, eval, predict, generate, export and resume of
the same base. The first load writes what transformers built under
``$GRADTUNE_CACHE/gguf/<key>/`` (``model/``: config.json + float32 model.safetensors;
``tokenizer/``: the saved tokenizer); later loads read those (~1-2 s).

key: a hash of the file's identity (device and inode: a hard link or a rename of the same file
finds its copy), size and modification time and of the transformers version (its GGUF conversion
may change between versions), so an edited, copied or replaced file is converted again. The
.gguf is only read. Each part is written to a temporary folder and renamed into place once
complete (a killed run leaves no half copy that looks whole). Bases whose float32 copy would
exceed MAX_BYTES, or that do not fit the free disk twice over, are not cached: their loads stay
as slow as transformers' own.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from gradtune.runtime import cache

MAX_BYTES = 4 << 30  # float32 copies above 4 GiB (a ~1B-parameter base) are not kept


def folder(gguf: Path, part: str) -> Path:
    """Where ``part`` ('model' or 'tokenizer') of ``gguf``'s converted copy lives."""
    import transformers  # lazy: heavy

    st = gguf.stat()
    key = f"{st.st_dev}:{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return cache.path("gguf", hashlib.sha256(key.encode()).hexdigest()[:24], part)


def cached(gguf: Path, part: str) -> Optional[Path]:
    """The converted ``part`` if a complete copy is there, else None."""
    try:
        path = folder(gguf, part)
    except OSError:
        return None
    return path if path.is_dir() else None


def store(gguf: Path, part: str, save: Callable[[Path], None], nbytes: int = 0) -> None:
    """Write ``part`` with ``save(folder)``; best effort: a cache that cannot be written
    (read-only home, full disk) only costs the next load its time."""
    try:
        dest = folder(gguf, part)
        if dest.is_dir() or nbytes > MAX_BYTES:
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        if nbytes and shutil.disk_usage(dest.parent).free < 2 * nbytes:
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{part}-", dir=dest.parent))
        try:
            save(tmp)
            os.replace(tmp, dest)  # a directory rename: atomic; fails if another process won the race
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except (OSError, ValueError, RuntimeError):
        return


def save_model(model: torch.nn.Module, dest: Path) -> None:
    """config.json + float32 model.safetensors. transformers refuses ``save_pretrained`` on a
    model it loaded from GGUF (it marks it quantised), though its weights are plain tensors."""
    from safetensors.torch import save_file  # lazy: only on a first GGUF load
    from safetensors.torch import save_model as save_tensors

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(str(dest))
    tensors = model.state_dict()
    # A tied weight stored once, under its source's name (transformers' {target: source}, e.g. the
    # embedding for lm_head): stored under the target's, the source counts as missing on load and
    # transformers fills it with random numbers before tying (~0.1 s for a 50k x 576 embedding).
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in tensors and source in tensors and tensors[target].data_ptr() == tensors[source].data_ptr():
            del tensors[target]
    try:
        save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    except RuntimeError:  # other tensors share memory (refused before writing): safetensors picks the names
        save_tensors(model, str(dest / "model.safetensors"))


def unmark(model: torch.nn.Module) -> None:
    """A model transformers loaded from GGUF holds plain dequantised float tensors, but stays
    marked as quantised (its ``save_pretrained`` refuses to run, so a merged export would fail):
    drop the mark, so it behaves as the same model loaded from its converted copy."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
