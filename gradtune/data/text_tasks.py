"""Text classification and regression from CSV / TSV / JSONL files, for encoder + head models.

Each row has a text column and a label column (names configurable; ``columns`` names the
columns of a file without a header, e.g. the SMS spam TSV ``label\ttext``). Texts are tokenised
once up front, truncated to ``max_length``; batches are padded per batch (``SequenceDataset``).
Classification labels may be names or integer ids; the label -> id map is built from the
training data, saved next to the run, and evaluation data must use only labels seen in training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from gradtune.data.sequences import IGNORE, SequenceDataset, pad_id
from gradtune.data.table_rows import csv_records
from gradtune.data.text import path_kind, read_utf8, warn
from gradtune.runtime.errors import InputError
from gradtune.runtime.json_object import parse_object

Task = Literal["classification", "regression"]
Row = tuple[int, dict[str, Any]]  # (line number in the file, column -> value)


class DataError(InputError):
    """A data file is not what the task needs; the message names the file and line."""


def data_file(path: str | Path) -> Path:
    """``path`` if it is a regular file; else a DataError saying what is there instead."""
    path = Path(path)
    kind = path_kind(path)
    if kind is not None:
        raise DataError(
            f"data file {str(path)!r} " + ("does not exist" if kind == "missing" else f"is {kind}, not a regular file")
        )
    return path


def read_rows(path: str | Path, columns: list[str] | None = None, optional: str | None = None) -> list[Row]:
    """Rows of a .jsonl (one object a line) or delimited text file (tab if .tsv or the first
    line has a tab, else comma); the first line is the header unless ``columns`` is given.
    ``optional``: a column of ``columns`` that a header-less file may leave out (the label of
    rows to predict); each row then has all of ``columns`` or all but that one."""
    path = data_file(path)
    text = read_utf8(path)
    if path.suffix == ".jsonl":
        return _jsonl_rows(path, text)
    first = text.split("\n", 1)[0]
    delimiter = "\t" if path.suffix == ".tsv" or "\t" in first else ","
    records = csv_records(path, text, delimiter)
    header = columns or []
    if not columns:
        header, records = (records[0][1], records[1:]) if records else ([], [])
    records = [(n, values) for n, values in records if values]
    if columns and optional in columns:
        return [(n, _match(columns, optional, values, f"{path}:{n}")) for n, values in records]
    return [(n, dict(zip(header, values))) for n, values in records]


def _jsonl_rows(path: Path, text: str) -> list[Row]:
    rows = []
    for line_no, line in enumerate(text.split("\n"), 1):
        if line.strip():
            rows.append((line_no, parse_object(line, f"{path}:{line_no}", DataError)))
    return rows


def _match(columns: list[str], optional: str, values: list[str], where: str) -> dict[str, str]:
    """A header-less row by its cell count: all ``columns``, or all but ``optional``."""
    if len(values) == len(columns):
        return dict(zip(columns, values))
    rest = [c for c in columns if c != optional]
    if len(values) == len(rest):
        return dict(zip(rest, values))
    raise DataError(
        f"{where}: expected {len(columns)} cells ({', '.join(columns)}) or {len(rest)} "
        f"({', '.join(rest)}), found {len(values)}"
    )


@dataclass
class LabelMap:
    """Class names in id order; integer labels 0..K-1 map to themselves."""

    names: list[str]

    @classmethod
    def from_labels(cls, labels: list[str]) -> LabelMap:
        unique = sorted(set(labels))
        if all(s.isdigit() for s in unique):  # ids given: keep them (0..max, gaps allowed)
            return cls([str(i) for i in range(max(int(s) for s in unique) + 1)])
        return cls(unique)

    def ids(self, labels: list[str], where: list[str]) -> torch.Tensor:
        index = {n: i for i, n in enumerate(self.names)}
        for label, loc in zip(labels, where):
            if label not in index:
                raise DataError(
                    f"{loc}: label {label!r} was not seen in training (known: {', '.join(self.names[:10])})"
                )
        return torch.tensor([index[s] for s in labels], dtype=torch.long)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"labels": self.names}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        return cls(json.loads(Path(path).read_text())["labels"])


def _column(rows: list[Row], path: Path, name: str) -> list[str]:
    """The column's values as stripped strings; missing column or empty value -> DataError."""
    if rows and all(name not in r for _, r in rows):
        raise DataError(f"{path}: no column {name!r} (columns: {', '.join(map(str, rows[0][1]))})")
    values = []
    for line_no, row in rows:
        value = row.get(name)
        if value is None or str(value).strip() == "":
            raise DataError(f"{path}:{line_no}: column {name!r} is empty")
        values.append(str(value).strip())
    return values


def load_text_task(
    path: str | Path,
    tokenizer: Any,
    task: Task = "classification",
    text_column: str = "text",
    label_column: str = "label",
    columns: list[str] | None = None,
    max_length: int = 128,
    label_map: LabelMap | None = None,
    labelled: bool = True,
) -> tuple[SequenceDataset, LabelMap | None]:
    """The file as a dataset, and the label map (built here unless given: pass the training
    one when loading evaluation data). Regression labels are floats; no label map.
    ``labelled=False`` reads texts only (rows to predict): the label column may be absent and is
    ignored when present; the dataset's labels are placeholders (IGNORE), never to be read."""
    path = Path(path)
    rows = read_rows(path, columns, None if labelled else label_column)
    if not rows:
        raise DataError(f"{path}: no data rows")
    texts = _column(rows, path, text_column)
    if labelled:
        y, label_map = _labels(rows, path, task, label_column, label_map)
    else:
        y = torch.full((len(texts),), IGNORE, dtype=torch.long)
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return SequenceDataset(ids, y, pad_id(tokenizer)), label_map


def _labels(
    rows: list[Row], path: Path, task: Task, label_column: str, label_map: LabelMap | None
) -> tuple[torch.Tensor, LabelMap | None]:
    """(N,) class ids (by ``label_map``, built here unless given) or float regression targets."""
    labels = _column(rows, path, label_column)
    where = [f"{path}:{line_no}" for line_no, _ in rows]
    if task == "classification":
        if label_map is None:  # training data (evaluation data reuses training's map)
            label_map = LabelMap.from_labels(labels)
            if len(label_map.names) < 2:  # a one-output head gets no gradient: the audit would stop it
                raise DataError(
                    f"{path}: column {label_column!r} holds a single class ({labels[0]!r}); "
                    f"a classifier needs at least two"
                )
            if len(set(labels)) == 1:
                warn(
                    f"{path}: column {label_column!r} holds a single class ({labels[0]!r}): "
                    f"there is nothing to tell apart"
                )
        return label_map.ids(labels, where), label_map
    if task == "regression":
        try:
            return torch.tensor([float(s) for s in labels], dtype=torch.float32), label_map
        except ValueError:
            bad = next(i for i, s in enumerate(labels) if not _is_float(s))
            raise DataError(f"{where[bad]}: regression label {labels[bad]!r} is not a number") from None
    raise InputError(f"task must be 'classification' or 'regression', got {task!r}")


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
