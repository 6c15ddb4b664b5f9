"""Streaming record reader: a data spec (file | folder | glob | list of them) -> ordered shards,
each read record by record (or text piece by text piece) in bounded memory.

Stable API (other data modules build on it; keep these names and signatures):

    resolve(spec) -> list[Shard]            ordered shards; errors name the spec
    records(shard) -> Iterator[(line, dict)]  one record per JSON line / table row (1-based)
    texts(shard, field="text") -> Iterator[(line, str, doc_end)]
                                            a shard's documents as text pieces: one piece per
                                            record for .jsonl/Parquet/Arrow; a .txt(.gz) file is
                                            one document streamed in line-aligned pieces
    FORMATS                                 suffix -> format name

Formats: ``.txt``, ``.txt.gz``, ``.jsonl``, ``.jsonl.gz``, ``.parquet``, and a Hugging Face
``datasets`` folder written by ``save_to_disk`` (``state.json`` + ``*.arrow``; a DatasetDict
folder reads its ``train`` split). A new format: its suffix in ``FORMATS`` and a branch in
``records`` (row formats) or ``texts`` (plain text) -- nothing else changes.

Memory: a .txt piece is about ``PIECE`` characters, cut after a newline between two non-space
characters (BPE pre-tokenizers split there anyway, so piecewise encoding equals whole-text
encoding); JSON lines one at a time; Parquet and Arrow by record batches. Errors are
``InputError`` lines naming the file (and line or row); an empty shard is an error, as is a
truncated gzip and a glob that matches nothing.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import re
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from gradtune.runtime.errors import InputError
from gradtune.runtime.json_object import parse_object

FORMATS = {
    ".txt": "txt",
    ".txt.gz": "txt",
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
PIECE = 1 << 22  # characters per .txt piece (~4M): bounded memory for a file of any size
_READ = 1 << 20  # bytes read per call from a (possibly gzip) file
_CUT = re.compile(r"(?<=\S)\n(?=\S)")  # a newline between two non-space characters (tokenizer.pieces)
_ROWS = 1024  # rows per Parquet/Arrow record batch


@dataclass(frozen=True)
class Shard:
    path: Path  # the file
    format: str  # txt | jsonl | parquet | arrow
    gz: bool  # gzip-compressed (.txt.gz / .jsonl.gz)


def path_kind(path: Path) -> Optional[str]:
    """None when ``path`` is a regular file (or a link to one); "missing"; else what it is, for
    the message. Why not ``is_file()`` alone: a folder, a FIFO and a device would all read as
    "not found", and opening a FIFO to look inside blocks until some writer appears."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as e:  # permission denied on a parent, a link loop, a name too long
        return f"unreadable ({e.strerror or type(e).__name__})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return ""


def _shard(path: Path) -> Shard:
    suffix = _suffix(path)
    if not suffix:
        known = ", ".join(FORMATS)
        raise InputError(f"{path}: unknown data format (known: {known}, or a datasets save_to_disk folder)")
    return Shard(path, FORMATS[suffix], suffix.endswith(".gz"))


def _arrow_folder(folder: Path) -> list[Shard]:
    """The .arrow files of a ``save_to_disk`` folder in their saved order."""
    if (folder / "dataset_dict.json").is_file():  # a DatasetDict: its train split
        if not (folder / "train").is_dir():
            raise InputError(f"{folder}: a datasets DatasetDict folder without a 'train' split")
        folder = folder / "train"
    try:
        state = json.loads((folder / "state.json").read_text())
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{folder / 'state.json'}: not a datasets save_to_disk state file ({e})") from None
    return [Shard(folder / n, "arrow", False) for n in names]


def _is_arrow_folder(folder: Path) -> bool:
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _walk(folder: Path) -> list[Shard]:
    """A folder's shards in name order, recursively; a datasets folder inside is its .arrow files."""
    if _is_arrow_folder(folder):
        return _arrow_folder(folder)
    found: list[Shard] = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        kind = path_kind(p)
        if kind not in (None, "a folder"):
            raise InputError(f"{p}: {kind}, not a data file")
        found += _walk(p) if kind == "a folder" else [_shard(p)]
    return found


def _folder(folder: Path) -> list[Shard]:
    found = _walk(folder)
    if not found:
        raise InputError(f"{folder}: empty folder (no data files)")
    return found


def resolve(spec: Union[str, Path, list]) -> list[Shard]:
    """Shards of a file, a folder (its files, recursively, in name order), a glob (sorted) or a
    list of those (in list order)."""
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise InputError("data: an empty list of sources")
        return [s for item in spec for s in resolve(item)]
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return _folder(path)
    if path.is_file():
        return [_shard(path)]
    if glob.has_magic(text):
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        if not found:
            raise InputError(f"{text}: the glob matches no file")
        return [s for p in found for s in (_folder(p) if p.is_dir() else [_shard(p)])]
    kind = path_kind(path)
    if kind != "missing":
        raise InputError(f"data not found: {text} is {kind}, not a regular file")
    raise InputError(f"data not found: {text}")


def _open(shard: Shard):
    return gzip.open(shard.path, "rb") if shard.gz else open(shard.path, "rb")


def _chunks(shard: Shard) -> Iterator[bytes]:
    """The shard's bytes in chunks of ``_READ``; a truncated or corrupt gzip is an InputError."""
    try:
        with _open(shard) as f:
            while chunk := f.read(_READ):
                yield chunk
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise InputError(f"{shard.path}: truncated or corrupt gzip ({e})") from None
    except OSError as e:
        raise InputError(f"{shard.path}: cannot read it ({e.strerror or e})") from None


def _text_pieces(shard: Shard) -> Iterator[tuple[int, str]]:
    """(first line, text) pieces of a text file, each cut after a newline between two non-space
    characters; UTF-8 errors name the line; a byte-order mark is dropped."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    buf, line, first, any_bytes = "", 1, True, False
    for raw in _chunks(shard):
        any_bytes = True
        try:
            buf += decoder.decode(raw)
        except UnicodeDecodeError as e:
            bad = line + buf.count("\n") + raw.count(b"\n", 0, max(e.start, 0))
            raise InputError(f"{shard.path}:{bad}: not UTF-8 text; save the file as UTF-8") from None
        if first:
            buf, first = buf.removeprefix("\ufeff"), False
        if len(buf) < PIECE:
            continue
        cut = None
        for m in _CUT.finditer(buf, PIECE // 2):  # the last cut in the buffer's second half
            cut = m.end()
        if cut is None and len(buf) < 16 * PIECE:
            continue  # a very long line: wait for its end (bounded at 16 pieces)
        cut = cut or len(buf)
        yield line, buf[:cut]
        line += buf.count("\n", 0, cut)
        buf = buf[cut:]
    try:
        buf += decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise InputError(f"{shard.path}:{line + buf.count(chr(10))}: not UTF-8 text (the file ends inside a character)")
    if not any_bytes:
        raise InputError(f"{shard.path}: empty shard")
    if buf:
        yield line, buf


def _json_lines(shard: Shard) -> Iterator[tuple[int, dict]]:
    tail, line = b"", 0
    for raw in _chunks(shard):
        lines = (tail + raw).split(b"\n")
        tail = lines.pop()
        for b in lines:
            line += 1
            if b.strip():
                yield line, _parse(shard, line, b)
    if tail.strip():
        yield line + 1, _parse(shard, line + 1, tail)


def _parse(shard: Shard, line: int, b: bytes) -> dict:
    return parse_object(b, f"{shard.path}:{line}")


def _table_batches(shard: Shard, columns: Any = None) -> Iterator[Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{shard.path}: reading {shard.format} needs pyarrow (pip install 'gradtune[data]')") from None
    try:
        if shard.format == "parquet":
            yield from pq.ParquetFile(shard.path).iter_batches(batch_size=_ROWS, columns=columns)
            return
        with pa.memory_map(str(shard.path)) as source:
            try:
                reader = pa.ipc.open_stream(source)  # datasets writes the streaming format
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
                return
            yield from reader
    except (pa.ArrowInvalid, pa.ArrowKeyError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{shard.path}: cannot read it as {shard.format} ({first})") from None


def records(shard: Shard) -> Iterator[tuple[int, dict]]:
    """(line or 1-based row, record) of a .jsonl(.gz), Parquet or Arrow shard."""
    if shard.format == "jsonl":
        yield from _json_lines(shard)
        return
    if shard.format == "txt":
        raise InputError(f"{shard.path}: a plain-text file has no records (use .jsonl, Parquet or Arrow)")
    row = 0
    for batch in _table_batches(shard):
        for rec in batch.to_pylist():
            row += 1
            yield row, rec


def _column_texts(shard: Shard, field: str) -> Iterator[tuple[int, str]]:
    row = 0
    for batch in _table_batches(shard):
        if field not in batch.schema.names:
            raise InputError(f"{shard.path}: no column '{field}' (columns: {', '.join(batch.schema.names)})")
        for value in batch.column(field).to_pylist():
            row += 1
            if not isinstance(value, str):
                raise InputError(f"{shard.path}: row {row}: '{field}' is {type(value).__name__}, not text")
            yield row, value


def texts(shard: Shard, field: str = "text") -> Iterator[tuple[int, str, bool]]:
    """(line, text, doc_end): the shard's documents as text pieces; ``doc_end`` marks the last
    piece of a document. A record's ``field`` must be a string; an empty shard is an error."""
    if shard.format == "txt":
        last = None
        for item in _text_pieces(shard):
            if last is not None:
                yield (*last, False)
            last = item
        if last is None:
            raise InputError(f"{shard.path}: empty shard")
        yield (*last, True)
        return
    rows = _json_lines(shard) if shard.format == "jsonl" else None
    if rows is None:
        found = _column_texts(shard, field)
    else:
        found = ((line, _field(shard, line, rec, field)) for line, rec in rows)
    n = 0
    for line, value in found:
        n += 1
        yield line, value, True
    if n == 0:
        raise InputError(f"{shard.path}: empty shard (no records)")


def _field(shard: Shard, line: int, rec: dict, field: str) -> str:
    if field not in rec:
        raise InputError(f"{shard.path}:{line}: no field '{field}' (fields: {', '.join(map(str, rec))})")
    value = rec[field]
    if not isinstance(value, str):
        raise InputError(f"{shard.path}:{line}: '{field}' is {type(value).__name__}, not text")
    return value
