"""scikit-learn's own estimator checks (``parametrize_with_checks``), written by other people:
the API bar every estimator must pass. A check our estimators fail on purpose is listed in the
class's ``expected_failed_checks`` with its one-line reason (none at present)."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")

from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from gradtune.sklearn import GDClassifier, GDRegressor, MLPClassifier, MLPRegressor  # noqa: E402

# Checks fit with few epochs on purpose; the warning that max_iter was reached is expected there.
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def expected_failed(estimator) -> dict[str, str]:
    return dict(getattr(type(estimator), "expected_failed_checks", {}))


@parametrize_with_checks(
    [GDRegressor(), GDClassifier(), MLPRegressor(), MLPClassifier()], expected_failed_checks=expected_failed
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
