"""Tabular data: CSV / TSV / JSONL / Parquet with named feature and target columns.

Everything is validated before the first step and every rejection names the file, the line (or
row) and the column: a non-numeric cell, NaN/inf, a number too large to square, bytes that are
not UTF-8, an empty file, a missing column, a label out of range. What is legal but most likely
a mistake (the target among the features, a repeated or empty column name, one row, one class)
is a ``gradtune: warning:`` line and the run goes on. The result is held as tensors (no
per-sample Python work in the hot loop).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch

from gradtune.data import table_arrow
from gradtune.data.cells import MAX_ABS, is_missing, is_number
from gradtune.data.table_rows import read_rows
from gradtune.data.text import need_file, warn
from gradtune.datasets import EMBEDDED, embedded_path
from gradtune.runtime.errors import GradtuneError

# Integer labels are class ids, so the largest one sets the number of model outputs (and of class
# names kept with the run). An id past this is a measurement or a row id picked as the target, not
# a class; a million outputs per feature is already more than any table classifier needs.
MAX_CLASS_ID = 1_000_000


MISSING_HINT = " (a missing value: train with missing=mean or missing=drop; predict fills them for mean runs only)"
MissingPolicy = Literal["error", "drop", "mean"]


@dataclass
class Table:
    """A parsed table: one array per feature column and the raw target column.

    A numeric column is (N,) float64 (NaN where a cell is missing, only when ``missing`` allows
    it); a categorical one is (N,) object holding stripped strings (None where missing).
    """

    path: str
    target: str
    feature_names: list[str]
    columns: dict[str, np.ndarray]
    categorical: list[str]  # the feature columns held as categories, in feature order
    y_raw: Any  # target cells as read: a list, or an (N,) array from the columnar reader; [] when unlabelled
    line_of_row: Optional[np.ndarray] = None  # source line (or row) of each sample; None: found when needed
    kept: Optional[np.ndarray] = None  # missing=drop: the file's data rows (0-based) that were kept

    @property
    def n_rows(self) -> int:
        # training's matrix reader (table_matrix.py) keeps the features in its matrix, not here
        return len(next(iter(self.columns.values()))) if self.columns else len(self.y_raw)

    @property
    def lines(self) -> np.ndarray:
        """Source line of each sample, for messages; the columnar reader leaves it to here (the
        CSV's records are scanned again, only when a message needs a line)."""
        if self.line_of_row is None:
            path = Path(self.path)
            if path.suffix.lower() == ".parquet":
                lines = np.arange(1, self.n_rows + 1 if self.kept is None else int(self.kept.max()) + 2)
            else:
                lines = np.array([ln for ln, _ in read_rows(path)[1]])
            self.line_of_row = lines if self.kept is None else lines[self.kept]
        return self.line_of_row

    @property
    def x(self) -> torch.Tensor:
        """(N, F) float64 of an all-numeric table (no categories; NaN where missing)."""
        if self.categorical:
            raise GradtuneError(f"{self.path}: categorical columns need an encoding (data/encoding.py)")
        return torch.from_numpy(np.stack([self.columns[c] for c in self.feature_names], axis=1))


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; columns are: {', '.join(names)}"


def _cell(value: Any) -> str:
    """A cell for a message: its repr, cut to 40 characters (a bad cell may be megabytes long)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: Any, path: Path, lineno: int, col: str) -> float:
    if isinstance(value, bool) or value is None:
        hint = MISSING_HINT if value is None else ""
        raise GradtuneError(f"{path}:{lineno}: column '{col}': expected a number, got {_cell(value)}{hint}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        hint = MISSING_HINT if isinstance(value, str) and not value.strip() else ""
        raise GradtuneError(f"{path}:{lineno}: column '{col}': not a number: {_cell(value)}{hint}") from None
    except OverflowError:  # a JSON integer with hundreds of digits
        raise GradtuneError(f"{path}:{lineno}: column '{col}': {_cell(value)} is too large for a float64") from None
    if not math.isfinite(v):
        raise GradtuneError(f"{path}:{lineno}: column '{col}': {_cell(value)} is not finite (NaN/inf)")
    if abs(v) > MAX_ABS:
        raise GradtuneError(
            f"{path}:{lineno}: column '{col}': {_cell(value)} is too large (|value| > {MAX_ABS:g}: "
            f"squares and their sums overflow float64); rescale the column"
        )
    return v


def _categorical(names: list[str], cells: dict[str, list[Any]], categorical: Any) -> list[str]:
    """The feature columns held as categories: the listed ones, or (auto) every column with at
    least one value where no value is a number (a column of numbers with one typo stays numeric
    and its bad cell is reported)."""
    if categorical == "none":
        return []
    if categorical != "auto":
        return [c for c in names if c in categorical]
    found = []
    for name in names:
        present = [v for v in cells[name] if not is_missing(v)]
        if present and not any(is_number(v) for v in present):
            found.append(name)
    return found


def _convert(
    path: Path, rows: list[tuple[int, dict[str, Any]]], names: list[str], cats: list[str], missing: str
) -> dict[str, np.ndarray]:
    """Each feature column as an array, row by row so that the first bad row is the one named."""
    out: dict[str, list[Any]] = {c: [] for c in names}
    for lineno, row in rows:
        for col in names:
            v = row[col]
            if col in cats:
                if is_missing(v):
                    if missing == "error":
                        raise GradtuneError(f"{path}:{lineno}: column '{col}': missing value{MISSING_HINT}")
                    v = None
                else:
                    v = str(v).strip()
            elif missing != "error" and is_missing(v):
                v = math.nan
            else:
                v = _number(v, path, lineno, col)
            out[col].append(v)
    return {c: np.array(out[c], dtype=object if c in cats else np.float64) for c in names}


def _needed(
    path: Path, cols: list[str], data: str, target: Optional[str], features: Optional[list[str]], labelled: bool
) -> tuple[str, list[str]]:
    """(target, feature names), each checked against the header ``cols``."""
    target = target or (EMBEDDED[data]["target"] if data in EMBEDDED else cols[-1])
    if labelled and target not in cols:
        raise GradtuneError(f"{path}: target column '{target}' not found{_suggest(target, cols)}")
    names = list(dict.fromkeys(features or [c for c in cols if c != target]))  # a repeated name: one input
    for name in names:
        if name not in cols:
            raise GradtuneError(f"{path}: feature column '{name}' not found{_suggest(name, cols)}")
    if not names:
        raise GradtuneError(f"{path}: no feature columns besides the target '{target}'")
    return target, names


def _drop_missing(table: Table, labelled: bool) -> Table:
    """missing=drop: rows with any missing feature (or target) cell go, said in one line."""
    bad = np.zeros(table.n_rows, dtype=bool)
    for name, col in table.columns.items():
        bad |= np.array([v is None for v in col]) if col.dtype == object else np.isnan(col)
    if labelled:
        y = table.y_raw
        bad |= np.isnan(y) if _numeric(y) else np.array([is_missing(v) for v in y], dtype=bool)
    if not bad.any():
        return table
    keep = np.flatnonzero(~bad)
    if not len(keep):
        raise GradtuneError(f"{table.path}: every row has a missing value (missing=drop leaves no rows)")
    first = int(table.lines[int(np.flatnonzero(bad)[0])])
    warn(f"{table.path}: {int(bad.sum())} rows with a missing value dropped (missing=drop; the first is line {first})")
    table.columns = {k: v[keep] for k, v in table.columns.items()}
    y = table.y_raw
    table.y_raw = (y[keep] if isinstance(y, np.ndarray) else [y[i] for i in keep]) if labelled else []
    table.line_of_row = table.lines[keep]
    table.kept = keep if table.kept is None else table.kept[keep]
    return table


def _check_listed(path: Any, names: list[str], categorical: Any) -> None:
    """A column listed in ``categorical`` must be one of the features."""
    if isinstance(categorical, list):
        for name in categorical:
            if name not in names:
                raise GradtuneError(
                    f"{path}: categorical column '{name}' is not a feature column{_suggest(name, names)}"
                )


def read_table(
    data: str,
    target: Optional[str],
    features: Optional[list[str]],
    labelled: bool = True,
    missing: MissingPolicy = "error",
    categorical: Any = "none",
) -> Table:
    """Load a file (or an embedded data set's name) into a validated Table. ``labelled=False``
    reads features only (rows to predict): the target column may be absent, and is ignored when
    present (``y_raw`` is then empty). ``missing``: what a missing cell does (error, drop its
    row, or NaN for a later mean fill); ``categorical``: none | auto | list of columns kept as
    strings for one-hot encoding. Large CSV and Parquet files are read by columns
    (``table_arrow.read``); anything that reader cannot vouch for is read here, row by row, so
    a bad cell's message is the same either way."""
    path = embedded_path(data) if data in EMBEDDED else Path(data)
    hint = f" (embedded data sets: {', '.join(sorted(EMBEDDED))})" if "/" not in data and "." not in data else ""
    need_file(path, "data file", hint)
    if path.suffix.lower() not in (".csv", ".tsv", ".tab", ".jsonl", ".parquet", ".txt"):
        raise GradtuneError(f"{path}: unsupported data format '{path.suffix}' (csv, tsv, jsonl, parquet)")
    fast = table_arrow.read(path, data, target, features, labelled, missing, categorical)
    if fast is not None:
        table = Table(str(path), *fast)
        _check_listed(path, table.feature_names, categorical)
        return _drop_missing(table, labelled) if missing == "drop" else table
    cols, rows = read_rows(path)
    if not rows:
        raise GradtuneError(f"{path}: no data rows")
    target, names = _needed(path, cols, data, target, features, labelled)
    _check_listed(path, names, categorical)
    needed = names + [target] if labelled else names
    for lineno, row in rows:
        for col in needed:
            if col not in row:
                raise GradtuneError(f"{path}:{lineno}: column '{col}' missing")
    cats = _categorical(names, {c: [r[c] for _, r in rows] for c in names}, categorical)
    columns = _convert(path, rows, names, cats, missing)
    y_raw = [row[target] for _, row in rows] if labelled else []
    table = Table(str(path), target, names, columns, cats, y_raw, np.array([ln for ln, _ in rows]))
    return _drop_missing(table, labelled) if missing == "drop" else table


def _numeric(y_raw: Any) -> bool:
    """A float array from the columnar reader (already free of missing cells)."""
    return isinstance(y_raw, np.ndarray) and y_raw.dtype.kind == "f"


def regression_targets(table: Table, target: str) -> torch.Tensor:
    """(N,) float64; rejects non-numeric and non-finite cells with their line."""
    path = Path(table.path)
    if _numeric(table.y_raw):
        cells = np.asarray(table.y_raw, dtype=np.float64)  # no copy: callers make new tensors from y
        y = torch.from_numpy(cells if cells.flags.writeable else cells.copy())
        bad = (~torch.isfinite(y) | (y.abs() > MAX_ABS)).nonzero()
        if len(bad):
            i = int(bad[0])
            _number(float(table.y_raw[i]), path, int(table.lines[i]), target)
        return y
    return torch.tensor([_number(v, path, ln, target) for v, ln in zip(table.y_raw, table.lines)], dtype=torch.float64)


def _integer_ids(table: Table, target: str, num_classes: Optional[int]) -> Optional[tuple[torch.Tensor, list[str]]]:
    """Vectorised class ids of a float array of whole numbers; None for anything else."""
    y = table.y_raw
    if not _numeric(y) or not (np.isfinite(y).all() and (y == np.floor(y)).all()):
        return None
    ids = torch.from_numpy(y.astype(np.int64))
    top = int(ids.max())
    k = num_classes or (top + 1)
    bad = ((ids < 0) | (ids >= k)).nonzero() if top <= MAX_CLASS_ID else (ids == top).nonzero()
    if len(bad):
        return None  # the row-by-row path below names the line and the reason
    return ids, [str(i) for i in range(k)]


def class_targets(table: Table, target: str, num_classes: Optional[int]) -> tuple[torch.Tensor, list[str]]:
    """(N,) long class ids and the class names. Integer labels are used as ids (checked against
    ``num_classes``); any other labels are names, numbered in sorted order."""
    fast = _integer_ids(table, target, num_classes)
    if fast is not None:
        return fast
    path = Path(table.path)
    y_raw = table.y_raw.tolist() if isinstance(table.y_raw, np.ndarray) else table.y_raw
    cells = [str(v).strip() if not isinstance(v, (int, float)) or isinstance(v, bool) else v for v in y_raw]
    as_int = []
    for v in cells:
        try:
            f = float(v)
            as_int.append(int(f) if f == int(f) else None)
        except (TypeError, ValueError, OverflowError):
            as_int.append(None)
    if all(i is not None for i in as_int):
        top = max(as_int)
        if top > MAX_CLASS_ID:  # the model would need top + 1 outputs
            ln = table.lines[as_int.index(top)]
            raise GradtuneError(
                f"{path}:{ln}: column '{target}': label {_cell(cells[as_int.index(top)])} is too "
                f"large for a class id (integer labels are ids 0..K-1, at most {MAX_CLASS_ID:,}); "
                f"number the classes 0..K-1 or name them"
            )
        k = num_classes or (top + 1)
        for row, i in enumerate(as_int):
            if not 0 <= i < k:
                raise GradtuneError(f"{path}:{table.lines[row]}: column '{target}': label {i} out of range [0, {k})")
        return torch.tensor(as_int, dtype=torch.long), [str(i) for i in range(k)]
    empty = [i for i, v in enumerate(cells) if v == "" or v is None]
    if empty:
        raise GradtuneError(f"{path}:{table.lines[empty[0]]}: column '{target}': empty label")
    names = sorted({str(v) for v in cells})
    if num_classes is not None and len(names) > num_classes:
        raise GradtuneError(f"{path}: column '{target}' has {len(names)} labels, more than num_classes={num_classes}")
    ids = {n: i for i, n in enumerate(names)}
    return torch.tensor([ids[str(v)] for v in cells], dtype=torch.long), names


def known_class_ids(table: Table, target: str, classes: list[str]) -> torch.Tensor:
    """(N,) long ids of the labels in ``target`` by the training run's class names; a label
    training never saw is an error naming its line. Integer labels match by value ('1.0' is 1)."""
    path = Path(table.path)
    index = {name: i for i, name in enumerate(classes)}
    ids = []
    for v, ln in zip(table.y_raw, table.lines):
        key = str(v).strip()
        try:
            f = float(key)
            if f == int(f) and str(int(f)) in index:
                key = str(int(f))
        except (ValueError, OverflowError):
            pass
        if key not in index:
            raise GradtuneError(
                f"{path}:{ln}: column '{target}': label {key!r} was not seen in training "
                f"(classes: {', '.join(classes[:10])})"
            )
        ids.append(index[key])
    return torch.tensor(ids, dtype=torch.long)


def looks_categorical(y_raw: list[Any]) -> bool:
    """Auto task: any non-numeric label means classification."""
    if _numeric(y_raw):
        return False
    for v in y_raw:
        try:
            float(v)
        except (TypeError, ValueError):
            return True
    return False
