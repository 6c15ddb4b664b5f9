"""Reading a large CSV / TSV or a Parquet file by columns with pyarrow (the ``data`` extra).

``pyarrow.csv.open_csv`` streams a CSV block by block into typed columns (Parquet: column by
column); each column becomes one numpy array with no Python object per cell. This reader only
*accepts* a file it can vouch for: every needed column numeric and finite, within
``cells.MAX_ABS``, no missing cell unless ``missing`` allows it, categories that are plain
strings, a header with unique, unpadded names. Anything else (a text cell in a numeric column,
NaN, a ragged or unreadable record, a bad byte...) returns None and ``tabular.read_table``
reads the file row by row, so the user gets the same message, naming the line, whichever
reader ran. Small files go to the row reader too: parsing them costs nothing either way.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from gradtune.data.cells import MAX_ABS, MISSING, is_number
from gradtune.datasets import EMBEDDED

# pyarrow and its modules, imported by the first ``read`` of a file this reader takes: importing
# them costs ~0.2 s, which every command would pay at start-up (most never read a large table).
pa = pc = pacsv = pq = None
_PYARROW: list[bool] = []  # [available] once tried


def _pyarrow() -> bool:
    """Import pyarrow on first use; False when it is not installed (the row reader does everything)."""
    global pa, pc, pacsv, pq
    if not _PYARROW:
        try:
            import pyarrow as pa
            import pyarrow.compute as pc
            import pyarrow.csv as pacsv
            import pyarrow.parquet as pq
        except ImportError:
            pass
        _PYARROW.append(pa is not None)
    return _PYARROW[0]


# What ``read`` gives tabular.Table: (target, feature names, columns, categorical names, target cells)
Columns = tuple[str, list[str], dict[str, np.ndarray], list[str], Any]

BLOCK = 4 << 20  # bytes of CSV parsed per streamed block
# Bytes a streamed Parquet column reads at a time: without it (pre_buffer) a batch stream holds
# its whole row group (pyarrow writes 1M rows per group by default) in Arrow's memory.
PARQUET_BUFFER = 1 << 18
# CSV files smaller than this are read row by row (milliseconds either way).
MIN_BYTES = 1 << 20


def _header(path: Path, delimiter: str) -> Optional[list[str]]:
    """The CSV's header cells, or None when the first line is not a plain header."""
    with open(path, "rb") as f:
        first = f.readline(1 << 20)
    try:
        text = first.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text.startswith("\ufeff"):
        return None  # a byte-order mark: the row reader's business
    rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    if len(rows) != 1:
        return None
    header = rows[0]
    if any(not h or h != h.strip() for h in header) or len(set(header)) != len(header):
        return None  # the row reader warns about these / strips them
    return header


@dataclass
class Numbers:
    """A numeric column already out of Arrow: (N,) float64, NaN where a cell was null."""

    values: np.ndarray
    nulls: int


def _numbers(col: Any) -> Numbers:
    """An Arrow numeric array (or chunked column) as Numbers, copied out of Arrow's buffers."""
    nulls = col.null_count
    if not pa.types.is_float64(col.type):
        col = col.cast(pa.float64())
    if nulls:
        col = pc.fill_null(col, float("nan"))
    return Numbers(np.array(_to_numpy(col), dtype=np.float64, copy=True), nulls)


def _convert(col: Any, cats: list[str], name: str) -> Any:
    """Numbers for a numeric column, Arrow strings (or anything else) as they are."""
    if name not in cats and (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
        return _numbers(col)
    if name in cats and not pa.types.is_string(col.type):
        return col.cast(pa.string())
    return col


def _parquet(path: Path, needed: list[str], cats: list[str]) -> dict[str, Any]:
    """Parquet column by column: one Arrow column in memory at a time besides the results."""
    f = pq.ParquetFile(path)
    return {name: _convert(f.read(columns=[name]).column(0), cats, name) for name in needed}


def csv_options(
    path: Path, needed: list[str], cats: list[str], missing: str, block: int = 0
) -> Optional[dict[str, Any]]:
    """``open_csv``'s keyword arguments for the needed columns (types fixed from the first block:
    text stays text, any number is float64), or None when the header is not a plain one."""
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    header = _header(path, delimiter)
    if header is None or any(c not in header for c in needed):
        return None
    nulls = list(MISSING) if missing != "error" else []
    options = {
        "read_options": pacsv.ReadOptions(block_size=block or BLOCK),
        "parse_options": pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=False),
    }
    convert = pacsv.ConvertOptions(
        include_columns=needed,
        null_values=nulls,
        strings_can_be_null=bool(nulls),
        column_types={c: pa.string() for c in cats},
    )
    with pacsv.open_csv(path, convert_options=convert, **options) as first:
        schema = first.schema
    convert.column_types = {
        f.name: pa.string() if f.name in cats or pa.types.is_string(f.type) else pa.float64() for f in schema
    }
    return {"convert_options": convert, **options}


def batches(
    path: Path, needed: list[str], cats: list[str], missing: str, rows: int = 1 << 16, block: int = 0
) -> Optional[Any]:
    """The needed columns as a stream of Arrow record batches (Parquet: ``rows`` rows each, read
    through a small buffer rather than a whole row group at a time; CSV: ``block`` bytes of the
    file each (default ``BLOCK``), text columns as strings, numbers as float64), or None when the
    CSV's header is not a plain one. Arrow holds a few batches at a time, not the file."""
    if path.suffix.lower() == ".parquet":
        f = pq.ParquetFile(path, pre_buffer=False, buffer_size=PARQUET_BUFFER)
        return f.iter_batches(batch_size=rows, columns=needed, use_threads=False)
    options = csv_options(path, needed, cats, missing, block)
    return None if options is None else pacsv.open_csv(path, **options)


def _columns(path: Path, needed: list[str], cats: list[str], missing: str) -> Optional[dict[str, Any]]:
    """The needed columns: Numbers for numeric ones, Arrow arrays for text, each block's numbers
    copied out before the next is parsed (a text cell further down a numeric column is a
    conversion error, and the row reader takes the file)."""
    if path.suffix.lower() == ".parquet":
        return _parquet(path, needed, cats)
    stream = batches(path, needed, cats, missing)
    if stream is None:
        return None
    schema = stream.schema
    text = {f.name for f in schema if pa.types.is_string(f.type)}
    parts: dict[str, list[Any]] = {name: [] for name in schema.names}
    with stream as reader:
        for batch in reader:
            for name, col in zip(batch.schema.names, batch.columns):
                parts[name].append(col if name in text else _numbers(col))
    out: dict[str, Any] = {}
    for name in schema.names:
        chunks = parts.pop(name)
        if name in text:
            out[name] = pa.chunked_array(chunks, type=pa.string())
        else:
            values = np.concatenate([c.values for c in chunks]) if chunks else np.empty(0)
            out[name] = Numbers(values, sum(c.nulls for c in chunks))
    return out


def _to_numpy(col: Any) -> np.ndarray:
    """A numeric column without nulls as one array, read from the chunks' buffers (pyarrow's
    ``to_numpy`` imports pandas: a second or more for nothing); one chunk: a view, no copy."""
    kind = "f" if pa.types.is_floating(col.type) else "i" if pa.types.is_signed_integer(col.type) else "u"
    dtype = np.dtype(f"{kind}{col.type.bit_width // 8}")
    chunks = [
        np.frombuffer(c.buffers()[1], dtype=dtype, count=len(c), offset=c.offset * dtype.itemsize)
        for c in getattr(col, "chunks", [col])
    ]
    if not chunks:
        return np.empty(0, dtype=dtype)
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def _strings(col: Any) -> tuple[list[str], np.ndarray]:
    """(distinct values, (N,) index of each cell's value; len(values) where null)."""
    coded = pc.dictionary_encode(col).combine_chunks()
    values = coded.dictionary.to_pylist()
    return values, _to_numpy(coded.indices.fill_null(len(values)))


def _numeric(col: Any, missing: str) -> Optional[np.ndarray]:
    """(N,) float64 of a numeric column (NaN where missing), or None if it is not clean."""
    if not isinstance(col, Numbers) or (col.nulls and missing == "error"):
        return None
    arr = col.values
    present = arr[~np.isnan(arr)] if col.nulls else arr
    if not np.isfinite(present).all() or (len(present) and np.abs(present).max() > MAX_ABS):
        return None
    return arr


def _category(col: Any, auto: bool) -> Optional[np.ndarray]:
    """(N,) object array of strings (None where missing), or None if a value needs the row
    reader (padded with blanks, or a number in a column auto-detected as categories)."""
    if isinstance(col, Numbers) or not pa.types.is_string(col.type):
        return None
    values, idx = _strings(col)
    if any(v != v.strip() or v.strip() in MISSING for v in values):
        return None
    if auto and (not values or any(is_number(v) for v in values)):
        return None
    return np.array([*values, None], dtype=object)[idx]


def plan(
    path: Path, data: str, target: Optional[str], features: Optional[list[str]], labelled: bool, categorical: Any
) -> Optional[tuple[str, list[str], list[str], list[str]]]:
    """(target, feature names, listed categorical columns, needed columns) of a file this reader
    may take, or None: the row reader takes the file (and names what is wrong)."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".tab", ".parquet"):
        return None
    if suffix != ".parquet" and path.stat().st_size < MIN_BYTES:
        return None
    if not _pyarrow():
        return None
    try:
        cols = pq.read_schema(path).names if suffix == ".parquet" else _header(path, "\t" if suffix != ".csv" else ",")
    except Exception:  # an unreadable Parquet footer: the row reader says so
        return None
    if not cols:
        return None
    t = target or (EMBEDDED[data]["target"] if data in EMBEDDED else cols[-1])
    names = list(dict.fromkeys(features or [c for c in cols if c != t]))
    if not names or any(c not in cols for c in names) or (labelled and t not in cols):
        return None  # the row reader names what is missing
    listed = [] if categorical in ("none", "auto") else [c for c in names if c in categorical]
    needed = list(dict.fromkeys(names + [t] if labelled else names))
    return t, names, listed, needed


def read(
    path: Path,
    data: str,
    target: Optional[str],
    features: Optional[list[str]],
    labelled: bool,
    missing: str,
    categorical: Any,
) -> Optional[Columns]:
    """``tabular.read_table``'s columns, or None: the row reader takes the file."""
    planned = plan(path, data, target, features, labelled, categorical)
    if planned is None:
        return None
    t, names, listed, needed = planned
    try:
        arrow = _columns(path, needed, listed, missing)
    except Exception:  # pyarrow's parse errors: ragged records, bad bytes, unclosed quotes
        return None
    if arrow is None or not len(_column_values(arrow[needed[0]])):
        return None
    return _assemble(path, arrow, names, t, labelled, missing, categorical, listed)


def _column_values(col: Any) -> Any:
    return col.values if isinstance(col, Numbers) else col


def _assemble(
    path: Path,
    arrow: dict[str, Any],
    names: list[str],
    target: str,
    labelled: bool,
    missing: str,
    categorical: Any,
    listed: list[str],
) -> Optional[Columns]:
    columns: dict[str, np.ndarray] = {}
    cats: list[str] = []
    for name in names:
        col = arrow.pop(name) if name != target else arrow[name]
        arr = None if name in listed else _numeric(col, missing)
        if arr is None and (name in listed or categorical == "auto"):
            arr = _category(col, auto=name not in listed)
            if arr is not None and arr.size and missing == "error" and col.null_count:
                return None
            cats.append(name)
        if arr is None:
            return None
        columns[name] = arr
    if missing != "error" and _all_missing_row(columns):
        return None  # the row reader skips a record of blank cells; pyarrow keeps it
    y_raw: Any = []
    if labelled:
        col = arrow.pop(target)
        y_raw = _numeric(col, "error") if isinstance(col, Numbers) else _labels(col)
        if y_raw is None:
            return None
    return target, names, columns, cats, y_raw


def _labels(col: Any) -> Optional[np.ndarray]:
    """String labels, as the row reader would keep them (it strips them when it uses them)."""
    if not pa.types.is_string(col.type) or col.null_count:
        return None
    values, idx = _strings(col)
    return np.array([*values, None], dtype=object)[idx]


def _all_missing_row(columns: dict[str, np.ndarray]) -> bool:
    empty = None
    for col in columns.values():
        m = np.array([v is None for v in col]) if col.dtype == object else np.isnan(col)
        empty = m if empty is None else empty & m
    return bool(empty is not None and empty.any())
