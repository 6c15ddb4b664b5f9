"""A corpus of any size -> one memory-mapped token file, built in bounded memory, in parallel
over shards, resumably, by one process at a time.

    shards  ``records.resolve(data)`` (a file, folder, glob or list; an embedded name is its
            packaged file); each document's tokens are followed by the tokenizer's end-of-text
            id (when it has one: byte and char tokenizers have none, and documents just follow)
    build   one worker process per shard at a time (``workers``: 0 = every core), each
            streaming its shard's pieces (records.texts) through the tokenizer into
            ``<entry>/shards/NNNNN.tokens``, written atomically with a ``.json`` count beside it
    resume  a killed build leaves the finished shards; the next build encodes only the others
    join    the shard files are concatenated in shard order into ``<entry>/tokens``; then
            ``meta.json`` (the complete-entry mark) is written and the shards deleted
    lock    ``<entry>.lock`` (flock) is held while building: under torchrun, or with two runs
            on one corpus, one process builds and the others wait, then map the result

The entry's key is the tokenizer's fingerprint, the text field and each shard's fingerprint
(path, size, modification time, a sampled sha256: data/fingerprint.py), so a second run finds
the entry without reading the corpus. Workers are spawned (not forked): a forked copy of a
process that has used the tokenizers package's thread pool would run single-threaded.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from gradtune import datasets
from gradtune.data import records
from gradtune.data import tokenizer as tokenizers
from gradtune.data.fingerprint import shard_digest
from gradtune.data.records import Shard
from gradtune.runtime import testhooks
from gradtune.runtime.atomic import atomic_path
from gradtune.runtime.errors import GradtuneError, InputError

FORMAT = 2  # bump when the token file layout changes: old entries are ignored
SMALL = 16 << 20  # bytes of shards below which one process encodes them all
BATCH_CHARS = 1 << 22  # characters handed to the tokenizer at once (~4M): many small records in one call


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer that holds every id (uint8 for bytes: 1 byte per token)."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    raise GradtuneError(f"tokenizer vocab_size {vocab_size:,} does not fit a uint32 token file")


def shards_of(data: Any) -> tuple[str, list[Shard]]:
    """(label for messages, shards) of an embedded corpus name or a data spec."""
    if isinstance(data, str) and data in datasets.TEXT:
        return f"embedded:{data}", [Shard(datasets.HERE / datasets.TEXT[data], "txt", True)]
    if isinstance(data, str) and data in datasets.EMBEDDED:
        raise GradtuneError(
            f"data '{data}' is a tabular data set; a language model trains on text "
            "(data=shakespeare, a text file, folder, glob or list of them)"
        )
    if isinstance(data, list):  # files (one corpus), or a mixture's sources read as one (its tokenizer)
        if not data:
            raise InputError("data: an empty list of sources")
        found = [shards_of(d["path"] if isinstance(d, dict) else d) for d in data]
        shards = [s for _, part in found for s in part]
        if len(data) == 1:
            return found[0][0], shards
        return f"{found[0][0]} (+{len(shards) - len(found[0][1])} more shards)", shards
    shards = records.resolve(data)
    if len(shards) == 1:
        return str(shards[0].path), shards
    return data, shards


def key(shards: list[Shard], field: str, fingerprint: str) -> str:
    h = hashlib.sha256(f"{FORMAT}|{fingerprint}|{field}".encode())
    for s in shards:
        h.update(f"|{s.path.resolve()}|{shard_digest(s.path)}".encode())
    return h.hexdigest()[:20]


def stem(label: str) -> str:
    name = Path(label.removeprefix("embedded:").split(" ")[0]).name.split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)[:40] or "text"


def encode_texts(tok: tokenizers.Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text, (n_i,) int64 each; one parallel ``encode_batch`` call for a
    Hugging Face tokenizer (the Rust side spreads the texts over its threads)."""
    hf = getattr(tok, "tok", None)
    if hf is not None:
        return [np.asarray(e.ids, dtype=np.int64) for e in hf.encode_batch(texts, add_special_tokens=False)]
    fast = getattr(tok, "encode_array", None)
    return [fast(t) if fast is not None else np.asarray(tok.encode(t), dtype=np.int64) for t in texts]


def _split(texts: list[str], ends: list[bool]) -> tuple[list[str], list[bool]]:
    """Long pieces cut into line-aligned parts of ~256K characters, so that one long document
    still spreads over the tokenizer's threads (the cut is at a pre-tokenizer boundary)."""
    out, out_ends = [], []
    for t, end in zip(texts, ends):
        parts = list(tokenizers.pieces(t, 1 << 18)) if len(t) > 1 << 19 else [t]
        out += parts
        out_ends += [False] * (len(parts) - 1) + [end]
    return out, out_ends


def _flush(f, tok, texts: list[str], ends: list[bool], dtype: np.dtype, eos: Optional[int], where: str) -> int:
    texts, ends = _split(texts, ends)
    out, n = [], 0
    for ids, end in zip(encode_texts(tok, texts), ends):
        if ids.size and (ids.min() < 0 or ids.max() >= tok.vocab_size):
            bad = int(ids.max() if ids.max() >= tok.vocab_size else ids.min())
            raise GradtuneError(
                f"{where}: tokenizer {tok.name} produced id {bad}, outside its vocab_size {tok.vocab_size}"
            )
        out.append(ids)
        if end and eos is not None:
            out.append(np.array([eos], dtype=np.int64))
    if out:
        arr = np.concatenate(out).astype(dtype.newbyteorder("<"))
        f.write(arr.tobytes())
        n = int(arr.size)
    return n


def encode_shard(
    shard: Shard, tok_path: str, field: str, out: str, threads: int = 0, parent: int = 0
) -> dict[str, int]:
    """Encode one shard into the token file ``out`` (atomically) and its ``.json`` count; runs in
    a worker process (``threads``: the tokenizer's thread count there, 0 = its default)."""
    if parent and os.getppid() != parent:  # a task still queued when the build was killed
        os._exit(1)
    if threads:  # read when the tokenizers package starts its pool, so set before loading it
        os.environ["RAYON_NUM_THREADS"] = os.environ["RAYON_RS_NUM_CPUS"] = str(threads)
    tok = tokenizers.load(tok_path)
    dtype, eos = token_dtype(tok.vocab_size), tok.eos_id
    n = docs = nbytes = 0
    texts: list[str] = []
    ends: list[bool] = []
    with atomic_path(Path(out)) as tmp, open(tmp, "wb") as f:
        size = 0
        for line, text, end in records.texts(shard, field):
            texts.append(text)
            ends.append(end)
            size += len(text)
            docs += end
            nbytes += len(text.encode("utf-8"))
            if size >= BATCH_CHARS:
                n += _flush(f, tok, texts, ends, dtype, eos, f"{shard.path}:{line}")
                texts, ends, size = [], [], 0
        n += _flush(f, tok, texts, ends, dtype, eos, str(shard.path))
    count = {"n_tokens": n, "docs": docs, "bytes": nbytes}
    with atomic_path(Path(out).with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(count))
    return count


def _done(tokens: Path, itemsize: int) -> Optional[dict[str, int]]:
    """A finished shard's counts, or None (missing, or a size that does not match)."""
    try:
        count = json.loads(tokens.with_suffix(".json").read_text())
        return count if tokens.stat().st_size == count["n_tokens"] * itemsize else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed): one builder at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def cached(entry: Path) -> Optional[dict[str, Any]]:
    """The entry's metadata if it is complete and consistent, else None."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        ok = meta.get("format") == FORMAT and (entry / "tokenizer.json").is_file()
        ok = ok and (entry / "tokens").stat().st_size == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if ok else None


def _watch(parent: int) -> None:
    """Worker initializer: exit when the parent is gone (killed mid-build), instead of waiting on
    the task queue for ever and holding the parent's stdout/stderr pipes open."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _run(jobs: list[tuple[int, Shard, Path]], tok_path: Path, field: str, workers: int) -> Iterator[int]:
    """Encode ``jobs`` (index, shard, out), yielding each index as its shard finishes."""
    if workers <= 1 or len(jobs) <= 1:
        for i, shard, out in jobs:
            encode_shard(shard, str(tok_path), field, str(out))
            yield i
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    spawn = get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_watch, initargs=(os.getpid(),)) as pool:
        me = os.getpid()
        futures = {pool.submit(encode_shard, s, str(tok_path), field, str(out), threads, me): i for i, s, out in jobs}
        try:
            for fut in as_completed(futures):
                fut.result()  # an InputError in a worker is raised here, naming its file
                yield futures[fut]
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def build(
    entry: Path, label: str, shards: list[Shard], tok: tokenizers.Tokenizer, field: str, workers: int = 0
) -> tuple[dict[str, Any], bool]:
    """The complete entry (meta, cache_hit), building what is missing under the entry's lock."""
    meta = cached(entry)
    if meta is not None:
        return meta, True
    with locked(entry.with_name(entry.name + ".lock")):
        meta = cached(entry)  # another process may have built it while this one waited
        if meta is not None:
            return meta, True
        t0 = time.perf_counter()
        tok_path = tokenizers.save(tok, entry / "tokenizer.json")
        dtype = token_dtype(tok.vocab_size)
        part = entry / "shards"
        part.mkdir(parents=True, exist_ok=True)
        outs = [part / f"{i:05d}.tokens" for i in range(len(shards))]
        todo = [(i, s, o) for i, (s, o) in enumerate(zip(shards, outs)) if _done(o, dtype.itemsize) is None]
        workers = min(workers or os.cpu_count() or 1, len(todo) or 1)
        if sum(s.path.stat().st_size for _, s, _ in todo) < SMALL:
            workers = 1  # starting worker processes would take longer than the encoding
        for _ in _run(todo, tok_path, field, workers):
            testhooks.hit("tokenize.shard")  # kill tests: a build dies between finished shards
        counts = [_done(o, dtype.itemsize) for o in outs]
        if any(c is None for c in counts):
            raise GradtuneError(f"{label}: a shard's token file is missing after tokenisation")
        with atomic_path(entry / "tokens") as tmp, open(tmp, "wb") as f:
            for o in outs:
                with open(o, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 24)
        meta = {
            "format": FORMAT,
            "source": label,
            "shards": [str(s.path) for s in shards],
            "shard_tokens": [c["n_tokens"] for c in counts],
            "tokenizer": tok.name,
            "fingerprint": tok.fingerprint(),
            "vocab_size": tok.vocab_size,
            "dtype": dtype.name,
            "n_tokens": sum(c["n_tokens"] for c in counts),
            "docs": sum(c["docs"] for c in counts),
            "bytes": sum(c["bytes"] for c in counts),  # UTF-8 bytes of the text: per-byte losses
            "encoded_shards": [i for i, _, _ in todo],  # the rest were finished by an earlier, killed build
            "workers": workers,
            "tokenize_s": round(time.perf_counter() - t0, 4),
        }
        with atomic_path(entry / "meta.json") as tmp:  # written last: its presence marks a complete entry
            tmp.write_text(json.dumps(meta, indent=1))
        shutil.rmtree(part, ignore_errors=True)
        return meta, False


def char_vocab(shards: list[Shard], field: str) -> str:
    """The distinct characters of a corpus, in code-point order (one streaming pass)."""
    seen: set[str] = set()
    for shard in shards:
        for _, text, _ in records.texts(shard, field):
            seen.update(text)
    if not seen:
        raise InputError("char tokenizer: the text is empty, so the vocabulary would be empty")
    return "".join(sorted(seen))
