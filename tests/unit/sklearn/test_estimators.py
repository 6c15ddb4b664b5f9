"""The estimators against oracles: the closed-form least-squares optimum, scikit-learn's
SGDClassifier / LogisticRegression, a plain torch loop over the same batch order (partial_fit),
and scikit-learn's own meta-estimators (Pipeline, GridSearchCV, cross_val_score)."""

from __future__ import annotations

import csv
import math
import os
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.linear_model import LogisticRegression, SGDClassifier  # noqa: E402
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score, train_test_split  # noqa: E402
from sklearn.pipeline import Pipeline, make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from gradtune.cli import main  # noqa: E402
from gradtune.sklearn import GDClassifier, GDRegressor, MLPClassifier, MLPRegressor  # noqa: E402


@pytest.fixture(scope="module")
def diabetes():
    x, y = load_diabetes(return_X_y=True)
    return StandardScaler().fit_transform(x), y


def closed_form_mse(x: np.ndarray, y: np.ndarray) -> float:
    design = np.c_[x, np.ones(len(y))]
    sol = np.linalg.lstsq(design, y, rcond=None)[0]
    return float(np.mean((design @ sol - y) ** 2))


def test_batch_gd_with_lr_auto_reaches_the_closed_form_loss(diabetes):
    x, y = diabetes
    est = GDRegressor(batch_size="full", lr="auto", tol=1e-10).fit(x, y)
    optimum = closed_form_mse(x, y)
    loss = float(np.mean((est.predict(x) - y) ** 2))
    assert abs(loss - optimum) <= 1e-8 * optimum, (loss, optimum, est.n_iter_, est.stop_reason_)
    assert est.stop_reason_.startswith("converged") and est.n_iter_ < 1000
    assert est.coef_.shape == (10,) and est.intercept_.shape == (1,)
    assert len(est.loss_curve_) == est.n_iter_ and est.best_loss_ == min(est.loss_curve_)
    assert isinstance(est.lr_, float) and est.momentum_ > 0  # auto resolved: Nesterov's


@pytest.mark.parametrize("split_seed", [42, 0])
def test_logistic_on_breast_cancer_matches_logistic_regression(split_seed):
    """train_test_split(X, y, random_state=42) (25% test), standardised in a Pipeline."""
    x, y = load_breast_cancer(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, random_state=split_seed)

    def acc(est):
        return make_pipeline(StandardScaler(), est).fit(xtr, ytr).score(xte, yte)

    ours = acc(GDClassifier(random_state=0))
    sgd = acc(SGDClassifier(loss="log_loss", random_state=0))
    logreg = acc(LogisticRegression())
    assert ours >= sgd and ours >= logreg - 0.01, (ours, sgd, logreg)


def test_multiclass_probabilities_and_decision_function():
    x, y = load_iris(return_X_y=True)
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    est = make_pipeline(StandardScaler(), GDClassifier(random_state=0)).fit(x, names)
    clf = est[-1]
    assert clf.coef_.shape == (3, 4) and list(clf.classes_) == ["setosa", "versicolor", "virginica"]
    proba = est.predict_proba(x)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    assert (est.predict(x) == clf.classes_[est.decision_function(x).argmax(1)]).all()
    assert est.score(x, names) > 0.9


def test_grid_search_over_lr_and_batch_size_in_a_pipeline(diabetes):
    x, y = load_diabetes(return_X_y=True)
    pipe = Pipeline([("scale", StandardScaler()), ("gd", GDRegressor(max_iter=30, random_state=0))])
    grid = {"gd__lr": ["auto", 0.01, 0.1], "gd__batch_size": ["full", 64]}
    search = GridSearchCV(pipe, grid, cv=3).fit(x, y)
    assert len(search.cv_results_["params"]) == 6 and search.best_score_ > 0.4
    assert search.best_estimator_[-1].n_iter_ <= 30


@pytest.mark.slow
def test_cross_val_score_is_the_same_with_one_or_two_jobs(diabetes):
    x, y = diabetes
    est = MLPRegressor(hidden_layer_sizes=(5,), solver="sgd", lr=0.01, batch_size=32, max_iter=20, random_state=0)
    cv = KFold(3, shuffle=True, random_state=0)
    one = cross_val_score(est, x, y / 100, cv=cv, n_jobs=1)
    two = cross_val_score(est, x, y / 100, cv=cv, n_jobs=2)
    np.testing.assert_array_equal(one, two)


def plain_sgd(x, y, batches, lr, momentum):
    """The oracle: torch.optim.SGD over the given batches (index tensors) from zero weights and
    the intercept at the mean of y (the estimators' start)."""
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.full((1,), float(y.mean()), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w, b], lr=lr, momentum=momentum)
    for idx in batches:
        opt.zero_grad()
        ((x[idx] @ w + b - y[idx]) ** 2).mean().backward()
        opt.step()
    return w.detach().numpy(), b.detach().numpy()


def chunk_centred(y: np.ndarray, chunk: int) -> np.ndarray:
    """y with every chunk's mean moved to the overall mean: a fresh linear model starts its
    intercept at the mean of the first rows it is given (the first chunk for partial_fit, all
    rows for fit), so the two runs start from the same weights."""
    out = y.astype(np.float64).copy()
    for a in range(0, len(y), chunk):
        out[a : a + chunk] += y.mean() - y[a : a + chunk].mean()
    return out


def test_partial_fit_keeps_optimizer_state_and_equals_one_in_memory_run(diabetes):
    """Chunks of 96 rows, batches of 32, momentum 0.9: the same batch order as one in-memory
    epoch (shuffle=False) and as plain torch.optim.SGD; momentum carried across the calls."""
    x, y = diabetes[0][:384], chunk_centred(diabetes[1][:384] / 100, 96)
    kw = dict(lr=0.05, momentum=0.9, batch_size=32, shuffle=False, random_state=0)
    streamed = GDRegressor(**kw)
    for start in range(0, 384, 96):
        streamed.partial_fit(x[start : start + 96], y[start : start + 96])
    assert streamed.n_iter_ == 4
    one = GDRegressor(max_iter=1, tol=None, **kw).fit(x, y)
    xt, yt = torch.tensor(x), torch.tensor(y)
    w, b = plain_sgd(xt, yt, [torch.arange(i, i + 32) for i in range(0, 384, 32)], 0.05, 0.9)
    np.testing.assert_allclose(streamed.coef_, w, rtol=0, atol=1e-10)
    np.testing.assert_allclose(one.coef_, w, rtol=0, atol=1e-10)
    np.testing.assert_allclose(streamed.intercept_, b, rtol=0, atol=1e-10)
    loss_stream = np.mean((streamed.predict(x) - y) ** 2)
    loss_one = np.mean((one.predict(x) - y) ** 2)
    assert abs(loss_stream - loss_one) <= 1e-6 * loss_one
    # Without the kept state (a fresh optimizer per call, momentum restarting) the runs differ.
    restarted = GDRegressor(**kw)
    for start in range(0, 384, 96):
        restarted._optimizer_state = None
        restarted.partial_fit(x[start : start + 96], y[start : start + 96])
    assert np.abs(restarted.coef_ - w).max() > 1e-6


def test_partial_fit_classifier_needs_classes_first():
    x, y = load_iris(return_X_y=True)
    est = GDClassifier(lr=0.1, batch_size=16)
    with pytest.raises(ValueError, match="classes"):
        est.partial_fit(x[:20], y[:20])
    est.partial_fit(x[:20], y[:20], classes=[0, 1, 2])  # the first rows hold one class only
    est.partial_fit(x[20:], y[20:])
    assert list(est.classes_) == [0, 1, 2] and est.n_iter_ == 2


@pytest.mark.parametrize(
    "params,match",
    [
        (dict(lr=-1), "'lr' parameter of GDRegressor must be a float > 0 or 'auto'"),
        (dict(batch_size=0), "'batch_size' parameter"),
        (dict(batch_size="half"), "'batch_size' parameter"),
        (dict(max_iter=0), "'max_iter' parameter"),
        (dict(momentum=1.5), "'momentum' parameter"),
        (dict(loss="hinge"), "'loss' parameter"),
        (dict(validation_fraction=1.0), "'validation_fraction' parameter"),
    ],
)
def test_bad_parameters_raise_value_error_at_fit(params, match, diabetes):
    est = GDRegressor(**params)  # stored, not checked, as scikit-learn's rule says
    with pytest.raises(ValueError, match=match):
        est.fit(*diabetes)


def test_lr_auto_on_an_mlp_is_a_value_error(diabetes):
    with pytest.raises(ValueError, match="no known curvature"):
        MLPRegressor(lr="auto").fit(*diabetes)


def test_not_fitted():
    with pytest.raises(NotFittedError):
        GDRegressor().predict(np.zeros((2, 3)))
    with pytest.raises(NotFittedError):
        GDRegressor().save("never-written")
    assert not os.path.exists("never-written")


def test_early_stopping_keeps_the_best_weights(diabetes):
    x, y = diabetes
    est = MLPRegressor((20,), solver="sgd", lr=0.05, batch_size=16, max_iter=200, early_stopping=True)
    est.set_params(n_iter_no_change=3, random_state=0, tol=0.0).fit(x, y / 100)
    assert est.stop_reason_.startswith("val_loss did not improve"), est.stop_reason_
    assert est.n_iter_ < 200 and len(est.validation_loss_curve_) == est.n_iter_


def test_warm_start_continues_from_the_weights(diabetes):
    x, y = diabetes
    est = GDRegressor(lr=0.01, batch_size="full", max_iter=5, tol=None, warm_start=True)
    first = est.fit(x, y).loss_curve_[-1]
    second = est.fit(x, y).loss_curve_[0]
    assert second < first  # a cold start would begin at var(y) again
    cold = GDRegressor(lr=0.01, batch_size="full", max_iter=5, tol=None).fit(x, y).loss_curve_[0]
    assert cold > first


def test_pickle_round_trip(diabetes):
    x, y = diabetes
    est = MLPClassifier((8,), max_iter=20, random_state=0).fit(x, y > 140)
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(again.predict_proba(x), est.predict_proba(x))


def _write_csv(path, names, x, y=None):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names + (["y"] if y is not None else []))
        for i, row in enumerate(x):
            w.writerow(list(row) + ([y[i]] if y is not None else []))


def test_save_is_a_run_folder_that_eval_and_predict_read_and_load_reads_back(tmp_path, capsys, diabetes):
    x, y = diabetes
    labels = np.where(y > 140, "high", "low")
    est = GDClassifier(random_state=0).fit(x, labels)
    run = tmp_path / "run"
    est.save(run)
    assert {"model.safetensors", "config.yaml", "summary.json"} <= set(os.listdir(run))
    names = [f"x{i}" for i in range(10)]
    _write_csv(tmp_path / "test.csv", names, x[:50], labels[:50])
    assert main(["eval", str(run), "--data", str(tmp_path / "test.csv")]) == 0
    shown = capsys.readouterr().out
    accuracy = est.score(x[:50], labels[:50])
    assert f"{accuracy:.4f}"[:5] in shown or str(round(accuracy, 4)) in shown, shown
    _write_csv(tmp_path / "new.csv", names, x[:50])
    assert main(["predict", str(run), "--data", str(tmp_path / "new.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.reader(open(tmp_path / "p.csv")))
    assert [r[0] for r in rows[1:]] == list(est.predict(x[:50]))
    back = GDClassifier.load(run)
    np.testing.assert_array_equal(back.predict_proba(x), est.predict_proba(x))
    np.testing.assert_array_equal(back.coef_, est.coef_)
    assert back.get_params() == est.get_params() and back.n_iter_ == est.n_iter_
    with pytest.raises(ValueError, match="not a GDRegressor"):
        GDRegressor.load(run)


def test_fit_writes_nothing_unless_out_dir_is_given(tmp_path, monkeypatch, diabetes):
    monkeypatch.chdir(tmp_path)
    x, y = diabetes
    GDRegressor(max_iter=3).fit(x, y)
    assert os.listdir(tmp_path) == []
    est = GDRegressor(max_iter=3, out_dir=str(tmp_path / "run")).fit(x, y)
    assert {"model.safetensors", "metrics.jsonl", "summary.json"} <= set(os.listdir(tmp_path / "run"))
    back = GDRegressor.load(tmp_path / "run")
    np.testing.assert_array_equal(back.predict(x), est.predict(x))
    assert math.isclose(back.best_loss_, est.best_loss_)


def test_huber_with_lr_auto_is_robust_to_outliers(diabetes):
    x, y = diabetes
    dirty = y.copy()
    dirty[::20] += 2000.0  # 5% wild targets
    clean = closed_form_mse(x, y)
    huber = GDRegressor(loss="huber", epsilon=50.0, max_iter=3000, tol=1e-9).fit(x, dirty)
    squared = GDRegressor(max_iter=3000, tol=1e-9).fit(x, dirty)
    assert huber.lr_ > 0 and huber.momentum_ == 0.0  # 1/L of the quadratic zone, no known mu
    err_huber = np.mean((huber.predict(x) - y) ** 2)
    err_squared = np.mean((squared.predict(x) - y) ** 2)
    assert err_huber < 1.2 * clean < err_squared, (err_huber, clean, err_squared)


def test_partial_fit_keeps_adam_state_across_calls(diabetes):
    x, y = diabetes
    est = MLPClassifier((8,), batch_size=50, random_state=0)
    for start in range(0, 400, 100):
        est.partial_fit(x[start : start + 100], y[start : start + 100] > 140, classes=[False, True])
    steps = [s["step"] for s in est._optimizer_state["state"].values()]
    assert all(int(s) == 8 for s in steps), steps  # 4 calls x 2 batches: the moments were never reset


def test_dataframe_feature_names_go_to_the_run_folder(tmp_path, capsys, diabetes):
    pd = pytest.importorskip("pandas")
    x, y = diabetes
    names = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
    frame = pd.DataFrame(x, columns=names)
    est = GDRegressor().fit(frame, y)
    assert list(est.feature_names_in_) == names
    est.save(tmp_path / "run")
    _write_csv(tmp_path / "new.csv", names, x[:5])
    assert main(["predict", str(tmp_path / "run"), "--data", str(tmp_path / "new.csv")]) == 0
    shown = [float(v) for v in capsys.readouterr().out.split()[1:]]
    np.testing.assert_allclose(shown, est.predict(frame[:5]), rtol=1e-6)


def test_partial_fit_with_lr_auto_keeps_the_first_calls_rate_and_nesterov(diabetes):
    x, y = diabetes
    est = GDRegressor()  # batch GD per call, lr and momentum "auto"
    for start in range(0, 440, 110):
        est.partial_fit(x[start : start + 110], y[start : start + 110])
    assert est.momentum_ > 0 and est.nesterov_
    assert est._optimizer_state["param_groups"][0]["nesterov"] is True
    assert est._optimizer_state["param_groups"][0]["lr"] == est.lr_
