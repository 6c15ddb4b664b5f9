"""Classification metrics beyond accuracy, and class weights for imbalanced labels.

**Confusion sums.** At evaluation (the model in eval mode) ``Classification`` returns one metric
sum per cell of the confusion matrix, ``confusion_{i}_{j}`` = samples of true class i predicted
as j: scalar sums, so they add across chunks, micro-batches and ranks like every other metric.
``derived`` turns them into scikit-learn's numbers, computed the way ``sklearn.metrics`` computes
them (numpy float64, the same operations in the same order, so they are equal, not close):

    precision_c = tp / (tp + fp)     recall_c = tp / (tp + fn)     f1_c = 2 tp / (true_c + pred_c)
    (0 where the denominator is 0: sklearn's zero_division default)
    macro: the mean over the classes present in the truth or the predictions (sklearn's labels)
    weighted: the mean weighted by support (true_c)

``f1`` is the macro F1 (``early_stopping.monitor: val_f1``).

**Class weights** (``class_weight``): ``balanced`` is scikit-learn's ``compute_class_weight``,
w_c = n_samples / (n_classes * count_c) over the training labels; a mapping {label: w} sets some
and leaves the others at 1. With weights the cross-entropy is sum_i w_{y_i} loss_i and the count
is sum_i w_{y_i}, so the loop's one division gives ``F.cross_entropy(weight=w)``'s weighted mean
for the whole batch, however it is split; ``samples`` then carries the plain sample count for
accuracy.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from gradtune.runtime.errors import GradtuneError

PREFIX = "confusion_"


def confusion_sums(y: torch.Tensor, pred: torch.Tensor, n_classes: int) -> dict[str, torch.Tensor]:
    """``confusion_{i}_{j}`` sums (0-dim tensors) from class ids y, pred (B,)."""
    cells = torch.bincount(y.reshape(-1) * n_classes + pred.reshape(-1), minlength=n_classes * n_classes)
    return {f"{PREFIX}{i}_{j}": c for (i, j), c in zip(np.ndindex(n_classes, n_classes), cells.unbind())}


def confusion(sums: dict[str, float]) -> Optional[np.ndarray]:
    """The (C, C) int64 matrix (rows: true class, columns: predicted) from the sums; None if
    there are none (training steps, other tasks)."""
    n = sum(1 for k in sums if k.startswith(PREFIX))
    if not n:
        return None
    c = int(round(n**0.5))
    return np.array([[int(sums[f"{PREFIX}{i}_{j}"]) for j in range(c)] for i in range(c)], dtype=np.int64)


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros(num.shape, dtype=np.float64)
    mask = den != 0
    out[mask] = num[mask] / den[mask]
    return out


def report(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, f1 (float64) and support (int64) of a confusion matrix."""
    tp = np.diag(cm).astype(np.float64)
    pred, true = cm.sum(axis=0).astype(np.float64), cm.sum(axis=1).astype(np.float64)
    return {
        "precision": _divide(tp, pred),
        "recall": _divide(tp, true),
        "f1": _divide(2 * tp, true + pred),
        "support": cm.sum(axis=1),
    }


def derived(prefix: str, sums: dict[str, float], classes: Optional[list[str]] = None) -> dict[str, Any]:
    """The metrics of an evaluation's sums: accuracy over samples (when weights made the count
    a weight sum), then, where confusion sums exist, precision / recall / F1 (macro, weighted,
    per class) and the confusion matrix (a list of rows)."""
    out: dict[str, Any] = {}
    if "samples" in sums and "correct" in sums and sums["samples"]:
        out[f"{prefix}accuracy"] = sums["correct"] / sums["samples"]
    cm = confusion(sums)
    if cm is None:
        return out
    r = report(cm)
    present = (r["support"] + cm.sum(axis=0)) > 0  # sklearn's labels: seen in truth or predictions
    for k in ("precision", "recall", "f1"):
        out[f"{prefix}{k}_macro"] = float(np.average(r[k][present]))
        out[f"{prefix}{k}_weighted"] = float(np.average(r[k][present], weights=r["support"][present]))
    out[f"{prefix}f1"] = out[f"{prefix}f1_macro"]
    names = classes if classes is not None and len(classes) == len(cm) else [str(i) for i in range(len(cm))]
    out[f"{prefix}per_class"] = {
        name: {k: (int(r[k][i]) if k == "support" else float(r[k][i])) for k in r} for i, name in enumerate(names)
    }
    out[f"{prefix}confusion"] = cm.tolist()
    return out


def class_weights(spec: Any, y: torch.Tensor, classes: Optional[list[str]], n_classes: int) -> Optional[torch.Tensor]:
    """(C,) float64 weights from ``class_weight`` and the training labels y (class ids); None
    for no weighting."""
    if spec is None:
        return None
    names = list(classes) if classes else [str(i) for i in range(n_classes)]
    if spec == "balanced":
        counts = torch.bincount(y.reshape(-1).long(), minlength=n_classes).double()
        if (counts == 0).any():
            missing = [names[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
            raise GradtuneError(f"config: class_weight=balanced: class {missing[0]!r} has no training sample")
        # a true division (a Python number over a tensor would multiply by the reciprocal)
        return torch.full_like(counts, float(y.numel())) / (n_classes * counts)
    if not isinstance(spec, dict):
        raise GradtuneError(f"config key 'class_weight': expected balanced or a mapping label: weight, got {spec!r}")
    w = torch.ones(n_classes, dtype=torch.float64)
    for label, value in spec.items():
        if str(label) not in names:
            raise GradtuneError(f"config key 'class_weight': unknown label {label!r} (labels: {', '.join(names)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
            raise GradtuneError(f"config key 'class_weight': weight of {label!r} must be a number > 0, got {value!r}")
        w[names.index(str(label))] = float(value)
    return w
