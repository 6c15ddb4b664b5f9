"""Muon for the hidden matrices and AdamW for everything else, in one torch.optim.Optimizer.

The speedrun's recipe (and torch.optim.Muon's advice) is two optimizers; the loop, the lr
schedule, lr-find and checkpoints see one: each parameter group carries ``"muon": True`` (its
matrices step by muon.py's rule, state ``momentum_buffer``) or ``False`` (AdamW's rule from
adamw.py, state ``step``/``exp_avg``/``exp_avg_sq``). A schedule multiplies every group's own
``lr`` by the same factor, so the Muon and AdamW rates keep their ratio; one ``state_dict``
holds both sides. Stepping it equals stepping torch.optim.Muon on the Muon groups and
torch.optim.AdamW on the others with the same hyper-parameters (tests/unit/optim/test_muon.py).

Which parameters are hidden matrices is decided from the model: ``optim.groups.muon_groups``.

Under DDP every rank steps on the same all-reduced gradient, so every rank computes the same
update (tests/e2e/test_distributed.py, case gpt_muon). FSDP2 is refused (config/checks.py for
``distributed: fsdp``, runtime/distributed.choose when ``auto`` would pick it): a rank holds a
DTensor shard of rows, and Newton-Schulz needs the whole matrix. Supporting it means gathering
each gradient (``grad.full_tensor()``), orthogonalising on every rank (or on one per matrix and
scattering), and applying the rank's own rows of the update to its shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Optional

from torch import Tensor

from gradtune.optim.adamw import adamw_group_
from gradtune.optim.base import Optimizer, no_grad
from gradtune.optim.muon import NS_COEFFICIENTS, NS_EPS, NS_STEPS, check_hyper, check_matrices, muon_group_
from gradtune.optim.params import step_groups


def _group_step(state: dict[Tensor, Any], group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
    """A ``"muon": True`` group steps by muon.py's rule, any other by adamw.py's."""
    (muon_group_ if group["muon"] else adamw_group_)(state, group, params, grads)


class MuonAdamW(Optimizer):
    """``params``: groups, each ``{"params": [...], "muon": bool, ...}`` (a group without
    ``muon`` is an AdamW group). Group keys not given take these defaults: a Muon group ``lr`` =
    ``muon_lr``, ``momentum``, ``nesterov``, ``ns_coefficients``, ``ns_steps``, ``eps`` =
    ``ns_eps``, ``adjust_lr_fn``; an AdamW group ``lr``, ``betas``, ``eps``, ``fused``; both
    ``weight_decay`` (decoupled on both sides: p *= 1 - lr * weight_decay).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        muon_lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_steps: int = NS_STEPS,
        ns_eps: float = NS_EPS,
        adjust_lr_fn: Optional[str] = None,
        fused: Optional[bool] = None,
    ) -> None:
        check_hyper(muon_lr, momentum, weight_decay, ns_steps, adjust_lr_fn)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
        self._kinds = {
            True: dict(
                lr=muon_lr,
                momentum=momentum,
                nesterov=nesterov,
                ns_coefficients=tuple(ns_coefficients),
                ns_steps=ns_steps,
                eps=ns_eps,
                adjust_lr_fn=adjust_lr_fn,
            ),
            False: dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps, fused=fused),
        }
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, muon=False))
        check_matrices([g for g in self.param_groups if g["muon"]], "Muon")

    def __getstate__(self) -> dict[str, Any]:  # pickle / deepcopy keep the kinds' defaults
        return {**super().__getstate__(), "_kinds": self._kinds}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # A group's own keys first, then its kind's defaults, then torch's (lr, weight_decay).
        for key, value in self._kinds[bool(param_group.get("muon", False))].items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)

    @no_grad
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        return step_groups(self, closure, "MuonAdamW", _group_step)

    def muon_params(self) -> list[Tensor]:
        """The matrices Muon steps (the rest is AdamW's)."""
        return [p for g in self.param_groups if g["muon"] for p in g["params"]]
