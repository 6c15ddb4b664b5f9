"""Model weights to and from safetensors, with tied parameters stored once.

safetensors refuses tensors that share memory (a GPT's lm_head tied to its token embedding):
we keep the first name of each shared tensor and, on load, accept the missing aliases because
filling one fills them all. Names are those of the unwrapped module (no ``_orig_mod.``/``module.``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gradtune.runtime.atomic import atomic_path
from gradtune.runtime.errors import GradtuneError


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without aliases of an already-listed tensor, as contiguous CPU tensors."""
    return dedupe(model.state_dict())


def aliases(model: nn.Module) -> set[str]:
    """Names in the state_dict that alias an earlier entry (tied weights)."""
    return set(model.state_dict()) - set(unique_state(model))


def dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop entries that alias an earlier entry's memory (tied weights), as contiguous CPU tensors."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().cpu().contiguous()
    return out


def save_state(state: dict[str, torch.Tensor], path: Path | str, metadata: Optional[dict[str, str]] = None) -> None:
    """Atomically write a state dict (aliases stored once) as safetensors."""
    with atomic_path(path) as tmp:
        save_file(dedupe(state), str(tmp), metadata=metadata)


def save_weights(model: nn.Module, path: Path | str, metadata: Optional[dict[str, str]] = None) -> None:
    save_state(model.state_dict(), path, metadata)


def misfit(where: Path | str, missing: list[str], unexpected: list[str], shown: int = 5) -> GradtuneError:
    """The one-line error for weights whose names are not the model's; when the only difference
    is the q/k norms, the setting that makes them fit (runs from before the llama family's
    QK-norm default have none)."""
    hint = ""
    norms = ("q_norm.weight", "k_norm.weight")
    if missing and not unexpected and all(k.endswith(norms) for k in missing):
        hint = "; the weights have no q/k norms: set gpt.qk_norm=false"
    elif unexpected and not missing and all(k.endswith(norms) for k in unexpected):
        hint = "; the weights have q/k norms: set gpt.qk_norm=true"
    return GradtuneError(
        f"{where}: weights do not fit the model (missing {missing[:shown]}, unexpected {unexpected[:shown]}){hint}"
    )


def load_weights(model: nn.Module, path: Path | str) -> None:
    """Load a safetensors file into ``model``; names and shapes must match (tied aliases may be absent)."""
    p = Path(path)
    if not p.is_file():
        raise GradtuneError(f"weights file not found: {path}")
    try:
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise GradtuneError(f"{path}: not a readable safetensors file ({e})") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state) - aliases(model))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise misfit(path, missing, unexpected)
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise GradtuneError(f"{path}: '{k}' has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
