"""Classification runs end to end: class weights, F1 and the confusion matrix in metrics.jsonl,
summary.json, report.html and ``gradtune eval``; early stopping on val_f1."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest

from gradtune import cli

sk = pytest.importorskip("sklearn.metrics")
SETTINGS = ["model=logistic", "data=breast_cancer", "batch_size=32", "lr=0.1", "epochs=6", "progress=off"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cls") / "run"
    argv = ["train", *SETTINGS, "class_weight=balanced", "early_stopping.enabled=true"]
    assert cli.main([*argv, "early_stopping.monitor=val_f1", "early_stopping.patience=3", f"out_dir={out}"]) == 0
    return out


def test_val_f1_logged_and_the_matrix_in_summary_and_report(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("kind") == "eval"]
    assert evals and all("val_f1" in r and "val_confusion" in r for r in evals)
    summary = json.loads((run / "summary.json").read_text())
    m = summary["metrics"]
    assert sum(map(sum, m["val_confusion"])) == sum(c["support"] for c in m["val_per_class"].values())
    assert summary["job"]["early_stopping"]["monitor"] == "val_f1"
    w = summary["job"]["class_weights"]
    assert len(w) == 2 and w[0] != w[1]
    html = (run / "report.html").read_text()
    assert "Per-class metrics" in html and "Confusion matrix" in html


def test_eval_equals_sklearn_on_the_predictions(run, tmp_path, capsys):
    from gradtune.datasets import embedded_path

    test = tmp_path / "test.csv"
    test.write_text(embedded_path("breast_cancer").read_text())
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--data", str(test)]) == 0
    out = capsys.readouterr().out
    assert "true/predicted" in out and "precision" in out
    got = {k: float(v) for k, v in re.findall(r"(\w+)=(\S+)", out.strip().splitlines()[-1])}
    assert cli.main(["predict", str(run), "--data", str(test)]) == 0
    pred = [r["prediction"] for r in csv.DictReader(io.StringIO(capsys.readouterr().out))]
    with test.open() as f:
        rows = list(csv.DictReader(f))
    target = list(rows[0])[-1]
    true = [r[target] for r in rows]
    # printed to 6 significant digits (tests/unit/objectives/test_class_metrics.py: exact)
    assert got["f1_macro"] == pytest.approx(sk.f1_score(true, pred, average="macro"), rel=1e-5)
    assert got["f1_weighted"] == pytest.approx(sk.f1_score(true, pred, average="weighted"), rel=1e-5)
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(true, pred), rel=1e-5)


def test_weighted_micro_batches_equal_the_one_shot_run(tmp_path):
    """class_weight divides once by the batch's weight sum: micro-batched steps equal whole ones."""
    import torch
    from safetensors.torch import load_file

    base = ["train", *SETTINGS, "class_weight={malignant: 2.5}", "dtype=float64", "plot=false"]
    assert cli.main([*base, f"out_dir={tmp_path / 'one'}"]) == 0
    assert cli.main([*base, "micro_batch_size=5", f"out_dir={tmp_path / 'micro'}"]) == 0
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("one", "micro"))
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-12) for k in a)
