"""A fitted estimator <-> a gradtune run folder, the same one ``gradtune train`` leaves:

    model.safetensors   the weights (float64)
    config.yaml         the resolved settings the loop ran with (lr "auto" as its number)
    summary.json        job facts: features (``feature_names_in_`` or x0..x{F-1}), target "y",
                        task, loss, classes; ``job.sklearn``: the estimator's class, parameters
                        and fitted attributes, for ``load``

so ``gradtune eval RUN --data test.csv`` and ``gradtune predict RUN --data new.csv`` read it
(a CSV with those column names), and ``GDRegressor.load(RUN)`` gives the estimator back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradtune.data.dataset import TensorDataset
from gradtune.jobs.job import Job
from gradtune.jobs.reload import load_run
from gradtune.jobs.tabular import objective_for
from gradtune.loop.fit import Result
from gradtune.outputs import save_outputs
from gradtune.runtime.errors import GradtuneError

TARGET = "y"  # the target column's name in the files eval reads


def feature_names(est: Any) -> list[str]:
    names = getattr(est, "feature_names_in_", None)
    return [str(n) for n in names] if names is not None else [f"x{i}" for i in range(est.n_features_in_)]


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, np.random.RandomState):
        return None
    return v


def _facts(est: Any) -> dict[str, Any]:
    """What ``load`` needs beyond the weights: the class, its parameters, fitted attributes."""
    classes = getattr(est, "classes_", None)
    return {
        "estimator": type(est).__name__,
        "params": {k: _jsonable(v) for k, v in est.get_params(deep=False).items()},
        "n_features_in": int(est.n_features_in_),
        "feature_names_in": None if getattr(est, "feature_names_in_", None) is None else feature_names(est),
        "classes": None if classes is None else classes.tolist(),
        "classes_dtype": None if classes is None else classes.dtype.str,
        "n_iter": int(est.n_iter_),
        "loss_curve": list(est.loss_curve_),
        "validation_loss_curve": list(est.validation_loss_curve_),
        "stop_reason": est.stop_reason_,
        "lr": est.lr_,
        "momentum": est.momentum_,
        "nesterov": est.nesterov_,
        "model_out": est.model_out_,
    }


def save(est: Any, out_dir: Path) -> Path:
    """``est`` (fitted) as a run folder at ``out_dir`` (gradtune's own or new: outputs.py rules)."""
    run = est._run
    cfg, info = run["config"], dict(run["info"])
    classes = getattr(est, "classes_", None)
    n_classes = 0 if classes is None else len(classes)
    objective, _, _ = objective_for(cfg, est._task, n_classes)
    info.update(features=feature_names(est), target=TARGET, sklearn=_facts(est))
    if classes is not None:
        info["classes"] = [str(c) for c in classes]
    empty = torch.zeros(0, est.n_features_in_, dtype=torch.float64)
    job = Job(est.model_, objective, TensorDataset(x=empty, y=torch.zeros(0)), None, est._task, info)
    history = run["history"]
    last = next((r for r in reversed(history) if r.get("kind") == "eval"), {})
    metrics = {k: v for k, v in last.items() if k not in ("kind", "step", "epoch", "lr", "time")}
    result = Result(
        run["steps"],
        float(est.n_iter_),
        est.stop_reason_,
        last.get("loss", float("nan")),
        last.get("val_loss"),
        metrics,
        0.0,
        history,
        out_dir,
        info,
    )
    try:
        save_outputs(job, cfg, result, out_dir)
    except GradtuneError as e:
        raise ValueError(str(e)) from None
    return out_dir


def load(cls: type, out_dir: Path) -> Any:
    """The fitted estimator of class ``cls`` saved in ``out_dir``."""
    try:
        run = load_run(out_dir)
    except GradtuneError as e:
        raise ValueError(str(e)) from None
    facts = run.info.get("sklearn")
    if facts is None or facts["estimator"] != cls.__name__:
        found = "no estimator" if facts is None else facts["estimator"]
        raise ValueError(f"{out_dir}: holds {found}, not a {cls.__name__} (written by {cls.__name__}.save)")
    params = dict(facts["params"])
    if "hidden_layer_sizes" in params:
        params["hidden_layer_sizes"] = tuple(params["hidden_layer_sizes"])
    est = cls(**params)
    est.model_ = run.model.double()
    est.model_out_ = facts["model_out"]
    est.n_features_in_ = facts["n_features_in"]
    if facts["feature_names_in"] is not None:
        est.feature_names_in_ = np.asarray(facts["feature_names_in"], dtype=object)
    if facts["classes"] is not None:
        est.classes_ = np.asarray(facts["classes"], dtype=np.dtype(facts["classes_dtype"]))
    est.n_iter_, est.stop_reason_ = facts["n_iter"], facts["stop_reason"]
    est.loss_curve_, est.validation_loss_curve_ = facts["loss_curve"], facts["validation_loss_curve"]
    est.best_loss_ = min(est.loss_curve_) if est.loss_curve_ else float("nan")
    est.lr_, est.momentum_, est.nesterov_ = facts["lr"], facts["momentum"], facts["nesterov"]
    est._optimizer_state = None
    est._run = {"config": run.cfg, "info": run.info, "steps": 0, "history": []}
    est._publish()
    return est
