"""When to stop: the loss has converged, the gradient vanished, or the budget is spent.

Relative improvement ``(best - loss) / |best|`` below ``tol`` for ``patience`` evaluations in a
row means converged (scikit-learn's SGD rule, with the tolerance made relative so it does not
depend on the loss's units).
"""

from __future__ import annotations

import math
from typing import Optional


class Convergence:
    def __init__(self, tol: float = 0.0, patience: int = 5, grad_tol: float = 0.0) -> None:
        self.tol, self.patience, self.grad_tol = tol, patience, grad_tol
        self.best = math.inf
        self.bad = 0

    def state(self) -> dict[str, float]:
        return {"best": self.best, "bad": self.bad}

    def load_state(self, state: dict[str, float]) -> None:
        self.best, self.bad = float(state["best"]), int(state["bad"])

    def update(self, loss: float, grad_norm: Optional[float] = None) -> Optional[str]:
        """Record one evaluation; return why to stop, or None to go on."""
        if not math.isfinite(loss):
            return "diverged (non-finite loss)"
        if self.best < math.inf and loss > 1e6 * max(abs(self.best), 1e-12):
            return "diverged (loss grew a millionfold)"
        if self.grad_tol > 0 and grad_norm is not None and grad_norm < self.grad_tol:
            return f"converged (gradient norm {grad_norm:.3g} < grad_tol {self.grad_tol:g})"
        if self.tol > 0:
            improved = (self.best - loss) / max(abs(self.best), 1e-300) if self.best < math.inf else math.inf
            self.bad = self.bad + 1 if improved < self.tol else 0
            if self.bad >= self.patience:
                return f"converged (loss improved < tol {self.tol:g} for {self.patience} evaluations)"
        self.best = min(self.best, loss)
        return None
