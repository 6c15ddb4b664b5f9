"""Tabular data: CSV / TSV / JSONL / Parquet with named feature and target columns.

Everything is validated before the first step and every rejection names the file, the line (or
row) and the column: a non-numeric cell, NaN/inf, a number too large to square, bytes that are
not UTF-8, an empty file, a missing column, a label out of range. What is legal but most likely
a mistake (the target among the features, a repeated or empty column name, one row, one class)
is a ``gradtune: warning:`` line and the run goes on. The result is held as tensors (no
per-sample Python work in the hot loop).
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from gradtune.data.text import need_file, read_utf8, warn
from gradtune.datasets import EMBEDDED, embedded_path
from gradtune.runtime.errors import GradtuneError, InputError

# The largest |value| a numeric cell may hold. Standardisation and the squared losses square
# values (and sum the squares over rows): past sqrt(float64 max) ~ 1.3e154 those overflow to inf,
# and a least-squares solve on the resulting NaN trips an internal assert in torch. 1e150 leaves
# room for sums of squared deviations over millions of rows. No real measurement comes close.
MAX_ABS = 1e150
# Integer labels are class ids, so the largest one sets the number of model outputs (and of class
# names kept with the run). An id past this is a measurement or a row id picked as the target, not
# a class; a million outputs per feature is already more than any table classifier needs.
MAX_CLASS_ID = 1_000_000


@dataclass
class Table:
    """A parsed table: numeric features (N, F) float64 and the raw target column."""

    path: str
    target: str
    feature_names: list[str]
    x: torch.Tensor  # (N, F) float64
    y_raw: list[Any]  # target cells as read (numbers or label strings); [] when read unlabelled
    lines: list[int] = field(default_factory=list)  # source line (or row) of each sample, for errors


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; columns are: {', '.join(names)}"


def _read_parquet(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise GradtuneError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises many types for corrupt files
        raise GradtuneError(f"{path}: not a readable Parquet file ({type(e).__name__})") from None
    cols = table.column_names
    rows = table.to_pylist()
    return cols, [(i + 1, r) for i, r in enumerate(rows)]  # "line" = 1-based row for Parquet


def _read_jsonl(path: Path, text: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    rows, cols = [], []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GradtuneError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise GradtuneError(f"{path}:{lineno}: expected a JSON object per line")
        cols = cols or list(row)
        rows.append((lineno, row))
    return cols, rows


def csv_records(path: Path, text: str, delimiter: str) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every record of a delimited text, the header included. The
    field size limit (128 KiB by default, a process-wide setting of the csv module) is raised to
    the text's length: the whole file is in memory already, so a long cell costs nothing more,
    and a stray quote that runs to the end of the file is still reported by its line."""
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    records = []
    try:
        for record in reader:
            records.append((reader.line_num, record))
    except csv.Error as e:
        raise InputError(f"{path}:{reader.line_num}: not readable as CSV ({e})") from None
    return records


def _check_header(path: Path, header: list[str]) -> None:
    """Warn about names that make a column unreachable or ambiguous (the last of two wins)."""
    empty = [i + 1 for i, h in enumerate(header) if not h]
    if empty:
        warn(f"{path}: column {', '.join(map(str, empty))} of the header has no name")
    twice = sorted({h for h in header if h and header.count(h) > 1})
    if twice:
        warn(
            f"{path}: column name {', '.join(map(repr, twice))} appears more than once; "
            f"the last column of that name is used"
        )


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """Header and (line number, row dict) pairs, for any supported format."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    text = read_utf8(path)
    if suffix == ".jsonl":
        return _read_jsonl(path, text)
    records = csv_records(path, text, "\t" if suffix in (".tsv", ".tab") else ",")
    if not records:
        return [], []
    header = [h.strip() for h in records[0][1]]
    _check_header(path, header)
    rows = []
    for lineno, record in records[1:]:
        if not record or all(not c.strip() for c in record):
            continue
        if len(record) != len(header):
            raise GradtuneError(f"{path}:{lineno}: expected {len(header)} cells, found {len(record)}")
        rows.append((lineno, dict(zip(header, record))))
    return header, rows


def _cell(value: Any) -> str:
    """A cell for a message: its repr, cut to 40 characters (a bad cell may be megabytes long)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: Any, path: Path, lineno: int, col: str) -> float:
    if isinstance(value, bool) or value is None:
        raise GradtuneError(f"{path}:{lineno}: column '{col}': expected a number, got {_cell(value)}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise GradtuneError(f"{path}:{lineno}: column '{col}': not a number: {_cell(value)}") from None
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


def read_table(data: str, target: Optional[str], features: Optional[list[str]], labelled: bool = True) -> Table:
    """Load a file (or an embedded data set's name) into a validated Table. ``labelled=False``
    reads features only (rows to predict): the target column may be absent, and is ignored when
    present (``y_raw`` is then empty)."""
    path = embedded_path(data) if data in EMBEDDED else Path(data)
    hint = f" (embedded data sets: {', '.join(sorted(EMBEDDED))})" if "/" not in data and "." not in data else ""
    need_file(path, "data file", hint)
    if path.suffix.lower() not in (".csv", ".tsv", ".tab", ".jsonl", ".parquet", ".txt"):
        raise GradtuneError(f"{path}: unsupported data format '{path.suffix}' (csv, tsv, jsonl, parquet)")
    cols, rows = _read_rows(path)
    if not rows:
        raise GradtuneError(f"{path}: no data rows")
    target = target or (EMBEDDED[data]["target"] if data in EMBEDDED else cols[-1])
    if labelled and target not in cols:
        raise GradtuneError(f"{path}: target column '{target}' not found{_suggest(target, cols)}")
    names = features or [c for c in cols if c != target]
    for name in names:
        if name not in cols:
            raise GradtuneError(f"{path}: feature column '{name}' not found{_suggest(name, cols)}")
    if not names:
        raise GradtuneError(f"{path}: no feature columns besides the target '{target}'")
    needed = names + [target] if labelled else names
    values = []
    for lineno, row in rows:
        for col in needed:
            if col not in row:
                raise GradtuneError(f"{path}:{lineno}: column '{col}' missing")
        values.append([_number(row[c], path, lineno, c) for c in names])
    y_raw = [row[target] for _, row in rows] if labelled else []
    return Table(str(path), target, names, torch.tensor(values, dtype=torch.float64), y_raw, [ln for ln, _ in rows])


def regression_targets(table: Table, target: str) -> torch.Tensor:
    """(N,) float64; rejects non-numeric and non-finite cells with their line."""
    path = Path(table.path)
    return torch.tensor([_number(v, path, ln, target) for v, ln in zip(table.y_raw, table.lines)], dtype=torch.float64)


def class_targets(table: Table, target: str, num_classes: Optional[int]) -> tuple[torch.Tensor, list[str]]:
    """(N,) long class ids and the class names. Integer labels are used as ids (checked against
    ``num_classes``); any other labels are names, numbered in sorted order."""
    path = Path(table.path)
    cells = [str(v).strip() if not isinstance(v, (int, float)) or isinstance(v, bool) else v for v in table.y_raw]
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
        for i, ln in zip(as_int, table.lines):
            if not 0 <= i < k:
                raise GradtuneError(f"{path}:{ln}: column '{target}': label {i} out of range [0, {k})")
        return torch.tensor(as_int, dtype=torch.long), [str(i) for i in range(k)]
    for v, ln in zip(cells, table.lines):
        if v == "" or v is None:
            raise GradtuneError(f"{path}:{ln}: column '{target}': empty label")
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
    for v in y_raw:
        try:
            float(v)
        except (TypeError, ValueError):
            return True
    return False
