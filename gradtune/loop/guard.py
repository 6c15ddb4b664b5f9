"""Divergence guard: is this step healthy? Decided before the update touches anything.

A non-finite loss, or a loss spike (robust z-score of the loss against the median and MAD of a
running window of recent healthy steps), triggers the configured policy: ``skip`` the step,
``rollback`` to the last good checkpoint, or ``stop``. A non-finite gradient norm counts as a
non-finite loss. Decisions depend only on the loss history, so a rerun makes the same ones.

This class only detects; the loop applies the decision (``Loop._on_guard``). Rollback reloads
weights, optimizer, guard window and random states from the newest checkpoint, multiplies the lr
by ``lr_factor`` and keeps the data position where it is: the window of data from that
checkpoint to the offending batch is skipped (PaLM's recipe for loss spikes). After
``max_rollbacks`` the run stops and suggests a learning rate (``Guard.give_up``).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional

from gradtune.config import GuardConfig


class Guard:
    def __init__(self, cfg: GuardConfig) -> None:
        self.cfg = cfg
        self.window: deque[float] = deque(maxlen=cfg.spike_window)
        self.rollbacks = 0

    def state(self) -> dict:
        return {"window": list(self.window), "rollbacks": self.rollbacks}

    def load_state(self, state: dict) -> None:
        self.window = deque((float(v) for v in state["window"]), maxlen=self.cfg.spike_window)
        self.rollbacks = int(state["rollbacks"])

    def zscore(self, loss: float) -> Optional[float]:
        if len(self.window) < max(5, self.window.maxlen // 2):
            return None
        ordered = sorted(self.window)
        med = ordered[len(ordered) // 2]
        mad = sorted(abs(v - med) for v in ordered)[len(ordered) // 2]
        # 1.4826 * MAD estimates the standard deviation for normal data; the floor keeps a flat
        # window (a converged loss) from calling every tiny wiggle a spike.
        scale = max(1.4826 * mad, 1e-3 * abs(med), 1e-12)
        return (loss - med) / scale

    def check(self, loss: float, grad_norm: Optional[float] = None) -> tuple[str, str]:
        """(action, reason): action is "ok" or the policy to apply."""
        if not self.cfg.enabled:
            return ("ok", "") if math.isfinite(loss) else ("stop", "non-finite loss (guard disabled)")
        if not math.isfinite(loss):
            return self.cfg.policy, f"non-finite loss {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return self.cfg.policy, f"non-finite gradient (norm {grad_norm})"
        z = self.zscore(loss) if self.cfg.spike_zscore > 0 else None
        if z is not None and z > self.cfg.spike_zscore:
            return self.cfg.policy, f"loss spike {loss:.6g} (robust z {z:.1f} > {self.cfg.spike_zscore:g})"
        self.window.append(loss)
        return "ok", ""

    def give_up(self, lr_now: float) -> Optional[str]:
        """Why the run stops instead of rolling back once more (None: roll back)."""
        if self.rollbacks < self.cfg.max_rollbacks:
            return None
        suggestion = lr_now * self.cfg.lr_factor
        return (
            f"diverged: the loss kept exploding after {self.rollbacks} rollbacks (guard.max_rollbacks) "
            f"at lr {lr_now:.3g}; try lr={suggestion:.3g} or lower (`gradtune lr-find` suggests one)"
        )
