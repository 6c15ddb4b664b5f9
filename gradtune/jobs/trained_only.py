"""A fine-tuning run of a pretrained model keeps what trained, not a copy of the base.

A LoRA run of a 135M model trains 3.6 MB of factors; storing its whole model.safetensors (517
MB) beside them copied the base into every run. When only part of the model trains (LoRA, a new
head, BitFit, freeze) and the frozen rest is the base as loaded, ``model.safetensors`` holds the
trainable tensors only, and its metadata the base's fingerprint (path, sizes, sha256 of its
weights: models/base_fingerprint.py). Reloading (jobs/reload.py) rebuilds the base with the
run's method, as training did, checks the fingerprint first (one line naming the base if it is
gone or changed) and loads the stored tensors over it: the same model, to the bit. A full
fine-tune stores everything, as before; ``export --merged`` / ``export=merged`` still writes a
standalone folder for whoever wants one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from gradtune.config import Config
from gradtune.config.defaults import is_pretrained
from gradtune.models import base_fingerprint
from gradtune.runtime.errors import GradtuneError

KIND = "gradtune.stored"  # metadata key: "trained" for a file holding the trained tensors only
BASE = "gradtune.base"  # metadata key: the base's fingerprint, JSON


def trained_names(model: nn.Module) -> set[str]:
    """State-dict names of the parameters that train (requires_grad), tied aliases included."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


def select(
    model: nn.Module, cfg: Config, state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to store, extra safetensors metadata) for a finished run's ``state``: the trained
    tensors and the base's fingerprint when part of a pretrained model trained, else all."""
    if not is_pretrained(cfg.model) or cfg.method == "full" or not state:  # a full fine-tune stands alone
        return state, {}
    names = trained_names(model) & set(state)
    buffers = {n for n, _ in model.named_buffers()} & set(state)
    if not names or len(names) + len(buffers) >= len(state):  # everything trained: nothing to share
        return state, {}
    try:
        base = base_fingerprint.take(cfg.model)
    except (OSError, GradtuneError):  # the base went away during training: keep the whole model
        return state, {}
    kept = {k: v for k, v in state.items() if k in names}
    return kept, {KIND: "trained", BASE: json.dumps(base)}


def metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # an unreadable file is reported by the loader, with its own message
        return {}


def base_of(path: Path) -> Optional[dict]:
    """The fingerprint of the base a trained-only weights file applies to; None for a full file."""
    meta = metadata(path)
    if meta.get(KIND) != "trained":
        return None
    try:
        return json.loads(meta[BASE])
    except (KeyError, ValueError) as e:
        raise GradtuneError(f"{path}: trained weights without a readable base fingerprint ({e})") from None


def check_base(path: Path, run: Path) -> None:
    """Refuse, in one line, to reload ``path`` when its base is gone or changed."""
    saved = base_of(path)
    if saved is None:
        return
    why = base_fingerprint.mismatch(saved)
    if why:
        raise GradtuneError(
            f"{run}: {why}; this run stores only its trained weights and applies them to that base "
            f"(put the same file back at {saved['path']})"
        )


def load_trained(model: nn.Module, path: Path) -> None:
    """Load a trained-only file over ``model`` (built from the base): every stored tensor must be
    one of the model's trainable ones, with its shape; every trainable one must be stored."""
    state = load_file(str(path))
    own = model.state_dict()
    want = trained_names(model) & set(own)
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise GradtuneError(
            f"{path}: trained weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    with torch.no_grad():
        for k, v in state.items():
            if v.shape != own[k].shape:
                raise GradtuneError(f"{path}: '{k}' has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
            own[k].copy_(v)
