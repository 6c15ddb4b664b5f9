"""scikit-learn estimators on gradtune's loop (the ``sklearn`` extra): ``GDRegressor`` (linear,
squared error / Huber), ``GDClassifier`` (logistic), ``MLPRegressor``, ``MLPClassifier``.

    from gradtune.sklearn import GDRegressor
    GDRegressor().fit(X, y).predict(X)

Each ``fit`` builds a Job from the arrays and runs the one loop in memory (engine.py); nothing is
written unless ``out_dir`` is given or ``save`` is called (persist.py).
"""

from gradtune.sklearn.linear import GDClassifier, GDRegressor
from gradtune.sklearn.mlp import MLPClassifier, MLPRegressor

__all__ = ["GDClassifier", "GDRegressor", "MLPClassifier", "MLPRegressor"]
