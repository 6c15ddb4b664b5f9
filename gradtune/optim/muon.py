"""Muon (MomentUm Orthogonalized by Newton-Schulz): torch.optim.Muon's rule, for 2-D matrices.

    buf = momentum * buf + (1 - momentum) * g        # buf starts at 0 (torch: lerp)
    u   = (1 - momentum) * g + momentum * buf  (nesterov)  else  buf
    O   = NS_k(u)                                    # ~ U V^T of u = U S V^T, in bfloat16
    p   = p * (1 - lr * weight_decay)                # decoupled decay at the unscaled lr
    p   = p - lr * scale(shape) * O                  # scale: adjust_lr_fn, see adjust_lr

NS_k is k steps of the quintic Newton-Schulz iteration (newton_schulz.py): singular values near 1,
in bfloat16 as torch's. ``muon_reference`` orthogonalises one matrix at a time; the optimizers'
step (``muon_group_``) does the same operations with equally shaped matrices orthogonalised as one
batch (``orthogonalise``, bitwise equal to the reference, checked on first use).

Every matrix then moves by the same spectral amount whatever its gradient's scale, which is why
Muon is for the hidden matrices only; embeddings, output heads, norms and biases go to AdamW
(``MuonAdamW`` in muon_adamw.py holds both in one optimizer).

State per parameter: ``momentum_buffer`` (shape of p), as torch's, so state_dicts carry over.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from torch import Tensor

from gradtune.optim.base import Optimizer, no_grad
from gradtune.optim.hyper import MuonHyper
from gradtune.optim.newton_schulz import NS_COEFFICIENTS, NS_EPS, NS_STEPS, newton_schulz, orthogonalise
from gradtune.optim.params import check_lr, step_groups

ADJUST_LR = (None, "original", "match_rms_adamw")


def adjust_lr(lr: float, adjust_lr_fn: Optional[str], shape: torch.Size) -> float:
    """The lr an orthogonalised (A, B) update is applied with. ``original`` (None): Keller
    Jordan's sqrt(max(1, A / B)), so a tall matrix's update has the RMS of a square one's;
    ``match_rms_adamw``: Moonshot's 0.2 * sqrt(max(A, B)), the RMS of a typical AdamW update, so
    AdamW's lr and weight decay carry over."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * (0.2 * math.sqrt(max(rows, cols)))
    return lr


def muon_reference(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], hyper: MuonHyper) -> None:
    """The update, one matrix at a time (each needs its own Newton-Schulz iteration)."""
    lr, momentum = hyper.lr, hyper.momentum
    for param, grad, buf in zip(params, grads, bufs):
        buf.lerp_(grad, 1 - momentum)  # momentum * buf + (1 - momentum) * g
        update = grad.lerp(buf, momentum) if hyper.nesterov else buf
        ortho = newton_schulz(update, hyper.ns_coefficients, hyper.ns_steps, hyper.eps)
        param.mul_(1 - lr * hyper.weight_decay)
        param.add_(ortho, alpha=-adjust_lr(lr, hyper.adjust_lr_fn, param.shape))


def muon_batched(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], hyper: MuonHyper) -> None:
    """``muon_reference``'s operations on each matrix, with the orthogonalisation of equally shaped
    matrices batched (newton_schulz.py ``orthogonalise``): the same values, bit for bit."""
    lr, momentum = hyper.lr, hyper.momentum
    updates = []
    for grad, buf in zip(grads, bufs):
        buf.lerp_(grad, 1 - momentum)
        updates.append(grad.lerp(buf, momentum) if hyper.nesterov else buf)
    for param, ortho in zip(params, orthogonalise(updates, hyper.ns_coefficients, hyper.ns_steps, hyper.eps)):
        param.mul_(1 - lr * hyper.weight_decay)
        param.add_(ortho, alpha=-adjust_lr(lr, hyper.adjust_lr_fn, param.shape))


def momentum_buffers(state: dict[Tensor, Any], params: list[Tensor]) -> list[Tensor]:
    """Each matrix's buffer, created at zero on its first step (torch's lazy init)."""
    for p in params:
        if "momentum_buffer" not in state[p]:
            state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return [state[p]["momentum_buffer"] for p in params]


def muon_group_(state: dict[Tensor, Any], group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
    """One group's Muon step with its hyper-parameters (shared by ``Muon`` and ``MuonAdamW``)."""
    if any(torch.is_complex(p) for p in params):
        raise RuntimeError("gradtune Muon does not support complex parameters")
    muon_batched(params, grads, momentum_buffers(state, params), MuonHyper.of(group))


def check_hyper(lr: Any, momentum: float, weight_decay: float, ns_steps: int, adjust_lr_fn: Optional[str]) -> None:
    """torch.optim.Muon's argument checks, same messages' meaning."""
    check_lr(lr)
    if not 0.0 <= momentum:
        raise ValueError(f"Invalid momentum value: {momentum} (must be >= 0)")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")
    if not 0 < ns_steps < 100:
        raise ValueError(f"Invalid ns_steps: {ns_steps} (must be in [1, 99])")
    if adjust_lr_fn not in ADJUST_LR:
        raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")


def check_matrices(param_groups: list[dict[str, Any]], rule: str) -> None:
    for group in param_groups:
        for p in group["params"]:
            if p.ndim != 2:
                raise ValueError(f"{rule} only supports 2D parameters; found one of size {tuple(p.size())}")


class Muon(Optimizer):
    """Drop-in for torch.optim.Muon (same arguments, defaults and state). 2-D parameters only:
    give the others to AdamW, or use ``MuonAdamW`` for both in one optimizer."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = NS_EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: Optional[str] = None,
    ) -> None:
        check_hyper(lr, momentum, weight_decay, ns_steps, adjust_lr_fn)
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=tuple(ns_coefficients),
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)
        check_matrices(self.param_groups, "Muon")

    @no_grad
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        return step_groups(self, closure, "Muon", muon_group_)
