"""Small real data sets shipped inside the package, so the default job needs no download.

diabetes       442 rows, 10 features (age, sex, bmi, bp, s1..s6), target ``progression`` (a
               quantitative measure of disease progression one year after baseline).
               Efron, Hastie, Johnstone, Tibshirani (2004), "Least Angle Regression"; the raw
               (unscaled) version as shipped by scikit-learn.
breast_cancer  569 rows, 30 features, target ``diagnosis`` (malignant / benign). Breast Cancer
               Wisconsin (Diagnostic), Wolberg, Street, Mangasarian, UCI ML repository (1995);
               as shipped by scikit-learn.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent

EMBEDDED: dict[str, dict[str, str]] = {
    "diabetes": {"file": "diabetes.csv", "target": "progression", "task": "regression"},
    "breast_cancer": {"file": "breast_cancer.csv", "target": "diagnosis", "task": "classification"},
}


def embedded_path(name: str) -> Path:
    return HERE / EMBEDDED[name]["file"]
