"""BitFit (Ben Zaken et al. 2021): train only the bias terms, about 0.1% of a transformer."""

from __future__ import annotations

from torch import nn

from gradtune.finetune.freeze import set_trainable
from gradtune.runtime.errors import InputError


def bitfit(model: nn.Module) -> nn.Module:
    """Freeze every weight, train every bias; in place. Llama-style models have no bias: error."""
    if not any(n.endswith("bias") for n, _ in model.named_parameters()):
        raise InputError(f"bitfit: {type(model).__name__} has no bias parameters to train")
    return set_trainable(model, lambda n: n.split(".")[-1] == "bias")
