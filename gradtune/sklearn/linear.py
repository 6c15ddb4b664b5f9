"""Linear and logistic regression by gradient descent, as scikit-learn estimators.

Defaults are batch gradient descent with ``lr="auto"`` (the step from the loss's curvature) and
``momentum="auto"`` (Nesterov's optimal momentum where the smallest curvature is known): on a
few thousand rows that reaches the optimum in a few hundred exact steps. ``batch_size=k`` gives
mini-batch GD, ``1`` stochastic GD; ``lr`` a number gives a fixed rate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import ClassifierMixin, RegressorMixin

from gradtune.sklearn.base import GDBase
from gradtune.sklearn.classify import ClassifierOutputs

LOSSES = {"squared_error": "mse", "huber": "huber"}


def _zero_start(est: Any, y: torch.Tensor, regression: bool) -> None:
    """Convex models start at zero weights (scikit-learn's linear models do), the regression
    intercept at the target's mean: the best constant model, so the first steps spend nothing on
    the offset and momentum does not overshoot it (measured on diabetes: the loss then falls
    monotonically after step 3, where a random start rose for 5 epochs and tripped ``tol``)."""
    with torch.no_grad():
        est.model_.linear.weight.zero_()
        est.model_.linear.bias.fill_(float(y.mean()) if regression else 0.0)


def _linear_weights(est: Any) -> tuple[np.ndarray, np.ndarray]:
    """(weight (outputs, F), bias (outputs,)) of the fitted linear layer, float64 copies."""
    layer = est.model_.linear
    return layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()


class GDRegressor(RegressorMixin, GDBase):
    """Linear regression fitted by gradient descent through gradtune's loop.

    loss: ``"squared_error"`` (mean squared error) or ``"huber"`` (quadratic within ``epsilon``
    of the target, linear beyond). ``alpha``: L2 penalty on the coefficients (not the intercept).
    ``tol``: stop when the training loss improves by less than this *relative* amount for
    ``n_iter_no_change`` epochs in a row. Fitted: ``coef_`` (F,), ``intercept_`` (1,),
    ``n_iter_`` (epochs), ``loss_curve_``, ``best_loss_``, ``lr_`` (the rate used), ``stop_reason_``.
    """

    _model = "linear"
    _loss_rule = "regression_loss"

    def __init__(
        self,
        loss: str = "squared_error",
        *,
        epsilon: float = 1.0,
        alpha: float = 0.0,
        lr: Any = "auto",
        momentum: Any = "auto",
        nesterov: bool = False,
        batch_size: Any = "full",
        max_iter: int = 1000,
        tol: Any = 1e-7,
        n_iter_no_change: int = 5,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        shuffle: bool = True,
        random_state: Any = None,
        warm_start: bool = False,
        guard: bool = True,
        out_dir: Any = None,
    ) -> None:
        self._keep_params(locals())

    def _settings(self) -> dict[str, Any]:
        return {"loss": LOSSES[self.loss], "huber_delta": float(self.epsilon)}

    def _init_weights(self, y: torch.Tensor) -> None:
        _zero_start(self, y, regression=True)

    def _publish(self) -> None:
        w, b = _linear_weights(self)
        self.coef_, self.intercept_ = w[0], b

    def predict(self, X: Any) -> np.ndarray:
        return self._forward(X)[:, 0]


class GDClassifier(ClassifierOutputs, ClassifierMixin, GDBase):
    """Logistic regression (binary: one logit; multiclass: softmax) fitted by gradient descent
    through gradtune's loop. Parameters as ``GDRegressor``'s; ``alpha`` defaults to 1e-4 (as
    SGDClassifier's), which also makes the loss strongly convex, so ``momentum="auto"`` is
    Nesterov's. Fitted: ``coef_`` (1, F) or (C, F), ``intercept_``, ``classes_`` and the rest."""

    _model = "logistic"
    _loss_rule = "classification_loss"

    def __init__(
        self,
        loss: str = "log_loss",
        *,
        alpha: float = 1e-4,
        lr: Any = "auto",
        momentum: Any = "auto",
        nesterov: bool = False,
        batch_size: Any = "full",
        max_iter: int = 1000,
        tol: Any = 1e-7,
        n_iter_no_change: int = 5,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        shuffle: bool = True,
        random_state: Any = None,
        warm_start: bool = False,
        guard: bool = True,
        out_dir: Any = None,
    ) -> None:
        self._keep_params(locals())

    def _settings(self) -> dict[str, Any]:
        return {"loss": "bce" if len(self.classes_) == 2 else "cross_entropy"}

    def _init_weights(self, y: torch.Tensor) -> None:
        _zero_start(self, y, regression=False)

    def _publish(self) -> None:
        self.coef_, self.intercept_ = _linear_weights(self)

    def decision_function(self, X: Any) -> np.ndarray:
        """The logits: (N,) for two classes (> 0: ``classes_[1]``), else (N, C)."""
        return self._scores(X)
