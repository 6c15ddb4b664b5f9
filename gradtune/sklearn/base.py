"""What the four estimators share: ``fit`` / ``partial_fit`` through the one loop (engine.py),
scikit-learn's input checks and fitted-attribute conventions, ``save`` / ``load`` of a run folder.

A subclass spells out its parameters in its ``__init__`` signature (scikit-learn's
``get_params`` reads it; ``_keep_params`` stores them; ``fit`` checks every one), says which model
it is (``_model``: linear | logistic | mlp), and how targets become the loop's (``_targets``) and
outputs become attributes (``_publish``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted, validate_data

from gradtune.config import Config
from gradtune.optim.groups import decay_groups
from gradtune.runtime.errors import GradtuneError
from gradtune.sklearn import engine, persist
from gradtune.sklearn.params import check_params, seed_of


class GDBase(BaseEstimator):
    _model = "linear"
    _classifier = False
    _task = "regression"

    def _keep_params(self, values: dict[str, Any]) -> None:
        """``__init__``'s whole job (scikit-learn's rule; checked at fit): every parameter of its
        signature stored as given under its own name. ``values``: that ``__init__``'s ``locals()``."""
        for name in self._get_param_names():
            setattr(self, name, values[name])

    # --- what subclasses fill in ----------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        """Config fields beyond the common ones (loss, hidden widths, optimizer...)."""
        return {}

    def _targets(self, y: np.ndarray, first: bool, classes: Any = None) -> tuple[torch.Tensor, int]:
        """(y for the loop, number of classes: 0 for regression)."""
        return torch.tensor(np.asarray(y, dtype=np.float64)), 0

    def _init_weights(self, y: torch.Tensor) -> None:
        """A fresh model's start beyond its seeded random one (the linear models: zeros)."""

    def _publish(self) -> None:
        """Fitted attributes from ``model_`` (coef_ / intercept_, or coefs_ / intercepts_)."""

    # --- fit ------------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> "GDBase":
        """Train by gradient descent for at most ``max_iter`` epochs (``tol`` /
        ``n_iter_no_change`` / ``early_stopping`` may stop it sooner)."""
        check_params(self, self._get_param_names())
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=not self._classifier)
        warm = self.warm_start and hasattr(self, "model_") and self.model_out_ == self._n_outputs(y)
        yt, n_classes = self._targets(y, first=not warm)
        seed = seed_of(self.random_state)
        self._optimizer_state, self._seed, self._calls = None, seed, 1  # partial_fit goes on from here
        self._fit_arrays(X, yt, n_classes, seed, epochs=self.max_iter, fresh=not warm, partial=False)
        return self

    def partial_fit(self, X: Any, y: Any, classes: Any = None) -> "GDBase":
        """One pass of mini-batch gradient descent over these rows (``batch_size`` rows a step),
        from the current weights, the optimizer's state (momentum, Adam moments) kept between
        calls. Classifiers need ``classes`` (every label there will be) on the first call."""
        first = not hasattr(self, "model_")
        if first:
            check_params(self, self._get_param_names())
            if self._classifier and classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit")
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=not self._classifier, reset=first)
        yt, n_classes = self._targets(y, first=first, classes=classes)
        if first:
            self._seed, self._calls = seed_of(self.random_state), 0
            self._optimizer_state = None
        self._calls += 1
        self._fit_arrays(X, yt, n_classes, self._seed + self._calls - 1, epochs=1, fresh=first, partial=True)
        return self

    def _n_outputs(self, y: np.ndarray) -> int:
        return 1

    def _config(self, seed: int, epochs: int, partial: bool) -> Config:
        es = bool(self.early_stopping) and not partial
        lr = self.lr_ if partial and hasattr(self, "lr_") else self.lr
        settings: dict[str, Any] = dict(
            model=self._model,
            lr=lr,
            momentum=0.0,  # resolved with lr (engine.resolve_lr)
            weight_decay=float(self.alpha),
            batch_size=self.batch_size,
            epochs=epochs,
            tol=0.0 if partial or self.tol is None else float(self.tol),
            patience=self.n_iter_no_change,
            seed=seed,
            val_fraction=float(self.validation_fraction) if es else 0.0,
            early_stopping=engine.early_stopping(es, self.n_iter_no_change, 0.0 if self.tol is None else self.tol),
            guard=engine.guard(bool(self.guard)),
        )
        settings.update(self._settings())
        return engine.run_config(**settings)

    def _fit_arrays(
        self, X: np.ndarray, y: torch.Tensor, n_classes: int, seed: int, epochs: int, fresh: bool, partial: bool
    ) -> None:
        try:
            cfg = self._config(seed, epochs, partial)
            x = torch.tensor(X, dtype=torch.float64)
            if fresh:
                self.model_ = engine.make_model(cfg, x.shape[1], 1 if n_classes <= 2 else n_classes)
                self.model_out_ = 1 if n_classes <= 2 else n_classes
                self._init_weights(y)
            val_rows = _val_rows(len(y), self.validation_fraction, seed) if cfg.early_stopping.enabled else None
            job = engine.make_job(cfg, self.model_, x, y, self._task, n_classes, val_rows, shuffle=bool(self.shuffle))
            job.param_groups = decay_groups(self.model_, cfg.weight_decay)  # the intercepts are not penalised
            momentum, nesterov = (self.momentum if self._uses_momentum() else 0.0), self.nesterov
            if partial and hasattr(self, "momentum_"):  # as the first call resolved them ("auto")
                momentum, nesterov = self.momentum_, self.nesterov_
            cfg = engine.resolve_lr(job, cfg, momentum)
            if cfg.momentum and self._uses_momentum():
                cfg = _nesterov(cfg, nesterov)
                # With momentum the loss is not monotone: a run of about 1/(1 - momentum) epochs
                # above the best is its ripple, not convergence (diabetes, Nesterov 0.91: 5 epochs).
                cfg = dataclasses.replace(cfg, patience=max(cfg.patience, math.ceil(1 / (1 - cfg.momentum))))
            out = Path(self.out_dir) if self.out_dir is not None else None
            fitted = engine.run(job, cfg, out, self._optimizer_state, keep_state=partial)
        except GradtuneError as e:
            raise ValueError(str(e)) from None
        self._record(fitted, cfg, job.info, partial)
        if out is not None:
            persist.save(self, out)

    def _uses_momentum(self) -> bool:
        return True

    def _record(self, fitted: engine.Fitted, cfg: Config, info: dict[str, Any], partial: bool) -> None:
        self.model_.eval()
        self.lr_, self.momentum_, self.nesterov_ = float(cfg.lr), float(cfg.momentum), bool(cfg.nesterov)
        self.stop_reason_ = fitted.stop_reason
        self._optimizer_state = fitted.optimizer_state
        self._run = {"config": cfg, "info": info, "steps": fitted.steps, "history": fitted.result.history}
        if partial:
            self.n_iter_ = getattr(self, "n_iter_", 0) + 1
            self.loss_curve_ = getattr(self, "loss_curve_", []) + fitted.loss_curve
        else:
            self.n_iter_ = fitted.epochs
            self.loss_curve_ = fitted.loss_curve
        self.validation_loss_curve_ = fitted.val_curve
        self.best_loss_ = min(self.loss_curve_) if self.loss_curve_ else float("nan")
        self._publish()
        if fitted.stop_reason.startswith("diverged"):
            warnings.warn(f"{type(self).__name__}: {fitted.stop_reason}; lower lr", ConvergenceWarning, stacklevel=4)
        elif not partial and self.tol and fitted.stop_reason.startswith("budget"):
            warnings.warn(
                f"{type(self).__name__}: max_iter={self.max_iter} epochs reached before the loss converged "
                f"(tol={self.tol:g}); raise max_iter",
                ConvergenceWarning,
                stacklevel=4,
            )

    # --- the model's outputs --------------------------------------------------------------------
    def _forward(self, X: Any) -> np.ndarray:
        """The model's raw outputs for ``X``: (N, outputs) float64."""
        check_is_fitted(self, "model_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        with torch.no_grad():
            return self.model_(torch.tensor(X, dtype=torch.float64)).numpy()

    # --- run folders ----------------------------------------------------------------------------
    def save(self, out_dir: "str | Path") -> Path:
        """Write the fitted model as a gradtune run folder (model.safetensors, config.yaml,
        summary.json): ``gradtune eval`` / ``predict`` read it, ``load`` reads it back."""
        check_is_fitted(self, "model_")
        return persist.save(self, Path(out_dir))

    @classmethod
    def load(cls, out_dir: "str | Path") -> "GDBase":
        """The estimator a run folder written by ``save`` (or ``out_dir``) holds, fitted."""
        return persist.load(cls, Path(out_dir))

    def __sklearn_tags__(self):  # noqa: ANN204 (sklearn's Tags)
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False  # the same random_state, the same weights
        return tags


def _val_rows(n: int, fraction: float, seed: int) -> torch.Tensor:
    """Rows held out for early stopping: a seeded draw of round(n * fraction), at least one."""
    n_val = max(1, int(round(n * fraction)))
    if n - n_val < 1:
        raise ValueError(f"validation_fraction={fraction} leaves no training rows out of {n} samples")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_val]


def _nesterov(cfg: Config, nesterov: bool) -> Config:
    """A numeric momentum keeps the estimator's nesterov choice; momentum "auto" set it already."""
    if cfg.nesterov or not nesterov:
        return cfg
    return dataclasses.replace(cfg, nesterov=True)
