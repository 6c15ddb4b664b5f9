"""Defaults that depend on what is trained: a model family's recipe, a method's learning rate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# A model family's own defaults, applied before the file and the command line. A language model
# trains on text with AdamW, warm-up + cosine and clipping (nanoGPT's recipe), not on diabetes.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt": {
        "data": "shakespeare",
        "val_fraction": 0.05,
        "optimizer": "adamw",
        "lr": 1e-3,
        "betas": [0.9, 0.99],
        "weight_decay": 0.1,
        "batch_size": 16,
        "schedule": "cosine",
        "warmup_steps": 100,
        "min_lr": 1e-4,
        "clip_grad_norm": 1.0,
        "epochs": 1,
        "eval_every": 250,
        "precision": "auto",
    },
    # A pretrained model (HF folder / .gguf): AdamW, one epoch, short texts; lr per method below.
    "pretrained": {
        "optimizer": "adamw",
        "batch_size": 16,
        "epochs": 1,
        "val_fraction": 0.2,
        "text": {"max_length": 64},
        "clip_grad_norm": 1.0,
        "precision": "auto",
    },
}

# Default lr per fine-tuning method: the fewer weights train, the larger the step they take. A
# pretrained body moved by more than ~1e-4 forgets what it knew; a fresh head needs ~1e-2.
_PRETRAINED_LR = {"full": 5e-5, "freeze": 1e-4, "bitfit": 1e-3, "lora": 5e-4, "head": 1e-2}


# Model names built into gradtune; a folder of the same name is reached as ./name.
BUILTIN_MODELS = ("linear", "logistic", "mlp", "gpt")


def is_pretrained(model: str) -> bool:
    """Is ``model`` a pretrained source (a path / HF folder / .gguf) rather than a built-in name?
    Built-in names win over a folder of the same name in the working directory."""
    if model in BUILTIN_MODELS:
        return False
    return "/" in model or model.endswith(".gguf") or Path(model).exists()


def pretrained_lr(method: str) -> float:
    """The default lr of a method; for a combination (head+lora) the smallest, so no part of the
    pretrained body takes a step too large for it."""
    return min((_PRETRAINED_LR.get(m, 5e-5) for m in method.split("+") if m), default=5e-5)
