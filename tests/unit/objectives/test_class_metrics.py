"""Classification metrics and class weights against scikit-learn and torch:

* precision / recall / F1 (macro, weighted, per class) and the confusion matrix from the
  objective's confusion sums equal ``sklearn.metrics`` on the same predictions, exactly;
* ``class_weight: balanced`` equals ``sklearn.utils.class_weight.compute_class_weight``, exactly;
* the weighted loss, summed over micro-batches and divided once by the summed weight count,
  equals ``F.cross_entropy(weight=w)`` on the whole batch, and so do its gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradtune.objectives import class_metrics
from gradtune.objectives.classification import Classification
from gradtune.runtime.errors import GradtuneError

sk = pytest.importorskip("sklearn.metrics")


class Fixed(nn.Module):
    """A 'model' whose logits are a parameter indexed by the batch's x (sample ids)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, x):
        return self.logits[x.long()]


def _sums(objective, model, n, chunks):
    total: dict[str, float] = {}
    for idx in torch.arange(n).split(chunks):
        out = objective(model, {"x": idx, "y": model.y[idx]})
        for k, v in out.metrics.items():
            total[k] = total.get(k, 0.0) + float(v)
    return total


@pytest.mark.parametrize("n_classes,seed", [(2, 0), (4, 1), (5, 2)])
def test_metrics_equal_sklearn_exactly(n_classes, seed):
    g = torch.Generator().manual_seed(seed)
    n = 203
    y = torch.randint(0, n_classes, (n,), generator=g)
    if n_classes == 5:  # class 4 never true, never predicted: sklearn leaves it out of the means
        y[y == 4] = 0
    logits = torch.randn(n, n_classes, generator=g, dtype=torch.float64)
    logits[:, 4 if n_classes == 5 else 0] -= 100 if n_classes == 5 else 0
    model = Fixed(logits).eval()
    model.y = y
    sums = _sums(Classification(), model, n, 37)
    pred = logits.argmax(-1).numpy()
    got = class_metrics.derived("val_", sums, [f"c{i}" for i in range(n_classes)])
    y_np = y.numpy()
    assert got["val_confusion"] == sk.confusion_matrix(y_np, pred, labels=list(range(n_classes))).tolist()
    for avg in ("macro", "weighted"):
        p, r, f, _ = sk.precision_recall_fscore_support(y_np, pred, average=avg, zero_division=0)
        assert (got[f"val_precision_{avg}"], got[f"val_recall_{avg}"], got[f"val_f1_{avg}"]) == (p, r, f)
    assert got["val_f1"] == sk.f1_score(y_np, pred, average="macro", zero_division=0)
    p, r, f, s = sk.precision_recall_fscore_support(y_np, pred, labels=list(range(n_classes)), zero_division=0)
    for i in range(n_classes):
        row = got["val_per_class"][f"c{i}"]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == (p[i], r[i], f[i], s[i])


def test_training_mode_adds_no_confusion_sums():
    model = Fixed(torch.randn(4, 3)).train()
    out = Classification()(model, {"x": torch.arange(4), "y": torch.tensor([0, 1, 2, 1])})
    assert set(out.metrics) == {"correct"}


def test_balanced_weights_equal_sklearn():
    from sklearn.utils.class_weight import compute_class_weight

    y = torch.tensor([0] * 87 + [1] * 13 + [2] * 5)
    ours = class_metrics.class_weights("balanced", y, ["ham", "spam", "x"], 3)
    theirs = compute_class_weight("balanced", classes=np.arange(3), y=y.numpy())
    assert ours.tolist() == theirs.tolist()
    w = class_metrics.class_weights({"spam": 3, "x": 0.5}, y, ["ham", "spam", "x"], 3)
    assert w.tolist() == [1.0, 3.0, 0.5]
    with pytest.raises(GradtuneError, match="unknown label 'eggs'"):
        class_metrics.class_weights({"eggs": 2}, y, ["ham", "spam", "x"], 3)
    with pytest.raises(GradtuneError, match="has no training sample"):
        class_metrics.class_weights("balanced", torch.tensor([0, 0, 1]), ["a", "b", "c"], 3)


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("chunks", [64, 7, 1])
def test_weighted_loss_divides_once_by_the_weight_sum(ls, chunks):
    g = torch.Generator().manual_seed(3)
    n, c = 64, 3
    logits = torch.randn(n, c, generator=g, dtype=torch.float64)
    y = torch.cat([torch.zeros(50, dtype=torch.long), torch.randint(1, c, (14,), generator=g)])
    w = class_metrics.class_weights("balanced", y, None, c)
    objective = Classification(label_smoothing=ls, weight=w.tolist())
    model = Fixed(logits.clone()).train()
    loss_sum, count, samples = 0.0, 0.0, 0
    for idx in torch.arange(n).split(chunks):  # micro-batches: gradients of sums accumulate
        out = objective(model, {"x": idx, "y": y[idx]})
        out.loss_sum.backward()
        loss_sum, count, samples = (
            loss_sum + float(out.loss_sum),
            count + float(out.count),
            samples + int(out.metrics["samples"]),
        )
    ours_grad = model.logits.grad / count  # the loop's one division
    ref = logits.clone().requires_grad_()
    expected = F.cross_entropy(ref, y, weight=w, label_smoothing=ls)
    expected.backward()
    assert loss_sum / count == pytest.approx(float(expected), abs=1e-12, rel=1e-12)
    assert torch.allclose(ours_grad, ref.grad, atol=1e-14, rtol=1e-12)
    assert samples == n
