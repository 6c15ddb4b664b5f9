"""Training's matrix reader (data/table_matrix.py): a numeric CSV / Parquet file goes straight
into one (N, F) array with rows in the split's order, equal to what the column reader and the
column-by-column standardisation give; a float32 column far from zero keeps its spread; what it
cannot vouch for goes back to the column reader; and the only table-sized memory it takes is
the array itself (numpy's allocations, seen by tracemalloc, stay a few (N,) vectors)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from gradtune.data import table_arrow, table_matrix, tabular
from gradtune.data.encoding import Encoding
from gradtune.data.split import split_indices
from gradtune.jobs.tabular import standardized

pa = pytest.importorskip("pyarrow")
pacsv = pytest.importorskip("pyarrow.csv")
pq = pytest.importorskip("pyarrow.parquet")


def _write(tmp_path, n: int, f: int = 5, gaps: bool = False, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    cols = {f"x{j}": np.round(rng.normal(size=n) * 10.0**j, 4) for j in range(f - 2)}
    cols["stamp"] = 1.7e9 + np.round(rng.normal(size=n) * 10.0, 3)  # far from zero: 24 bits would lose it
    cols["count"] = rng.integers(0, 100, n)
    if gaps:
        for name in list(cols)[:2]:
            cols[name] = pa.array(np.where(rng.random(n) < 0.1, np.nan, cols[name]), from_pandas=True)
    cols["y"] = np.round(rng.normal(size=n), 4)
    table = pa.table(cols)
    csv, parquet = tmp_path / "t.csv", tmp_path / "t.parquet"
    pacsv.write_csv(table, csv)
    pq.write_table(table, parquet)
    return csv, parquet


def _by_columns(path, missing: str, dtype: torch.dtype, standardize: bool):
    """What training built before: read_table, Encoding.fit, standardized (one column at a time)."""
    table = tabular.read_table(str(path), None, None, missing=missing, categorical="auto")
    train, val = split_indices(table.n_rows, 0.2, 3)
    enc = Encoding.fit(table, train.numpy(), missing)
    y = np.asarray(table.y_raw)
    x, mean, std = standardized(table, enc, dtype, torch.cat([train, val]), len(train) if standardize else None, None)
    return x, mean, std, enc.fill, y


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("missing", ["error", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("standardize", [True, False])
def test_matrix_equals_the_column_path(tmp_path, monkeypatch, fmt, missing, dtype, standardize):
    monkeypatch.setattr(table_arrow, "MIN_BYTES", 0)
    monkeypatch.setattr(table_matrix, "BLOCK", 1 << 16)  # many CSV blocks
    monkeypatch.setattr(table_matrix, "CHUNK", 8 * 5 * 777)  # many Parquet batches, standardised in chunks
    path = _write(tmp_path, 5000, gaps=missing == "mean")[fmt == "parquet"]
    got = table_matrix.read(str(path), None, None, missing, "auto", dtype, 0.2, 3, standardize)
    assert got is not None
    x, mean, std, fill, y = _by_columns(path, missing, dtype, standardize)
    np.testing.assert_array_equal(got.table.y_raw, y)
    np.testing.assert_allclose(got.mean, mean, rtol=1e-13)
    np.testing.assert_allclose(got.std, std, rtol=1e-10)
    assert list(got.fill) == list(fill) and np.allclose(list(got.fill.values()), list(fill.values()), rtol=1e-13)
    assert got.x.dtype == dtype and got.x.shape == x.shape and not got.x.isnan().any()
    if not standardize and dtype == torch.float32 and missing == "error":
        assert torch.equal(got.x, x)  # the raw values, rounded once
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(got.x, x, rtol=0, atol=tol * (1 if standardize else float(x.abs().max())))


def test_a_float32_column_far_from_zero_keeps_its_spread(tmp_path, monkeypatch):
    """stamp = 1.7e9 + N(0, 10): float32 spacing there is 128, so stored as read every value
    would round to one of a few; the matrix stores it less a shift and standardises in float64."""
    path = _write(tmp_path, 4000)[1]
    got = table_matrix.read(str(path), None, None, "error", "auto", torch.float32, 0.2, 3, True)
    exact = _by_columns(path, "error", torch.float64, True)[0]
    j = got.table.feature_names.index("stamp")
    assert float((got.x[:, j].double() - exact[:, j]).abs().max()) < 1e-5
    assert float((exact[:, j].float().double() - exact[:, j]).abs().max()) < 1e-6  # the oracle is not rounded
    # what storing the raw values in float32 would have done: errors of order 128 / 10
    raw = torch.tensor(1.7e9 + exact[:, j].numpy() * got.std[j], dtype=torch.float32).double()
    assert float(((raw - got.mean[j]) / got.std[j] - exact[:, j]).abs().max()) > 1.0


@pytest.mark.parametrize(
    "text, kw",
    [
        ("a,b,y\n1,2,3\n\n4,5,6\n7,8,9\n", {}),  # a blank line: the counted rows are not the read ones
        ("a,b,y\n1,2,3\n4,x,6\n7,8,9\n", {}),  # a bad cell: the row reader names its line
        ("a,b,y\n1,2,3\n4,,6\n7,8,9\n", {}),  # missing with missing=error
        ("a,b,y\n1,2,3\n4,,6\n7,8,9\n", {"missing": "drop"}),
        ("a,c,y\n1,p,3\n4,q,6\n7,p,9\n", {"categorical": "auto"}),  # a text column: one-hot by columns
        ("a,b,y\n1,2,3\n4,5,6\n7,8,9\n", {"categorical": ["a"]}),
        ("a,b,y\n1,2,3\n4,1e200,6\n7,8,9\n", {}),  # too large
        ("a,b,y\n1,2,3\n4,5,nan\n7,8,9\n", {}),  # a target that is not finite
        ("a,b,y\n1,2,3\n,,6\n7,8,9\n", {"missing": "mean"}),  # a record of blank cells
    ],
)
def test_what_it_cannot_vouch_for_goes_to_the_column_reader(tmp_path, monkeypatch, text, kw):
    monkeypatch.setattr(table_arrow, "MIN_BYTES", 0)
    path = tmp_path / "t.csv"
    path.write_text(text)
    args = {"missing": "error", "categorical": "none", **kw}
    assert (
        table_matrix.read(str(path), None, None, args["missing"], args["categorical"], torch.float32, 0.2, 0, True)
        is None
    )


def test_a_clean_table_takes_the_matrix(tmp_path, monkeypatch):
    monkeypatch.setattr(table_arrow, "MIN_BYTES", 0)
    path = tmp_path / "t.csv"
    path.write_text("a,b,y\n1,2,3\n4,5,6\n7,8,9\n10,11,spam\n")  # string labels are kept as they are
    got = table_matrix.read(str(path), None, None, "error", "auto", torch.float32, 0.25, 0, True)
    assert got is not None and got.table.y_raw.tolist() == ["3", "6", "9", "spam"]
    assert got.table.feature_names == ["a", "b"] and got.x.shape == (4, 2)
    assert table_matrix.count_rows(path) == 4
    (tmp_path / "u.csv").write_text("a,y\n1,2\n3,4")  # no newline at the end
    assert table_matrix.count_rows(tmp_path / "u.csv") == 2


def _numpy_peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_the_only_table_sized_memory_is_the_matrix(tmp_path, monkeypatch, fmt):
    """numpy reports its buffers to tracemalloc (torch and Arrow do not): while reading, the
    matrix reader's numpy memory is a few (N,) vectors (the row permutation, the target) and one
    batch, far under one float64 copy of the features, which the column reader takes (and so
    would any loader that parsed the table whole before placing it)."""
    monkeypatch.setattr(table_arrow, "MIN_BYTES", 0)
    monkeypatch.setattr(table_matrix, "BLOCK", 1 << 18)
    monkeypatch.setattr(table_matrix, "CHUNK", 1 << 18)
    n, f = 200_000, 20
    path = _write(tmp_path, n, f=f, gaps=True)[fmt == "parquet"]
    features = 8 * n * f  # bytes of one float64 copy of the (N, F) features
    x: list = []
    ours = _numpy_peak(
        lambda: x.append(table_matrix.read(str(path), None, None, "mean", "auto", torch.float32, 0.2, 0, True))
    )
    assert x[0] is not None and x[0].x.shape == (n, f)
    columns = _numpy_peak(lambda: tabular.read_table(str(path), None, None, missing="mean", categorical="auto"))
    assert columns > features  # the measure sees a table held as numpy columns
    assert ours < 24 * n + (2 << 20), (ours, features)  # int32 pos, its arange, y; a batch's temporaries
