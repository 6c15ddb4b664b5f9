"""Tables by columns: the pyarrow reader gives the row reader's table (and, for a bad cell, its
message naming the line and column); pyarrow absent, everything still reads; ``missing`` and
``categorical`` encode as documented; predict applies the saved encoding (checked by hand) and
carries ids / input columns."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gradtune import cli
from gradtune.data import table_arrow, tabular
from gradtune.runtime.errors import GradtuneError

pytest.importorskip("pyarrow")

MIXED = "a,city,b,y\n1,Paris,2,3\n,Rome,NA,4\n5,,6,7\n8,Paris,9,8\n2,Rome,3,4.5\n3,Oslo,1,2\n4,Oslo,2,5\n6,Paris,,1\n"


@pytest.fixture
def columnar(monkeypatch):
    """Every CSV through the pyarrow reader (not only large ones)."""
    monkeypatch.setattr(table_arrow, "MIN_BYTES", 0)


def _read_both(monkeypatch, path, **kw):
    monkeypatch.setattr(table_arrow, "MIN_BYTES", 0)
    fast = tabular.read_table(str(path), None, None, **kw)
    monkeypatch.setattr(table_arrow, "pa", None)  # pyarrow "absent": the standard-library reader
    slow = tabular.read_table(str(path), None, None, **kw)
    monkeypatch.undo()
    return fast, slow


def _equal(a: tabular.Table, b: tabular.Table) -> None:
    assert a.feature_names == b.feature_names and a.categorical == b.categorical and a.n_rows == b.n_rows
    for name in a.feature_names:
        x, y = a.columns[name], b.columns[name]
        if x.dtype == object:
            assert x.tolist() == y.tolist(), name
        else:
            np.testing.assert_array_equal(x, y)
    assert [str(v) for v in list(a.y_raw)] == [str(v) for v in list(b.y_raw)] or np.allclose(
        np.asarray(a.y_raw, dtype=float), np.asarray(b.y_raw, dtype=float)
    )
    assert list(a.lines) == list(b.lines)


@pytest.mark.parametrize(
    "text, kw",
    [
        ("a,b,y\n1,2.5,3\n4,5e3,-6\n\n7,8,9\n", {}),
        (MIXED, {"missing": "mean", "categorical": "auto"}),
        (MIXED, {"missing": "drop", "categorical": ["city"]}),
        ("a,c,y\n1,x,a\n2,y,b\n3,x,b\n", {"categorical": "auto"}),
    ],
)
def test_columnar_reader_equals_the_row_reader(tmp_path, monkeypatch, text, kw):
    path = tmp_path / "t.csv"
    path.write_text(text)
    fast, slow = _read_both(monkeypatch, path, **kw)
    _equal(fast, slow)
    assert isinstance(fast.y_raw, np.ndarray) and isinstance(slow.y_raw, list)  # it did take the columnar path


@pytest.mark.parametrize(
    "text, needle",
    [
        ("a,b,y\n1,2,3\n4,nan,6\n", "t.csv:3: column 'b': 'nan' is not finite"),
        ("a,b,y\n1,2,3\n4,,6\n", "t.csv:3: column 'b': not a number: '' (a missing value"),
        ("a,b,y\n1,2,3\n4,x,6\n", "t.csv:3: column 'b': not a number: 'x'"),
        ("a,b,y\n1,2,3\n4,5\n", "t.csv:3: expected 3 cells, found 2"),
        ("a,b,y\n1,2,3\n4,1e200,6\n", "t.csv:3: column 'b': '1e200' is too large"),
        ("a,b,y\n1,2,3\n4,inf,6\n", "t.csv:3: column 'b': 'inf' is not finite"),
        ("a,b,y\n1,2,3\n4,5,\n", "t.csv:3: column 'y': not a number: ''"),
    ],
)
def test_bad_cells_get_the_row_readers_message(tmp_path, monkeypatch, text, needle):
    path = tmp_path / "t.csv"
    path.write_text(text)
    messages = []
    for absent in (False, True):
        monkeypatch.setattr(table_arrow, "MIN_BYTES", 0)
        if absent:
            monkeypatch.setattr(table_arrow, "pa", None)
        with pytest.raises(GradtuneError) as e:
            table = tabular.read_table(str(path), None, None)
            tabular.regression_targets(table, table.target)
        messages.append(str(e.value))
    assert messages[0] == messages[1] and needle in messages[0], messages


def test_missing_and_categorical_encode_as_documented(tmp_path, monkeypatch, columnar, capsys):
    path = tmp_path / "t.csv"
    path.write_text(MIXED)
    with pytest.raises(GradtuneError, match=r"t\.csv:2: column 'city': not a number: 'Paris'"):
        tabular.read_table(str(path), None, None)
    dropped = tabular.read_table(str(path), None, None, missing="drop", categorical="auto")
    assert dropped.n_rows == 5 and list(dropped.lines) == [2, 5, 6, 7, 8]
    assert "3 rows with a missing value dropped (missing=drop; the first is line 3)" in capsys.readouterr().err


def test_parquet_reads_like_its_csv(tmp_path, monkeypatch):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = tmp_path / "t.csv"
    path.write_text(MIXED)
    pq.write_table(pacsv.read_csv(path), tmp_path / "t.parquet")
    kw = {"missing": "mean", "categorical": "auto"}
    monkeypatch.setattr(table_arrow, "pa", None)
    csv_table = tabular.read_table(str(path), None, None, **kw)
    monkeypatch.undo()
    parquet = tabular.read_table(str(tmp_path / "t.parquet"), None, None, **kw)
    assert parquet.categorical == ["city"] and list(parquet.lines) == list(range(1, 9))
    for name in csv_table.feature_names:
        a, b = csv_table.columns[name], parquet.columns[name]
        assert a.tolist() == b.tolist() if a.dtype == object else np.array_equal(a, b, equal_nan=True)
    monkeypatch.setattr(table_arrow, "pa", None)
    monkeypatch.setattr(tabular, "read_rows", lambda p: (_ for _ in ()).throw(GradtuneError(f"{p}: needs pyarrow")))
    with pytest.raises(GradtuneError, match="needs pyarrow"):
        tabular.read_table(str(tmp_path / "t.parquet"), None, None)


def _predict(capsys, *argv) -> list[dict]:
    capsys.readouterr()
    assert cli.main(["predict", *argv]) == 0, capsys.readouterr().err
    return list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


def test_predict_applies_the_saved_encoding_by_hand(tmp_path, capsys):
    data, run = tmp_path / "t.csv", tmp_path / "run"
    data.write_text(MIXED)
    argv = ["train", f"data={data}", "missing=mean", "categorical=auto", "max_steps=5", "progress=off", "plot=false"]
    assert cli.main([*argv, f"out_dir={run}"]) == 0, capsys.readouterr().err
    info = json.loads((run / "summary.json").read_text())["job"]
    assert info["inputs"] == ["a", "city=Oslo", "city=Paris", "city=Rome", "b"]
    new = tmp_path / "new.csv"
    new.write_text("id,a,city,b\nr1,1,Oslo,\nr2,,Paris,2\nr3,7,,3\n")
    rows = [
        {"a": 1.0, "city": "Oslo", "b": None},
        {"a": None, "city": "Paris", "b": 2.0},
        {"a": 7.0, "city": None, "b": 3.0},
    ]
    fill, cats = info["encoding"]["fill"], info["encoding"]["categories"]["city"]
    by_hand = []
    for r in rows:
        x = [r["a"] if r["a"] is not None else fill["a"]]
        x += [float(r["city"] == c) if r["city"] is not None else fill[f"city={c}"] for c in cats]
        x += [r["b"] if r["b"] is not None else fill["b"]]
        by_hand.append([(v - m) / s for v, m, s in zip(x, info["feature_mean"], info["feature_std"])])
    w = load_file(str(run / "model.safetensors"))
    weight, bias = (next(w[k] for k in w if k.endswith(end)).double() for end in ("weight", "bias"))
    z = torch.tensor(by_hand, dtype=torch.float64) @ weight.T + bias
    expected = (z[:, 0] * info["target_std"] + info["target_mean"]).tolist()
    got = _predict(capsys, str(run), "--data", str(new), "--id-column", "id", "--keep-columns", "city,b")
    assert [g["id"] for g in got] == ["r1", "r2", "r3"] and [g["city"] for g in got] == ["Oslo", "Paris", ""]
    assert [float(g["prediction"]) for g in got] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert list(got[0]) == ["id", "city", "b", "prediction"]
    unseen = tmp_path / "unseen.csv"
    unseen.write_text("a,city,b\n1,Lima,2\n")
    capsys.readouterr()
    assert cli.main(["predict", str(run), "--data", str(unseen)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"gradtune: error: {unseen}:2: column 'city': category 'Lima' was not seen in training "
        f"(known: 'Oslo', 'Paris', 'Rome')"
    ]
    assert not math.isnan(expected[0])


def test_columnar_and_row_readers_train_the_same_run(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    y = x @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.1 * rng.normal(size=300)
    path = tmp_path / "big.csv"
    path.write_text("a,b,c,d,y\n" + "".join(",".join(repr(float(v)) for v in [*r, t]) + "\n" for r, t in zip(x, y)))
    losses = []  # the trained weights of each run
    for absent in (False, True):
        monkeypatch.setattr(table_arrow, "MIN_BYTES", 0)
        if absent:
            monkeypatch.setattr(table_arrow, "pa", None)
        out = tmp_path / f"run{absent}"
        assert cli.main(["train", f"data={path}", "max_steps=20", "progress=off", "plot=false", f"out_dir={out}"]) == 0
        losses.append(load_file(str(out / "model.safetensors")))
    assert all(torch.allclose(losses[0][k], losses[1][k], rtol=1e-5, atol=1e-7) for k in losses[0])


def test_least_squares_optimum_small_and_large_against_numpy(monkeypatch):
    from gradtune.jobs import tabular as tabular_job

    rng = np.random.default_rng(0)
    hot = np.eye(3)[rng.integers(0, 3, 5000)]  # one-hot: collinear with the bias column
    x = np.concatenate([rng.normal(size=(5000, 6)), hot], axis=1)
    y = x[:, :6] @ rng.normal(size=6) + hot @ np.array([1.0, -2.0, 0.5]) + 0.3 * rng.normal(size=5000)
    design = np.concatenate([x, np.ones((5000, 1))], axis=1)
    sol = np.linalg.lstsq(design, y, rcond=None)[0]  # numpy's SVD solve: the oracle
    exact = float(np.mean((design @ sol - y) ** 2))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    assert tabular_job.optimum_loss(xt, yt, half=False) == pytest.approx(exact, rel=1e-9)
    monkeypatch.setattr(tabular_job, "LARGE", 0)  # the chunked normal equations
    monkeypatch.setattr(tabular_job, "CHUNK", 777)
    assert tabular_job.optimum_loss(xt, yt, half=False) == pytest.approx(exact, rel=1e-9)
    assert tabular_job.optimum_loss(xt.float(), yt.float(), half=True) == pytest.approx(exact / 2, rel=1e-5)
