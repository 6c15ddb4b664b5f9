"""partial_fit over a 2,000,000-row CSV read in chunks (pyarrow): peak memory grows by a few
chunks, not by the data set, and the result equals one in-memory epoch over the same batches.

The file is generated here and deleted at the end. The streaming side runs in a fresh process so
that its peak RSS (ru_maxrss) is its own: measured after imports and a warm-up fit, then after
the stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pytest.importorskip("sklearn")

from pyarrow import csv as pacsv  # noqa: E402

from gradtune.sklearn import GDRegressor  # noqa: E402

ROWS, CHUNK, FEATURES, BATCH = 2_000_000, 50_000, 5, 1000
PARAMS = dict(lr=0.05, momentum=0.9, batch_size=BATCH, shuffle=False, random_state=0)


def _stream_script() -> str:
    return textwrap.dedent(
        """
        import json, resource, sys
        import numpy as np
        import pyarrow as pa
        from pyarrow import csv as pacsv
        from gradtune.sklearn import GDRegressor

        path, chunk, params = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
        GDRegressor(**params).partial_fit(np.ones((chunk, 5)), np.ones(chunk))  # warm-up
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        est, held, rows = GDRegressor(**params), [], 0

        warm = None

        def feed(table):
            global warm
            data = np.column_stack([c.to_numpy() for c in table.columns])
            est.partial_fit(data[:, :-1], data[:, -1])
            if est.n_iter_ == 4:  # the reader's buffers and threads are up: memory from here on
                warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 20))
        for batch in reader:  # ~1 MiB of text per record batch, re-cut into chunk-row pieces
            held.append(batch)
            rows += batch.num_rows
            while rows >= chunk:
                table = pa.Table.from_batches(held)
                feed(table.slice(0, chunk))
                rest = table.slice(chunk)
                held, rows = rest.to_batches(), rest.num_rows
        if rows:
            feed(pa.Table.from_batches(held))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"base_kib": base, "warm_kib": warm, "peak_kib": peak, "calls": est.n_iter_,
                          "coef": est.coef_.tolist(), "intercept": est.intercept_.tolist()}))
        """
    )


def _write(path: str) -> None:
    """ROWS rows of 5 features and y, written CHUNK rows at a time; every chunk's y has the same
    mean (a fresh linear model starts its intercept at the first rows' mean: the streamed run's
    first chunk and the in-memory run's whole set then give the same start)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=FEATURES)
    names = [f"x{i}" for i in range(FEATURES)] + ["y"]
    with pacsv.CSVWriter(path, pa.schema([(n, pa.float64()) for n in names])) as out:
        for _ in range(ROWS // CHUNK):
            x = rng.normal(size=(CHUNK, FEATURES))
            y = x @ w + 0.5 * rng.normal(size=CHUNK)
            y += 3.0 - y.mean()
            out.write_table(pa.table(dict(zip(names, [*x.T, y]))))


@pytest.mark.slow
def test_partial_fit_streams_a_2m_row_csv_in_bounded_memory(tmp_path):
    path = str(tmp_path / "big.csv")
    try:
        _write(path)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(
            [sys.executable, "-c", _stream_script(), path, str(CHUNK), json.dumps(PARAMS)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        got = json.loads(done.stdout.strip().splitlines()[-1])
        grew_mib = (got["peak_kib"] - got["base_kib"]) / 1024
        late_mib = (got["peak_kib"] - got["warm_kib"]) / 1024
        table = pacsv.read_csv(path)
        data = np.column_stack([c.to_numpy() for c in table.columns])
        del table
    finally:
        if os.path.exists(path):
            os.remove(path)
    full_mib = data.nbytes / 2**20  # the data set in memory as float64 (~92 MiB)
    chunk_mib = full_mib * CHUNK / ROWS  # one chunk (~2.3 MiB)
    print(
        f"peak RSS grew {grew_mib:.1f} MiB over the stream (reader threads and buffers included), "
        f"{late_mib:.1f} MiB after its first 4 chunks; one chunk {chunk_mib:.1f} MiB, all rows {full_mib:.0f} MiB"
    )
    assert got["calls"] == ROWS // CHUNK
    # Bounded by the chunk, not the rows: the last 36 chunks (83 MiB of data) add at most a few
    # chunks' worth to the peak reached after the first 4 (the reader's threads and buffers).
    # (The first chunks' growth, ~60-80 MiB, is pyarrow's reader: its pools and threads, which a
    # read without partial_fit reaches too; partial_fit on in-memory chunks adds ~5 MiB.)
    assert late_mib < 4 * chunk_mib + 8, (late_mib, chunk_mib)
    one = GDRegressor(max_iter=1, tol=None, **PARAMS).fit(data[:, :-1], data[:, -1])
    np.testing.assert_allclose(got["coef"], one.coef_, rtol=1e-9, atol=1e-12)
    x, y = data[:, :-1], data[:, -1]
    loss_stream = np.mean((x @ np.array(got["coef"]) + got["intercept"][0] - y) ** 2)
    loss_one = np.mean((one.predict(x) - y) ** 2)
    assert abs(loss_stream - loss_one) <= 1e-6 * loss_one, (loss_stream, loss_one)
