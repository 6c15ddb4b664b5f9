""" "Did it train?": checked once, after the first optimizer step.

    snapshot = audit.before(model, expect_trainable)   # before the first step
    ... forward, backward, optimizer.step() ...
    audit.check(model, snapshot)                        # raises AuditError naming offenders

Every trainable parameter must have a finite, non-zero gradient and must have moved; every
frozen one must be bit-for-bit unchanged; and the trainable set must be the one the method
declared. This catches silent no-ops: the LoRA + activation-checkpointing trap (inputs that do
not require grad, so no LoRA factor gets a gradient), a parameter frozen by mistake, a head left
out of the optimizer, a module the forward never uses.

Why fingerprints rather than copies: a copy of every weight doubles memory on a large model.
Trainable parameters get a hash of their bytes (exact for "moved"; they are few, or, in full
fine-tuning, the optimizer reads them all anyway). Frozen ones get a witness instead: their
storage address and autograd version counter, which every in-place torch op bumps (optimizer
steps, ``add_``, ``copy_``, writes through ``.detach()``). Hashing them would read every frozen
byte: seconds on a 7B model, and weights that transformers memory-maps from safetensors would
all become resident (MiniLM: +47 MB for embedding rows no batch uses). Not seen: writes that
bypass torch's version counter (through ``.data``, numpy views, raw pointers).

One exemption, by construction: while a LoRA ``lora_b`` is zero (the first step), the gradient
of its ``lora_a`` is ``B^T (...) = 0``, so that A may neither get a non-zero gradient nor move;
it must still get a gradient tensor (it is connected), and its B must pass every check.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from gradtune.finetune.lora import lora_layers

_MAX_NAMES = 8  # offenders listed per problem; the count says how many more


class AuditError(RuntimeError):
    """Training did not do what the fine-tuning method promised; the message names offenders."""


@dataclass(frozen=True)
class Snapshot:
    fingerprints: dict[str, object]  # name -> hash of its bytes (trainable) or witness (frozen)
    trainable: frozenset[str]  # names with requires_grad at snapshot time
    expected: frozenset[str] | None  # what the method declared trainable, if given
    zero_grad_ok: frozenset[str] = frozenset()  # lora_a whose lora_b is still zero


def fingerprint(t: torch.Tensor) -> bytes:
    """Hash of the tensor's raw bytes (any dtype, any device). The hash reads the tensor's own
    memory through the buffer protocol: no copy (a copy of a 47 MB embedding matrix would add
    47 MB to the run's peak memory)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.blake2b(raw, digest_size=16).digest()


def witness(t: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    """(storage address, version counter, shape): changes with any in-place torch write."""
    return t.data_ptr(), t._version, tuple(t.shape)


def _mark(p: torch.Tensor, trainable: bool) -> object:
    return fingerprint(p) if trainable else witness(p)


def before(model: nn.Module, expect_trainable: Iterable[str] | None = None) -> Snapshot:
    """Fingerprint every parameter; ``expect_trainable`` is the method's declared set."""
    params = dict(model.named_parameters())
    return Snapshot(
        fingerprints={n: _mark(p, p.requires_grad) for n, p in params.items()},
        trainable=frozenset(n for n, p in params.items() if p.requires_grad),
        expected=None if expect_trainable is None else frozenset(expect_trainable),
        zero_grad_ok=frozenset(
            f"{n}.lora_a.weight" for n, m in lora_layers(model).items() if not m.lora_b.weight.any()
        ),
    )


def problems(model: nn.Module, snapshot: Snapshot) -> dict[str, list[str]]:
    """Problem -> offending parameter names (empty dict: all good)."""
    found: dict[str, list[str]] = {}
    params = dict(model.named_parameters())
    if snapshot.expected is not None:
        found["expected trainable but frozen"] = sorted(snapshot.expected - snapshot.trainable)
        found["trainable but not expected"] = sorted(snapshot.trainable - snapshot.expected)
    for name, p in params.items():
        moved = _mark(p, name in snapshot.trainable) != snapshot.fingerprints.get(name)
        if name not in snapshot.trainable:
            if moved:
                found.setdefault("frozen but changed", []).append(name)
            continue
        if p.grad is None:
            found.setdefault(
                "trainable but no gradient (unused in forward, or inputs "
                "do not require grad under activation checkpointing)",
                [],
            ).append(name)
        elif not torch.isfinite(p.grad).all():
            found.setdefault("non-finite gradient", []).append(name)
        elif name in snapshot.zero_grad_ok:
            continue
        elif not p.grad.any():
            found.setdefault("all-zero gradient", []).append(name)
        elif not moved:
            found.setdefault("gradient but did not move (not in the optimizer? lr 0?)", []).append(name)
    return {k: v for k, v in found.items() if v}


def check(model: nn.Module, snapshot: Snapshot) -> None:
    """Raise ``AuditError`` listing each problem and its offenders; silent when all is well."""
    found = problems(model, snapshot)
    if found:
        parts = []
        for what, names in found.items():
            more = f" (+{len(names) - _MAX_NAMES} more)" if len(names) > _MAX_NAMES else ""
            parts.append(f"{what}: {', '.join(names[:_MAX_NAMES])}{more}")
        raise AuditError("training audit failed after the first step; " + "; ".join(parts))
