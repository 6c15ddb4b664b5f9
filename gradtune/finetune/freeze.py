"""Which parameters train: everything (``full``), or a chosen part (``freeze``).

torchtune's ``set_trainable_params`` in a few lines: a name predicate decides ``requires_grad``.
The part is chosen by name patterns, by "the last N blocks" of the repeated layer list
(``encoder.layer.N``, ``model.layers.N``, ``transformer.h.N``...), and embeddings on or off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from gradtune.finetune.patterns import matches
from gradtune.runtime.errors import InputError


def set_trainable(model: nn.Module, keep: Callable[[str], bool]) -> nn.Module:
    """``requires_grad = keep(name)`` for every parameter; in place, returns ``model``."""
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name))
    return model


def full(model: nn.Module) -> nn.Module:
    """Train every parameter."""
    return model.requires_grad_(True)


def find_blocks(model: nn.Module) -> str:
    """Name of the repeated block list: the longest ``nn.ModuleList`` of same-type children.

    Why by shape rather than by a table of names: every transformer family names it
    differently, but all of them hold their N identical blocks in one ModuleList.
    """
    best, best_len = "", 1
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > best_len:
            if len({type(c) for c in m}) == 1:
                best, best_len = name, len(m)
    if not best:
        raise InputError(f"{type(model).__name__} has no repeated block list for last_n_blocks")
    return best


def embedding_names(model: nn.Module) -> set[str]:
    """Parameter names that belong to ``nn.Embedding`` modules (token, position, type)."""
    return {
        f"{mn}.{pn}" if mn else pn
        for mn, m in model.named_modules()
        if isinstance(m, nn.Embedding)
        for pn, _ in m.named_parameters(recurse=False)
    }


def freeze(
    model: nn.Module, patterns: Sequence[str] = (), train_last_blocks: int | None = None, embeddings: bool = True
) -> nn.Module:
    """Freeze everything, then train: names matching ``patterns``; the last ``train_last_blocks``
    blocks and what follows them (final norm, pooler, untied output head). ``embeddings``: keep
    the embeddings frozen (True) or train them too (False). The arguments are ``FreezeSection``'s
    fields: ``freeze(model, **asdict(cfg.freeze))``.
    """
    last_n_blocks = train_last_blocks
    keep: set[str] = {n for n, _ in model.named_parameters() if matches(n, patterns)}
    if last_n_blocks is not None:
        blocks = find_blocks(model)
        n_blocks = len(model.get_submodule(blocks))
        if not 0 <= last_n_blocks <= n_blocks:
            raise InputError(f"freeze.train_last_blocks={last_n_blocks} but {blocks} has {n_blocks} blocks")
        first = n_blocks - last_n_blocks
        after_blocks = False
        for name, _ in model.named_parameters():  # definition order: embeddings, blocks, norm, head
            if name.startswith(blocks + "."):
                after_blocks = True
                if int(name[len(blocks) + 1 :].split(".")[0]) >= first:
                    keep.add(name)
            elif after_blocks and last_n_blocks > 0:
                keep.add(name)
    embedded = embedding_names(model)
    keep = (keep - embedded) if embeddings else (keep | embedded)
    if not keep:
        raise InputError("freeze leaves no parameter to train: set freeze.patterns or freeze.train_last_blocks")
    return set_trainable(model, lambda n: n in keep)
