"""SGD with momentum, dampening, Nesterov and (coupled, L2) weight decay: torch.optim.SGD's rule.

    d   = g + weight_decay * p                       # L2 penalty folded into the gradient
    buf = d                      (first step)        # torch starts momentum at the gradient,
    buf = momentum * buf + (1 - dampening) * d       #   not at zero, so step 1 is undamped
    d   = d + momentum * buf  (nesterov)  else  buf
    p   = p - lr * d                                 # the one update every optimizer ends in

State per parameter: ``momentum_buffer`` (same shape as p), only when momentum != 0 —
the names and structure of torch's, so state_dicts and LR schedulers carry over unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from gradtune.optim import fused as fast
from gradtune.optim.base import Optimizer, no_grad
from gradtune.optim.hyper import SGDHyper
from gradtune.optim.params import run_closure, with_grads


def sgd_reference(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None] | None, hyper: SGDHyper) -> None:
    """The readable update, one tensor at a time; fills ``bufs[i]`` where it was None."""
    lr, momentum, dampening, weight_decay = hyper.lr, hyper.momentum, hyper.dampening, hyper.weight_decay
    for i, (param, grad) in enumerate(zip(params, grads)):
        direction = grad
        if weight_decay != 0:
            direction = direction.add(param, alpha=weight_decay)  # new tensor: grad untouched
        if bufs is not None:  # momentum != 0
            buf = bufs[i]
            if buf is None:
                buf = bufs[i] = direction.detach().clone()
            else:
                buf.mul_(momentum).add_(direction, alpha=1 - dampening)
            direction = direction.add(buf, alpha=momentum) if hyper.nesterov else buf
        param.add_(direction, alpha=-lr)  # param = param - lr * direction


class SGD(Optimizer):
    """Drop-in for torch.optim.SGD (same arguments in the same order, same state).

    fused: None (default) uses the C fast path when it can be built and the group's tensors
    are dense contiguous CPU float32/float64; True asks for it (falls back with a warning);
    False always runs ``sgd_reference``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        fused: bool | None = None,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum} (must be >= 0)")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, fused=fused
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Called by load_state_dict too: groups saved by torch.optim.SGD lack "fused".
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("fused", None)

    @no_grad
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = run_closure(closure)
        for group, params, grads in with_grads(self.param_groups, "SGD"):
            hyper = SGDHyper.of(group)
            bufs = [self.state[p].get("momentum_buffer") for p in params] if hyper.momentum != 0 else None
            existing = [b for b in bufs if b is not None] if bufs is not None else []
            lib = fast.choose(group["fused"], params + grads + existing)
            if lib is not None:
                first = [b is None for b in bufs] if bufs is not None else None
                if bufs is not None:  # the kernel writes buf = d on the first step
                    bufs = [torch.empty_like(p) if b is None else b for b, p in zip(bufs, params)]
                fast.sgd_(lib, params, grads, bufs, first, hyper)
            else:
                sgd_reference(params, grads, bufs, hyper)
            if bufs is not None:
                for p, buf in zip(params, bufs):
                    self.state[p]["momentum_buffer"] = buf
        return loss
