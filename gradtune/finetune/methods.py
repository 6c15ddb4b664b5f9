"""Compose the fine-tuning transforms from the config's own sections: one entry point.

    model, trainable = methods.apply(model, "head+lora", num_outputs=2, lora=LoraSection(rank=8))

``method`` says what in the pretrained body trains (full | freeze | lora | bitfit, or 'head'
alone: the body frozen); ``quantize`` (int8 | nf4) first replaces the body's linear layers by
``QuantLinear`` (codes + scales, dequantised per matmul; not the output embedding), so LoRA
wraps quantised bases and the head is added in float32; ``num_outputs`` (set by the task) adds a head on the
pooled encoder output, and the head always trains. The sections are passed exactly as the config holds them
(``cfg.lora``, ``cfg.freeze``, ``cfg.finetune``), already validated by ``gradtune.config``.
``trainable`` is the set of parameter names the method declares trainable, for
``audit.before(model, trainable)``.
"""

from __future__ import annotations

from torch import nn

from gradtune.config.schema import METHODS, FinetuneSection, FreezeSection, LoraSection
from gradtune.finetune.bitfit import bitfit
from gradtune.finetune.freeze import freeze as freeze_layers
from gradtune.finetune.freeze import full
from gradtune.finetune.heads import add_head
from gradtune.finetune.lora import DEFAULT_TARGETS, apply_lora
from gradtune.finetune.quantize import KINDS, quantize_model
from gradtune.runtime.errors import InputError


def body_method(method: str) -> str:
    """The method that decides the body's trainable weights: 'head+lora' -> 'lora', 'head' -> 'head'."""
    body = [m.strip() for m in method.split("+") if m.strip() and m.strip() != "head"]
    return body[0] if body else "head"


def apply(
    model: nn.Module,
    method: str,
    num_outputs: int | None = None,
    *,
    lora: LoraSection | None = None,
    freeze: FreezeSection | None = None,
    finetune: FinetuneSection | None = None,
    quantize: str = "none",
    source: str | None = None,
) -> tuple[nn.Module, frozenset[str]]:
    """Transform ``model`` per ``method``; add a head when ``num_outputs`` is given. ``source``:
    the model's source, so that a .gguf base keeps its own quantised blocks under ``quantize``.

    Returns the (possibly wrapped) model and the names of the parameters that must train.
    """
    body = body_method(method)
    if body not in METHODS:
        raise InputError(f"unknown fine-tuning method {method!r}; choose one of {', '.join(METHODS)}")
    if body == "head" and num_outputs is None:
        raise InputError("method 'head' needs a classification or regression task (it adds a head)")
    lora, freeze, finetune = lora or LoraSection(), freeze or FreezeSection(), finetune or FinetuneSection()
    if quantize != "none":
        if quantize not in KINDS or body not in ("head", "lora"):
            raise InputError(
                f"quantize={quantize} holds a frozen base quantised: use one of {', '.join(KINDS)} "
                f"with method lora, head or head+lora (not '{method}')"
            )
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        quantize_model(model, quantize, skip=[out], source=source)  # before LoRA wraps them, before any head
    if body == "full":
        full(model)
    elif body == "freeze":
        freeze_layers(model, freeze.patterns, freeze.train_last_blocks, freeze.embeddings)
    elif body == "head":
        model.requires_grad_(False)
    elif body == "lora":
        apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets or DEFAULT_TARGETS)
    elif body == "bitfit":
        bitfit(model)
    if num_outputs is not None:
        cache = body == "head" and finetune.cache_features
        model = add_head(model, num_outputs, finetune.pooling, finetune.head_dropout, cache_features=cache)
    return model, frozenset(n for n, p in model.named_parameters() if p.requires_grad)
