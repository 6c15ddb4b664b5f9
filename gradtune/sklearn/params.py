"""Constructor parameters, checked at ``fit`` (scikit-learn's rule: ``__init__`` only stores them).

A bad value is a ``ValueError`` in scikit-learn's words: "The 'lr' parameter of GDRegressor must
be a float > 0 or 'auto'. Got -1 instead."
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import numpy as np


def _real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


# name -> (is the value allowed, what it must be)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: v == "auto" or (_real(v) and v > 0), "a float > 0 or 'auto'"),
    "momentum": (lambda v: v == "auto" or (_real(v) and 0 <= v < 1), "a float in [0, 1) or 'auto'"),
    "nesterov": (lambda v: isinstance(v, (bool, np.bool_)), "a bool"),
    "alpha": (lambda v: _real(v) and v >= 0, "a float >= 0"),
    "epsilon": (lambda v: _real(v) and v > 0, "a float > 0"),
    "batch_size": (lambda v: v == "full" or (_int(v) and v >= 1), "an int >= 1 or 'full'"),
    "max_iter": (lambda v: _int(v) and v >= 1, "an int >= 1"),
    "tol": (lambda v: v is None or (_real(v) and v >= 0), "a float >= 0 or None"),
    "n_iter_no_change": (lambda v: _int(v) and v >= 1, "an int >= 1"),
    "early_stopping": (lambda v: isinstance(v, (bool, np.bool_)), "a bool"),
    "validation_fraction": (lambda v: _real(v) and 0 < v < 1, "a float in (0, 1)"),
    "shuffle": (lambda v: isinstance(v, (bool, np.bool_)), "a bool"),
    "warm_start": (lambda v: isinstance(v, (bool, np.bool_)), "a bool"),
    "guard": (lambda v: isinstance(v, (bool, np.bool_)), "a bool"),
    "random_state": (
        lambda v: v is None or (_int(v) and 0 <= v < 2**32) or isinstance(v, np.random.RandomState),
        "an int in [0, 2**32), a RandomState or None",
    ),
    "out_dir": (lambda v: v is None or isinstance(v, str) or hasattr(v, "__fspath__"), "a path or None"),
    "hidden_layer_sizes": (
        lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(_int(h) and h >= 1 for h in v),
        "a non-empty tuple of ints >= 1",
    ),
    "activation": (lambda v: v in ACTIVATIONS, "one of " + ", ".join(repr(a) for a in ("relu", "tanh", "logistic"))),
    "solver": (lambda v: v in ("sgd", "adam"), "'sgd' or 'adam'"),
    "regression_loss": (lambda v: v in ("squared_error", "huber"), "'squared_error' or 'huber'"),
    "classification_loss": (lambda v: v == "log_loss", "'log_loss'"),
}

# scikit-learn's MLP names -> gradtune's MLP activations (gelu and sigmoid accepted as they are).
ACTIVATIONS = {"relu": "relu", "tanh": "tanh", "logistic": "sigmoid", "sigmoid": "sigmoid", "gelu": "gelu"}


def check_params(estimator: Any, names: list[str]) -> None:
    """Every parameter in ``names`` against ``RULES``; ``loss`` by the estimator's kind."""
    params = estimator.get_params(deep=False)
    kind = type(estimator).__name__
    for name in names:
        rule = RULES[name if name != "loss" else getattr(estimator, "_loss_rule")]
        value = params[name]
        if not rule[0](value):
            raise ValueError(f"The {name!r} parameter of {kind} must be {rule[1]}. Got {value!r} instead.")


def seed_of(random_state: Any) -> int:
    """A seed for the loop from scikit-learn's ``random_state``: an int as it is; None or a
    RandomState draws one (None: a different run each fit, as scikit-learn does)."""
    if _int(random_state):
        return int(random_state)
    rng = random_state if isinstance(random_state, np.random.RandomState) else np.random.mtrand._rand
    return int(rng.randint(0, 2**31 - 1))
