"""Labels in, class ids to the loop; logits out, scikit-learn's classifier outputs.

Two classes train one logit with ``bce`` (P(classes_[1]) = sigmoid(z), as LogisticRegression
and MLPClassifier do); more train one logit per class with softmax ``cross_entropy``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.special import expit, softmax
from sklearn.utils.multiclass import check_classification_targets


class ClassifierOutputs:
    """Mixed into the classifiers (before GDBase): targets, predict, predict_proba."""

    _classifier = True
    _task = "classification"

    def _n_outputs(self, y: np.ndarray) -> int:
        n = len(np.unique(y))
        return 1 if n <= 2 else n

    def _targets(self, y: np.ndarray, first: bool, classes: Any = None) -> tuple[torch.Tensor, int]:
        check_classification_targets(y)
        if first:
            found = np.unique(y) if classes is None else np.unique(np.asarray(classes))
            if len(found) < 2:
                raise ValueError(
                    f"{type(self).__name__} needs samples of at least 2 classes in the data, "
                    f"but the data contains only one class: {found[0]!r}"
                )
            self.classes_ = found
        elif classes is not None and not np.array_equal(np.unique(np.asarray(classes)), self.classes_):
            raise ValueError(f"`classes={classes!r}` is not the same as on the first call: {self.classes_!r}")
        unseen = np.setdiff1d(np.unique(y), self.classes_)
        if unseen.size:
            raise ValueError(f"y holds labels not in classes_: {unseen[:5]!r}")
        ids = np.searchsorted(self.classes_, y)
        return torch.tensor(ids, dtype=torch.long), len(self.classes_)

    def _logits(self, X: Any) -> np.ndarray:
        return self._forward(X)  # type: ignore[attr-defined]

    def _scores(self, X: Any) -> np.ndarray:
        """(N,) for two classes (the logit of classes_[1]), else (N, C)."""
        z = self._logits(X)
        return z[:, 0] if z.shape[1] == 1 else z

    def predict(self, X: Any) -> np.ndarray:
        z = self._scores(X)
        ids = (z > 0).astype(np.intp) if z.ndim == 1 else z.argmax(1)
        return self.classes_[ids]

    def predict_proba(self, X: Any) -> np.ndarray:
        z = self._scores(X)
        if z.ndim == 1:
            p = expit(z)
            return np.stack([1 - p, p], axis=1)
        return softmax(z, axis=1)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        return np.log(self.predict_proba(X))
