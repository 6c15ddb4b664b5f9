"""Tabular data: CSV / TSV / JSONL / Parquet with named feature and target columns.

Everything is validated before the first step and every rejection names the file, the line (or
row) and the column: a non-numeric cell, NaN/inf, an empty file, a missing column, a label out
of range. The result is held as tensors (no per-sample Python work in the hot loop).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from gradtune.datasets import EMBEDDED, embedded_path
from gradtune.runtime.errors import GradtuneError


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
    import difflib

    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; columns are: {', '.join(names)}"


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """Header and (line number, row dict) pairs, for any supported format."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
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
    if suffix == ".jsonl":
        rows, cols = [], []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
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
    delimiter = "\t" if suffix in (".tsv", ".tab") else ","
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return [], []
        header = [h.strip() for h in header]
        rows = []
        for record in reader:
            lineno = reader.line_num
            if not record or all(not c.strip() for c in record):
                continue
            if len(record) != len(header):
                raise GradtuneError(f"{path}:{lineno}: expected {len(header)} cells, found {len(record)}")
            rows.append((lineno, dict(zip(header, record))))
    return header, rows


def _number(value: Any, path: Path, lineno: int, col: str) -> float:
    if isinstance(value, bool) or value is None:
        raise GradtuneError(f"{path}:{lineno}: column '{col}': expected a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise GradtuneError(f"{path}:{lineno}: column '{col}': not a number: {value!r}") from None
    if not math.isfinite(v):
        raise GradtuneError(f"{path}:{lineno}: column '{col}': {value!r} is not finite (NaN/inf)")
    return v


def read_table(data: str, target: Optional[str], features: Optional[list[str]], labelled: bool = True) -> Table:
    """Load a file (or an embedded data set's name) into a validated Table. ``labelled=False``
    reads features only (rows to predict): the target column may be absent, and is ignored when
    present (``y_raw`` is then empty)."""
    path = embedded_path(data) if data in EMBEDDED else Path(data)
    if not path.is_file():
        hint = f" (embedded data sets: {', '.join(sorted(EMBEDDED))})" if "/" not in data and "." not in data else ""
        raise GradtuneError(f"data file not found: {data}{hint}")
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
    return torch.tensor([_number(v, path, ln, target) for v, ln in zip(table.y_raw, table.lines)],
                        dtype=torch.float64)


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
        k = num_classes or (max(as_int) + 1)
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
            raise GradtuneError(f"{path}:{ln}: column '{target}': label {key!r} was not seen in training "
                                f"(classes: {', '.join(classes[:10])})")
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
