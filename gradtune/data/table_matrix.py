"""A large all-numeric table read straight into training's input matrix.

``tabular.read_table`` holds a table as one float64 array per column and training then builds
its (N, F) input matrix from them: two copies of the table, the first twice the size of the
second when training is float32. Here the rows are counted first (Parquet: its footer; CSV: its
newlines, one cheap pass over the bytes), so the train / validation permutation
(``split.split_indices``) is known before a cell is parsed, and each streamed record batch
(``table_arrow.batches``) is validated and written into its final rows of one preallocated
(N, F) array in the run's dtype. Peak memory: that array, the (N,) target, the (N,) row
permutation and a few batches (Arrow reads ahead). The training statistics (``missing: mean``'s
fill, standardisation's mean and standard deviation) are accumulated in float64 over each
batch's training rows as it streams (the pairwise merge of Chan, Golub and LeVeque, about a
per-column shift: the first batch's mean, so that a column far from zero loses no digits), and
the array is standardised in place, a chunk of rows at a time, with float64 arithmetic.

float32 keeps 24 bits: a column far from zero (timestamps, ids) stored as read would lose its
spread, so when standardising, a float32 column is stored less that shift, and standardising
subtracts only the mean's distance from it.

Only what this reader can vouch for: numeric features (no categorical column), ``missing``
error or mean, every counted row read, every cell finite and in range. Anything else returns
None and training reads the table as before (``tabular.read_table``), so that messages naming
the line, categories and dropped rows are the same whichever reader ran.
"""

from __future__ import annotations

import ctypes
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from gradtune.data import table_arrow
from gradtune.data.split import split_indices
from gradtune.data.tabular import Table
from gradtune.datasets import EMBEDDED, embedded_path

COUNT_CHUNK = 1 << 20  # bytes per read of the newline count
# Bytes of float64 (rows x F) per Parquet batch and per chunk standardised: the temporaries stay
# this size whatever the number of columns.
CHUNK = 2 << 20
# CSV bytes per streamed batch: pyarrow's CSV stream reads blocks ahead, so Arrow's memory is
# a multiple of this (4 MiB blocks: ~150 MiB; 1 MiB: ~40 MiB), at no cost in speed.
BLOCK = 1 << 20
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class Matrix:
    table: Table  # target, feature names, y_raw (N,) in file order; no columns (they are in x)
    x: torch.Tensor  # (N, F) in the run's dtype, rows in (training, validation) order
    train_idx: torch.Tensor  # (N_train,) file rows, as split_indices gives them
    val_idx: torch.Tensor  # (N_val,)
    fill: dict[str, float]  # missing=mean: feature -> training rows' mean of its present cells
    mean: list[float]  # per feature: what was subtracted (0.0 when not standardising)
    std: list[float]  # per feature: what it was divided by (1.0 when not standardising)


def count_rows(path: Path) -> int:
    """A CSV's records below its header: its newlines (a last line without one counts too).
    A blank line or a quoted newline makes this differ from what is read: the reader then
    gives the table back to the column reader."""
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(COUNT_CHUNK):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n") - 1


def _count(path: Path) -> int:
    """Data rows: a Parquet file's footer says; a CSV's newlines are counted."""
    if path.suffix.lower() == ".parquet":
        return table_arrow.pq.ParquetFile(path).metadata.num_rows
    return count_rows(path)


class Moments:
    """Per column: count, mean and sum of squared deviations of the present (non-NaN) cells,
    merged a block at a time in float64."""

    def __init__(self, f: int) -> None:
        self.n, self.mean, self.m2 = np.zeros(f), np.zeros(f), np.zeros(f)

    def add(self, block: np.ndarray, gaps: bool) -> None:
        """``block`` (B, F) float64; ``gaps``: it may hold NaN (missing cells, skipped)."""
        if gaps:
            present = ~np.isnan(block)
            nb = present.sum(0).astype(np.float64)
            mb = np.where(present, block, 0.0).sum(0) / np.maximum(nb, 1.0)
            dev = np.where(present, block - mb, 0.0)
        else:
            nb = np.full(block.shape[1], float(len(block)))
            mb = block.mean(0) if len(block) else np.zeros(block.shape[1])
            dev = block - mb
        m2b = np.einsum("ij,ij->j", dev, dev)
        n = self.n + nb
        w = np.divide(nb, n, out=np.zeros_like(n), where=n > 0)  # nb / n
        delta = mb - self.mean
        self.mean += delta * w
        self.m2 += m2b + delta * delta * self.n * w  # + delta^2 na nb / n
        self.n = n


def _plan(
    path: Path, data: str, target: Optional[str], features: Any, missing: str, categorical: Any
) -> Optional[tuple]:
    """(target, feature names, needed columns, target is numeric, the CSV's ``open_csv`` options)
    when every feature is a number."""
    planned = table_arrow.plan(path, data, target, features, True, categorical)
    if planned is None or planned[2]:  # categorical columns listed: the column reader encodes them
        return None
    t, names, _, needed = planned
    pa = table_arrow.pa
    options = None
    if path.suffix.lower() == ".parquet":
        types = {f.name: f.type for f in table_arrow.pq.read_schema(path)}
    else:
        options = table_arrow.csv_options(path, needed, [], missing, BLOCK)
        if options is None:
            return None
        types = options["convert_options"].column_types  # fixed from the first block
    number = {c for c in needed if pa.types.is_floating(types[c]) or pa.types.is_integer(types[c])}
    if any(c not in number for c in names) or (t not in number and not pa.types.is_string(types[t])):
        return None
    return t, names, needed, t in number, options


def _numbers(col: Any, missing: str) -> Optional[np.ndarray]:
    """(B,) float64 of an Arrow numeric column (NaN where missing), None if not clean."""
    return table_arrow._numeric(table_arrow._numbers(col), missing)


def read(
    data: str,
    target: Optional[str],
    features: Optional[list[str]],
    missing: str,
    categorical: Any,
    dtype: torch.dtype,
    val_fraction: float,
    seed: int,
    standardize: bool,
) -> Optional[Matrix]:
    """Training's table as a Matrix, or None: ``tabular.read_table`` reads it."""
    path = embedded_path(data) if data in EMBEDDED else Path(data)
    if missing not in ("error", "mean") or not path.is_file():
        return None
    try:
        planned = _plan(path, data, target, features, missing, categorical)
        n = 0 if planned is None else _count(path)
    except Exception:  # pyarrow's errors on a malformed file: the column reader's business
        return None
    if planned is None or n < 2:
        return None
    t, names = planned[:2]
    train_idx, val_idx = split_indices(n, val_fraction, seed)
    try:
        got = _stream(path, train_idx, val_idx, planned, missing, dtype, standardize)
    except Exception:  # a parse or conversion error further down: the row reader names the line
        return None
    if got is None:
        return None
    x, y, moments, shift = got
    if missing == "mean" and (moments.n == 0).any():
        return None  # a column with no value in the training rows: the column reader says which
    centre = shift + moments.mean  # (F,) the training rows' mean of each column's present cells
    mean = centre if standardize else np.zeros(len(names))
    std = np.sqrt(moments.m2 / len(train_idx)) if standardize else np.ones(len(names))
    std = np.where(std > 0, std, 1.0)  # a constant column stays as it is
    fill = dict(zip(names, centre.tolist())) if missing == "mean" else {}
    # float32 columns were stored less the shift: x - mean is then x - moments.mean, no far-off digits
    offset = -moments.mean if dtype == torch.float32 and standardize else -mean
    _standardize(x.numpy(), offset, std, (centre - mean) / std if fill else None)
    table = Table(str(path), t, names, {}, [], y)
    return Matrix(table, x, train_idx, val_idx, fill, mean.tolist(), std.tolist())


def _stream(
    path: Path, train: torch.Tensor, val: torch.Tensor, planned: tuple, missing: str, dtype: Any, standardize: bool
) -> Optional[tuple[torch.Tensor, Any, Moments, np.ndarray]]:
    """(x (N, F) as stored, y_raw, the training rows' moments, the shift subtracted from each
    stored column), or None if a batch is not clean or the rows are not the counted ones."""
    t, names, needed, numeric_target, options = planned
    _give_back()  # what sniffing the CSV's types took
    n_train, n = len(train), len(train) + len(val)
    index = np.int32 if n < 2**31 else np.int64
    pos = np.empty(n, dtype=index)  # the row of x that file row i goes to: training rows first
    pos[train.numpy()] = np.arange(n_train, dtype=index)
    pos[val.numpy()] = np.arange(n_train, n, dtype=index)
    x = torch.empty(n, len(names), dtype=dtype)
    y = np.empty(n) if numeric_target else None
    if options is None:
        stream = table_arrow.batches(path, needed, [], missing, rows=_rows(len(needed)))
    else:
        stream = table_arrow.pacsv.open_csv(path, **options)
    with closing(stream):
        got = _fill(stream, x.numpy(), y, pos, n_train, planned, missing, dtype == torch.float32 and standardize)
    del pos, stream
    _give_back()
    if got is None:
        return None
    moments, shift, done, labels = got
    if done != n:
        return None
    if not numeric_target:
        y = table_arrow._labels(table_arrow.pa.chunked_array(labels, type=table_arrow.pa.string()))
        if y is None:
            return None
    return x, y, moments, shift


def _fill(
    stream: Any,
    xn: np.ndarray,
    y: Optional[np.ndarray],
    pos: np.ndarray,
    n_train: int,
    planned: tuple,
    missing: str,
    narrow: bool,
) -> Optional[tuple[Moments, np.ndarray, int, list[Any]]]:
    """Each batch's features into their rows ``pos`` of ``xn`` (less the shift when ``narrow``),
    its numeric target into ``y`` (file order) or its labels kept: (the training rows' moments
    about the shift, the shift, rows read, labels), or None at the first batch that is not clean."""
    t, names, _, numeric_target, _ = planned
    n = len(pos)
    labels: list[Any] = []
    moments, shift, done = Moments(len(names)), None, 0
    gaps = missing != "error"
    for batch in stream:
        b = batch.num_rows
        if done + b > n:
            return None
        block = np.empty((b, len(names)))  # (B, F) float64, the batch's features
        for j, name in enumerate(names):
            col = _numbers(batch.column(name), missing)
            if col is None:
                return None
            block[:, j] = col
        if gaps and np.isnan(block).all(1).any():
            return None  # a record of blank cells: the row reader skips it, pyarrow keeps it
        if numeric_target:
            col = _numbers(batch.column(t), "error")
            if col is None:
                return None
            y[done : done + b] = col
        else:
            labels.append(batch.column(t))
        rows = pos[done : done + b]
        if shift is None:  # the first batch's mean: moments about it lose no digits to a far-off mean
            shift = np.nansum(block, 0) / np.maximum((~np.isnan(block)).sum(0), 1)
        centred = block - shift
        moments.add(centred[rows < n_train], gaps)
        if narrow:
            if np.nanmax(np.abs(centred), initial=0.0) > FLOAT32_MAX:
                return None  # beyond float32 even shifted: the column reader standardises first
            block = centred
        xn[rows] = block
        done += b
    return moments, shift if shift is not None else np.zeros(len(names)), done, labels


def _rows(f: int) -> int:
    """Rows of an (rows, F) float64 temporary of CHUNK bytes."""
    return max(64, CHUNK // (8 * max(f, 1)))


def _give_back() -> None:
    """Return the memory the stream freed to the system before training allocates more: Arrow's
    pool keeps freed blocks for reuse, and glibc's heap keeps the batches' temporaries."""
    table_arrow.pa.default_memory_pool().release_unused()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def _standardize(x: np.ndarray, offset: np.ndarray, std: np.ndarray, filled: Optional[np.ndarray]) -> None:
    """In place, a chunk of rows at a time: x <- (x + offset) / std in float64, missing cells
    (NaN) <- ``filled`` (F,)."""
    if not offset.any() and not (std != 1.0).any() and filled is None:
        return
    step = _rows(x.shape[1])
    for i in range(0, len(x), step):
        blk = x[i : i + step].astype(np.float64)
        if offset.any():
            blk += offset
        blk /= std
        if filled is not None:
            gap = np.isnan(blk)
            if gap.any():
                blk[gap] = np.broadcast_to(filled, blk.shape)[gap]
        x[i : i + step] = blk
