"""The hyper-parameters one update step reads, one frozen record per rule: built from a param
group (torch's keys) and handed as is to the readable reference update and to the fused C kernel,
so both take the same arguments by construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class SGDHyper:
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool

    @classmethod
    def of(cls, group: dict[str, Any]) -> SGDHyper:
        """A group's values; a tensor lr read as a float (the kernel takes a double)."""
        return cls(float(group["lr"]), group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"])


@dataclass(frozen=True)
class AdamWHyper:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float

    @classmethod
    def of(cls, group: dict[str, Any]) -> AdamWHyper:
        """A group's values (``betas`` split in two); a tensor lr read as a float."""
        beta1, beta2 = group["betas"]
        return cls(float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"])


@dataclass(frozen=True)
class MuonHyper:
    lr: float
    weight_decay: float
    momentum: float
    nesterov: bool
    ns_coefficients: tuple[float, float, float]  # (a, b, c) of the quintic Newton-Schulz step
    ns_steps: int
    eps: float  # floor of the Frobenius norm the update is first divided by
    adjust_lr_fn: Optional[str]

    @classmethod
    def of(cls, group: dict[str, Any]) -> MuonHyper:
        """A group's values; a tensor lr read as a float."""
        return cls(
            float(group["lr"]),
            group["weight_decay"],
            group["momentum"],
            group["nesterov"],
            tuple(group["ns_coefficients"]),
            group["ns_steps"],
            group["eps"],
            group["adjust_lr_fn"],
        )
