"""Reduce the lr when a validation metric stops improving: ``torch.optim.lr_scheduler.
ReduceLROnPlateau``'s rule, as a small state machine the loop calls at each evaluation.

    improved  metric < best * (1 - threshold)   (mode min, threshold_mode rel; max: > best * (1 + t))
    bad       evaluations in a row without improvement; past ``patience`` -> lr *= factor, at
              least ``min_lr``, then ``cooldown`` evaluations during which bad is not counted
    eps       a reduction smaller than eps is not applied (as torch)

The loop multiplies the base lr by ``scale``; the state (best, bad, cooldown, scale) is saved in
checkpoints, so a resumed run reduces at the very same evaluations.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from gradtune.config import Config
from gradtune.loop.components import Component, ScalarState
from gradtune.loop.early_stopping import monitor_mode, monitored


class Plateau(ScalarState):
    saved = {"best": float, "bad": int, "cooldown_left": int, "scale": float}

    def __init__(
        self,
        base_lr: float,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
        eps: float = 1e-8,
    ) -> None:
        self.base_lr, self.mode, self.factor, self.patience = base_lr, mode, factor, patience
        self.threshold, self.cooldown, self.min_lr, self.eps = threshold, cooldown, min_lr, eps
        self.best = math.inf if mode == "min" else -math.inf
        self.bad = 0
        self.cooldown_left = 0
        self.scale = 1.0  # lr = base_lr * scale

    def _better(self, a: float) -> bool:
        if self.mode == "min":
            return a < self.best * (1.0 - self.threshold)
        return a > self.best * (1.0 + self.threshold)

    def step(self, metric: float) -> bool:
        """Record one evaluation's metric; True when the lr was reduced now."""
        if self._better(metric):
            self.best, self.bad = metric, 0
        else:
            self.bad += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad = 0  # bad evaluations during cooldown do not count
        if self.bad <= self.patience:
            return False
        old = self.base_lr * self.scale
        new = max(old * self.factor, self.min_lr)
        self.cooldown_left, self.bad = self.cooldown, 0
        if old - new <= self.eps:
            return False
        self.scale = new / self.base_lr
        return True


class PlateauSchedule(Component):
    """``schedule: plateau`` on the loop's events: at each evaluation the monitored metric
    (``early_stopping.monitor``) steps the rule; the lr is the scheduled one times ``scale``."""

    key = "plateau"

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.monitor = cfg.early_stopping.monitor
        self.plateau = Plateau(
            cfg.lr,
            monitor_mode(cfg.early_stopping),
            cfg.gamma,
            cfg.plateau_patience,
            cfg.plateau_threshold,
            cfg.plateau_cooldown,
            cfg.min_lr,
        )

    def describe(self) -> str:
        p = self.plateau
        return f"PlateauSchedule(monitor={self.monitor}, factor={p.factor:g}, patience={p.patience})"

    def lr_factor(self) -> float:
        return self.plateau.scale

    def on_evaluate(self, step: int, metrics: dict[str, Any]) -> Optional[str]:
        if self.plateau.step(monitored(metrics, self.monitor)):
            self.view.note(f"plateau: step {step}: lr cut to {self.plateau.base_lr * self.plateau.scale:.3g}")
        return None

    def state_dict(self) -> dict[str, Any]:
        return self.plateau.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau.load_state_dict(state)
