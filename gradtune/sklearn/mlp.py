"""Multilayer perceptrons trained by gradtune's loop, as scikit-learn estimators.

Parameters follow scikit-learn's MLPRegressor / MLPClassifier where they mean the same thing:
``hidden_layer_sizes``, ``activation`` (relu, tanh, logistic; gelu too), ``solver`` ("sgd": our
SGD with ``momentum`` / ``nesterov``; "adam": our AdamW, with ``alpha`` as decoupled weight
decay), ``batch_size`` (an int, or "full"), ``lr`` (scikit-learn's learning_rate_init),
``max_iter`` (epochs), ``tol`` (relative here), ``n_iter_no_change``, ``early_stopping``.
Fitted: ``coefs_`` / ``intercepts_`` (per layer, (in, out) and (out,) as scikit-learn's),
``n_iter_``, ``loss_curve_``, ``best_loss_``, ``n_layers_``, ``out_activation_``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import ClassifierMixin, RegressorMixin
from torch import nn

from gradtune.sklearn.base import GDBase
from gradtune.sklearn.classify import ClassifierOutputs
from gradtune.sklearn.params import ACTIVATIONS


class MLPBase(GDBase):
    _model = "mlp"

    def __init__(
        self,
        hidden_layer_sizes: tuple = (100,),
        activation: str = "relu",
        *,
        solver: str = "adam",
        alpha: float = 1e-4,
        batch_size: Any = 200,
        lr: Any = 1e-3,
        momentum: Any = 0.9,
        nesterov: bool = True,
        max_iter: int = 200,
        tol: Any = 1e-4,
        n_iter_no_change: int = 10,
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
        return {
            "hidden": [int(h) for h in self.hidden_layer_sizes],
            "activation": ACTIVATIONS[self.activation],
            "optimizer": "sgd" if self.solver == "sgd" else "adamw",
        }

    def _uses_momentum(self) -> bool:
        return self.solver == "sgd"

    def _publish(self) -> None:
        layers = [m for m in self.model_.net if isinstance(m, nn.Linear)]
        self.coefs_ = [m.weight.detach().numpy().T.copy() for m in layers]  # (in, out) each
        self.intercepts_ = [m.bias.detach().numpy().copy() for m in layers]
        self.n_layers_ = len(layers) + 1
        self.n_outputs_ = layers[-1].out_features


class MLPRegressor(RegressorMixin, MLPBase):
    """A multilayer perceptron for regression (squared error), trained by gradtune's loop."""

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "loss": "mse"}

    def _publish(self) -> None:
        super()._publish()
        self.out_activation_ = "identity"

    def predict(self, X: Any) -> np.ndarray:
        return self._forward(X)[:, 0]


class MLPClassifier(ClassifierOutputs, ClassifierMixin, MLPBase):
    """A multilayer perceptron classifier (binary: one logistic output; else softmax)."""

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "loss": "bce" if len(self.classes_) == 2 else "cross_entropy"}

    def _publish(self) -> None:
        super()._publish()
        self.out_activation_ = "logistic" if len(self.classes_) == 2 else "softmax"
