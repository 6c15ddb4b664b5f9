"""Stop when a validation metric stops improving, and hand back the best weights, not the last.

The rule is scikit-learn's ``early_stopping`` (``n_iter_no_change`` = patience, ``tol`` =
min_delta), written for either direction:

    improved  value better than best by more than min_delta  -> wait = 0, else wait += 1
    best      the best value so far, updated on ANY improvement (so best/ always holds the
              evaluation with the best metric in metrics.jsonl, even a sub-min_delta one)
    stop      wait >= patience

Keras' ``EarlyStopping`` differs in one point, on purpose not followed: it moves ``best`` only on
an improvement larger than min_delta, so its restored weights need not be the best evaluated.

The best state is a checkpoint under ``out_dir/best/`` (the same verified format as
``checkpoints/``); with ``restore_best`` the model ends with those weights, so the run's
model.safetensors (and a LoRA run's exported adapter) is the best one. Without an out_dir the
best weights are kept in memory. Runs on every rank (all ranks must stop together; the metrics
are already global).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from gradtune.config.schema import EarlyStoppingSection
from gradtune.loop.callbacks import Callback, Control
from gradtune.runtime.errors import GradtuneError

ALIASES = {"val_perplexity": "val_ppl", "perplexity": "ppl"}


def direction(monitor: str, mode: str) -> str:
    """'min' or 'max': auto is max for accuracy and R^2, min for losses, RMSE and perplexity."""
    if mode != "auto":
        return mode
    return "max" if monitor.endswith(("accuracy", "r2", "f1", "macro", "weighted")) else "min"


def monitor_mode(section: EarlyStoppingSection) -> str:
    """The direction of the metric that early stopping and the plateau schedule watch."""
    return direction(ALIASES.get(section.monitor, section.monitor), section.mode)


def monitored(row: dict[str, Any], monitor: str) -> float:
    """The watched metric of an evaluation row; a metric the run does not log is one line."""
    name = ALIASES.get(monitor, monitor)
    if name not in row:
        known = sorted(k for k, v in row.items() if isinstance(v, float))
        raise GradtuneError(
            f"early_stopping.monitor '{monitor}' is not measured by this run "
            f"(it logs {', '.join(known)}; validation metrics need val_fraction > 0)"
        )
    return float(row[name])


class EarlyStopping(Callback):
    all_ranks = True

    def __init__(self, section: EarlyStoppingSection) -> None:
        self.monitor = ALIASES.get(section.monitor, section.monitor)
        self.mode = direction(self.monitor, section.mode)
        self.patience, self.min_delta, self.restore = section.patience, section.min_delta, section.restore_best
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_step: Optional[int] = None
        self.wait = 0
        self.control: Optional[Control] = None
        self.memory: Optional[Any] = None  # best weights when there is no out_dir

    def _gain(self, value: float) -> float:
        """How much better ``value`` is than the best so far (> 0: better)."""
        return (self.best - value) if self.mode == "min" else (value - self.best)

    def on_train_begin(self, control: Control) -> None:
        self.control = control

    def on_evaluate(self, step: int, metrics: dict[str, Any]) -> Optional[str]:
        value = monitored(metrics, self.monitor)
        gain = self._gain(value) if math.isfinite(value) else -math.inf
        self.wait = 0 if gain > self.min_delta else self.wait + 1
        if gain > 0:
            self.best, self.best_step = value, step
            self._keep()
        if self.wait >= self.patience:
            by = f" by more than {self.min_delta:g}" if self.min_delta else ""
            return (
                f"{self.monitor} did not improve{by} for {self.patience} evaluations; "
                f"best {self.best:.6g} at step {self.best_step}"
            )
        return None

    def _keep(self) -> None:
        assert self.control is not None
        if self.control.out_dir is not None:
            self.control.save_state(self.folder())
        else:
            self.memory = self.control.snapshot()

    def folder(self) -> Path:
        assert self.control is not None and self.control.out_dir is not None
        return self.control.out_dir / "best"

    def on_train_end(self, result: Any) -> None:
        if self.best_step is None or self.control is None:
            return
        if self.restore:
            if self.control.out_dir is not None:
                self.control.load_weights(self.folder())
            else:
                self.control.restore(self.memory)
        result.info["early_stopping"] = {
            "monitor": self.monitor,
            "mode": self.mode,
            "best": self.best,
            "best_step": self.best_step,
            "restored": self.restore,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait = float(state["best"]), int(state["wait"])
        self.best_step = None if state["best_step"] is None else int(state["best_step"])
