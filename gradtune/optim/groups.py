"""Optimizer parameter groups for weight decay: matrices decay, biases and norm gains never do.

Decaying a bias or a norm's gain pulls it towards 0, which only hurts (nanoGPT, LitGPT and the
HF Trainer all exempt them). ``model.parameters()`` yields a tied tensor once, so a tied
embedding / output matrix is in exactly one group.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn


def decay_groups(
    model: nn.Module, weight_decay: float, decay_embeddings: bool = True
) -> Optional[list[dict[str, Any]]]:
    """[{2-D trainable params, weight_decay}, {the rest, 0.0}]; None when weight_decay is 0
    (one group of every trainable parameter). ``decay_embeddings=False`` also exempts
    ``nn.Embedding`` tables (some recipes do; nanoGPT decays them)."""
    if weight_decay == 0:
        return None
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        matrix = p.dim() >= 2 and (decay_embeddings or id(p) not in embeddings)
        (decay if matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def output_layer(model: nn.Module) -> Optional[nn.Module]:
    """The module that writes the model's outputs: Hugging Face's ``get_output_embeddings()``
    when the model has one (lm_head), else the last module, in registration order, that holds a
    2-D parameter itself (our GPT's lm_head, a classification head, the MLP's last layer, the
    linear model)."""
    get = getattr(model, "get_output_embeddings", None)
    found = get() if callable(get) else None
    if isinstance(found, nn.Module):
        return found
    last = None
    for m in model.modules():
        if any(p.dim() == 2 for p in m.parameters(recurse=False)):
            last = m
    return last


def hidden_matrices(model: nn.Module) -> set[int]:
    """ids of the parameters Muon steps: trainable, exactly 2-D, not an embedding table (an
    ``nn.Embedding``'s weight, the input embeddings, or a parameter whose name holds 'embed'),
    not the output layer's (``output_layer``; a tied head is the embedding). Conv kernels (4-D),
    norms, biases and scalars are not 2-D, so AdamW takes them."""
    excluded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    get_in = getattr(model, "get_input_embeddings", None)
    found = get_in() if callable(get_in) else None
    for m in (found if isinstance(found, nn.Module) else None, output_layer(model)):
        if m is not None:
            excluded |= {id(p) for p in m.parameters()}
    return {
        id(p)
        for name, p in model.named_parameters()
        if p.requires_grad and p.dim() == 2 and id(p) not in excluded and "embed" not in name.lower()
    }


def muon_groups(model: nn.Module, params: Any, lr: float, muon_lr: float) -> list[dict[str, Any]]:
    """``params`` (tensors, or groups such as ``decay_groups``' or a head's own lr) split into
    AdamW groups first (so ``param_groups[0]["lr"]``, the logged rate, is the AdamW one) then
    Muon groups (``"muon": True``). Each keeps its group's keys; a Muon group's lr is
    ``muon_lr`` times its group's lr / ``lr`` (a head at 10x lr would keep its 10x)."""
    groups = [dict(g) for g in params] if params and isinstance(params[0], dict) else [{"params": list(params)}]
    hidden = hidden_matrices(model)
    adamw, muon = [], []
    for g in groups:
        ps = list(g["params"])
        rest = {k: v for k, v in g.items() if k != "params"}
        others = [p for p in ps if id(p) not in hidden]
        mats = [p for p in ps if id(p) in hidden]
        if others:
            adamw.append({**rest, "params": others, "muon": False})
        if mats:
            ratio = g["lr"] / lr if "lr" in g and lr > 0 else 1.0
            muon.append({**rest, "params": mats, "muon": True, "lr": muon_lr * ratio})
    return adamw + muon
