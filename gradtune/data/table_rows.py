"""Reading a table's rows one by one: CSV / TSV (the csv module), JSONL, Parquet (``to_pylist``).

The reference reader: the columnar one (``table_arrow.py``) hands it every file it cannot vouch
for, so each bad cell, record or header is reported from here, by its line.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from gradtune.data.text import read_utf8, warn
from gradtune.runtime.errors import GradtuneError, InputError
from gradtune.runtime.json_object import parse_object


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
        row = parse_object(line, f"{path}:{lineno}")
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


def check_header(path: Path, header: list[str]) -> None:
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


def read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
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
    check_header(path, header)
    rows = []
    for lineno, record in records[1:]:
        if not record or all(not c.strip() for c in record):
            continue
        if len(record) != len(header):
            raise GradtuneError(f"{path}:{lineno}: expected {len(header)} cells, found {len(record)}")
        rows.append((lineno, dict(zip(header, record))))
    return header, rows
