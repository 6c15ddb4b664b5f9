"""What one optimizer step updates, shared by every update rule: the closure, then per group the
parameters that have a gradient this step (``step_groups``: both in one); and the rules' shared
learning-rate check."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
from torch import Tensor


def run_closure(closure: Optional[Callable[[], float]]) -> Optional[float]:
    """torch.optim's contract: re-evaluate the loss with grad enabled when a closure is given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def with_grads(
    param_groups: list[dict[str, Any]], rule: str
) -> Iterator[tuple[dict[str, Any], list[Tensor], list[Tensor]]]:
    """(group, params with a gradient, their gradients) for each group that has any. A parameter
    without a gradient this step is skipped entirely: its state (buffers, step count) stays."""
    for group in param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError(f"gradtune {rule} does not support sparse gradients")
        yield group, params, grads


def step_groups(
    optimizer: torch.optim.Optimizer,
    closure: Optional[Callable[[], float]],
    rule: str,
    group_step: Callable[[dict[Tensor, Any], dict[str, Any], list[Tensor], list[Tensor]], None],
) -> Optional[float]:
    """One ``optimizer.step``: the closure, then ``group_step(state, group, params, grads)`` for each
    group with gradients (``adamw_group_``, ``muon_group_``, or MuonAdamW's choice of the two);
    returns the closure's loss."""
    loss = run_closure(closure)
    for group, params, grads in with_grads(optimizer.param_groups, rule):
        group_step(optimizer.state, group, params, grads)
    return loss


def check_lr(lr: float | Tensor) -> None:
    """torch.optim's AdamW / Muon learning-rate checks (``not 0 <= lr``: NaN is rejected too; SGD
    keeps torch.optim.SGD's ``lr < 0``, which lets NaN through)."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
