"""Defaults that depend on what is trained: a model family's recipe, a method's learning rate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# A model family's own defaults, applied before the file and the command line. A language model
# trains on text with Muon/AdamW, warm-up + cosine and clipping (nanoGPT's recipe), not on diabetes.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    # ``model: gpt`` alone is the recipe (configs/gpt-shakespeare.yaml, where every choice is
    # commented; tests/unit/config keeps the two equal): a 1.7M-parameter Llama-family model with the
    # nanoGPT speedrun's Muon and QK-norm (gpt.qk_norm unset: the llama family's, on), on the plays,
    # 10 minutes of wall time (configs/ says why ReLU^2 and WSD stayed out). An explicit epochs or
    # max_steps replaces the max_time budget.
    "gpt": {
        "data": "shakespeare",
        "text": {"tokenizer": "byte"},
        "gpt": {"family": "llama", "n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 192, "block_size": 256},
        "val_fraction": 0.05,
        # Muon on the hidden matrices, AdamW (lr) on the embedding and norms: the recipe's largest gain
        "optimizer": "muon",
        "muon_lr": 0.02,
        "lr": 2e-3,
        "betas": [0.9, 0.99],
        "weight_decay": 0.1,
        "batch_size": 8,
        "schedule": "cosine",
        "warmup_steps": 100,
        "min_lr": 1e-4,
        "clip_grad_norm": 1.0,
        "max_time": "10m",
        "epochs": 100,
        "eval_every": 250,
        "eval_tokens": 16384,
        "log_every": 50,
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


# A convergence run (tol > 0) given no budget: the epochs cap that stands in for "until it converges".
CONVERGENCE_EPOCHS = 10_000
# The settings that are a run's budget: one given explicitly replaces the family's default budget.
BUDGET_KEYS = ("epochs", "max_steps", "max_time")


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
