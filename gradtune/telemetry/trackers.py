"""What every ``log_to`` tracker shares: is its package installed, and the run's config as flat
parameters.

The packages are optional and heavy (importing mlflow takes seconds), so whether one is there is
asked of ``importlib.util.find_spec``, which imports nothing: a run naming a tracker whose package
is missing is refused in its checks, before a byte is written, with one line saying what to install.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Iterable

from gradtune.runtime.errors import GradtuneError
from gradtune.telemetry import html

# log_to name -> (the modules it imports, what to install)
PACKAGES = {
    "tensorboard": (("tensorboard",), "tensorboard"),
    "mlflow": (("mlflow",), "mlflow"),
    "wandb": (("wandb",), "wandb"),
}
# MLflow's default store here is SQLite (out_dir/mlflow.db): mlflow-skinny has the store's code but
# not the SQL packages it runs on; the full mlflow package brings both.
SQL_STORE = ("sqlalchemy", "alembic")
PARAM_CHARS = 6000  # MLflow refuses a parameter value longer than this


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def require(log_to: Iterable[str]) -> None:
    """GradtuneError, one line, for the first tracker in ``log_to`` whose package is missing."""
    for name in log_to:
        modules, pip = PACKAGES[name]
        if not all(installed(m) for m in modules):
            raise GradtuneError(f"log_to: {name} needs the {pip} package (pip install {pip})")
        if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
            missing = [m for m in SQL_STORE if not installed(m)]
            if missing:
                raise GradtuneError(
                    f"log_to: mlflow keeps its runs in out_dir/mlflow.db (SQLite), which needs "
                    f"{' and '.join(missing)} (pip install mlflow, or set MLFLOW_TRACKING_URI)"
                )


def flatten(tree: dict[str, Any]) -> dict[str, Any]:
    """The resolved config as ``section.key -> value``: W&B's config (typed values)."""
    return dict(html.flatten(tree))


def flat_params(tree: dict[str, Any]) -> dict[str, str]:
    """The resolved config as ``section.key -> text`` (lists and None as JSON): MLflow's params."""
    out = {}
    for key, value in flatten(tree).items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[key] = text[:PARAM_CHARS]
    return out


def numbers(row: dict[str, Any], axis: str = "step") -> dict[str, float]:
    """A metrics.jsonl row's numeric fields as ``<kind>/<field>`` (TensorBoard's tags): bools count
    (0/1 plots a flag); strings, lists, dicts and None have no value to plot; the axis is not one."""
    kind = str(row.get("kind", "log"))
    return {
        f"{kind}/{k}": float(v)
        for k, v in row.items()
        if k != axis and isinstance(v, (int, float)) and not isinstance(v, complex)
    }
