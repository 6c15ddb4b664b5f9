"""AdamW (decoupled weight decay, Loshchilov & Hutter 2019): torch.optim.AdamW's rule.

    t   = t + 1
    p   = p * (1 - lr * weight_decay)                # decay the weight, not the gradient
    m   = beta1 * m + (1 - beta1) * g                # first moment  (exp_avg)
    v   = beta2 * v + (1 - beta2) * g * g            # second moment (exp_avg_sq)
    direction = (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps)
    p   = p - lr * direction

State per parameter: ``step`` (0-d float tensor on CPU, as torch keeps it), ``exp_avg`` and
``exp_avg_sq`` (shape of p). Same names and structure as torch, so state_dicts, LR
schedulers and checkpoints carry over unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from gradtune.optim import fused as fast
from gradtune.optim.base import Optimizer, no_grad
from gradtune.optim.hyper import AdamWHyper
from gradtune.optim.params import check_lr, step_groups


def _step_dtype() -> torch.dtype:
    # torch stores step in float64 when the default dtype is float64, else float32.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def adamw_reference(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    hyper: AdamWHyper,
) -> None:
    """The readable update, one tensor at a time, in the operation order torch uses."""
    lr, beta1, beta2, eps, weight_decay = hyper.lr, hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step_t += 1
        step = step_t.item()
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)  # m + (1 - beta1) * (g - m)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        # direction * lr folded as torch does: (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


def _state_for(state: dict[Tensor, Any], p: Tensor) -> dict[str, Tensor]:
    s = state[p]
    if not s:  # lazy init, as torch: zeros shaped like p, step a CPU scalar
        s["step"] = torch.tensor(0.0, dtype=_step_dtype())
        s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return s


def adamw_group_(
    state: dict[Tensor, Any], group: dict[str, Any], params: list[Tensor], grads: list[Tensor], grad_scale: float = 1.0
) -> None:
    """One group's AdamW step (fused when it can), its state in ``state`` (an optimizer's
    ``self.state``); shared by ``AdamW`` and the AdamW side of ``MuonAdamW``. ``grad_scale``:
    the step uses ``g * grad_scale``, as after ``torch._foreach_mul_(grads, grad_scale)``: the
    fused kernel multiplies as it reads (p.grad unchanged), the reference path scales first."""
    states = [_state_for(state, p) for p in params]
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    steps = [s["step"] for s in states]
    hyper = AdamWHyper.of(group)
    lib = fast.choose(group["fused"], params + grads + exp_avgs + exp_avg_sqs)
    if lib is not None and fast.steps_supported(steps):
        fast.adamw_(lib, params, grads, exp_avgs, exp_avg_sqs, steps, hyper, grad_scale=grad_scale)
    else:
        if grad_scale != 1.0:
            torch._foreach_mul_(grads, grad_scale)
        adamw_reference(params, grads, exp_avgs, exp_avg_sqs, steps, hyper)


class AdamW(Optimizer):
    """Drop-in for torch.optim.AdamW (amsgrad, maximize, capturable not supported).

    fused: the C fast path, as ``SGD``'s (``fused.choose``); False always runs ``adamw_reference``.
    ``grad_scale``: a factor the gradients still owe, for the next ``step`` only (then back to 1):
    the loop's clip factor (times its 1 / count), applied as the fused kernel reads each gradient
    instead of in a pass of its own over every gradient; p.grad keeps the unscaled values.
    """

    grad_scale: float = 1.0

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        fused: bool | None = None,
    ) -> None:
        check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps} (must be >= 0)")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta} (need 0 <= beta < 1)")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")
        defaults = dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps, weight_decay=weight_decay, fused=fused)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Called by load_state_dict too: groups saved by torch.optim.AdamW lack "fused".
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("fused", None)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=_step_dtype())

    @no_grad
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        scale, self.grad_scale = self.grad_scale, 1.0
        if scale == 1.0:
            return step_groups(self, closure, "AdamW", adamw_group_)
        return step_groups(self, closure, "AdamW", lambda st, gr, ps, gs: adamw_group_(st, gr, ps, gs, scale))
