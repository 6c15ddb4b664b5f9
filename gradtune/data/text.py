"""Text data for language models: a text tokenised once into a memory-mapped token file, cut into
training windows of ``block_size + 1`` tokens.

Tokenising is the slow part (a Hugging Face BPE runs at a few MB/s), and the result depends only
on the text and the tokenizer, so it is done once: the tokens go to a flat ``uint16`` (vocab up
to 65,536) or ``uint32`` file in a cache directory, keyed by sha256(text bytes) + the tokenizer's
fingerprint. A second run -- another learning rate, a resume, another rank -- hashes the text,
finds the file and maps it; it does not tokenise again. The cache lives in
``$GRADTUNE_CACHE/tokens`` (default ``~/.cache/gradtune/tokens``); deleting it is always safe.

Windows. The text's tokens are split by position: the first ``1 - val_fraction`` for training,
the rest for validation (a split by position, not by window, so no validation token is ever a
training label). Each split is cut into windows of ``T + 1`` tokens with stride ``T``: the inputs
``window[:-1]`` of consecutive windows do not overlap, and every token after the first is a
label exactly once per epoch. So a window is a *sample* exactly as a table row is: the sampler
shuffles windows per epoch from (seed, epoch), batch_size=full is the whole text per step, and
an epoch is one pass over the text. (A random offset per epoch, which would vary where windows
start, is not possible: the sampler hands out indices only, and resume needs the sample set to
be fixed. A long text offers plenty of variety without it.)
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from gradtune import datasets
from gradtune.data import tokenizer as tokenizers
from gradtune.data.dataset import Batch
from gradtune.data.tokenizer import Tokenizer
from gradtune.runtime import cache, distributed
from gradtune.runtime.atomic import atomic_path
from gradtune.runtime.errors import GradtuneError, InputError

FORMAT = 1  # bump when the token file layout or the window rule changes: old files are ignored
CHUNK_CHARS = 1 << 22  # texts are encoded ~4M characters at a time: bounded memory for any size


def cache_dir() -> Path:
    return cache.path("tokens")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer that holds every id: half the bytes of int32 for vocab <= 65,536."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise GradtuneError(
        f"tokenizer vocab_size {vocab_size:,} does not fit a uint32 token file (at most {1 << 32:,} ids)"
    )


# --- files and messages shared by every data reader (tables, texts, tokenizers) -----------------


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


def need_file(path: Path, what: str, hint: str = "") -> Path:
    """``path`` if it is a regular file; else an InputError that says what is there instead."""
    kind = path_kind(path)
    if kind == "missing":
        raise InputError(f"{what} not found: {path}{hint}")
    if kind is not None:
        raise InputError(f"{what} not found: {path} is {kind}, not a regular file")
    return path


def read_utf8(path: Path, label: Optional[str] = None) -> str:
    """The text of a regular file, decoded as UTF-8; bad bytes are one error naming the line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{label or path}: cannot read it ({e.strerror or type(e).__name__})") from None
    return decode_utf8(label or str(path), raw)


def warn(message: str) -> None:
    """One ``gradtune: warning:`` line on stderr (rank 0 only); the run goes on."""
    if distributed.is_main():
        print(f"gradtune: warning: {message}", file=sys.stderr, flush=True)


def read_source(data: str) -> tuple[str, bytes]:
    """(label for messages, raw bytes) of an embedded corpus name or a text file path."""

    if data in datasets.TEXT:
        return f"embedded:{data}", datasets.text_bytes(data)
    if data in datasets.EMBEDDED:
        raise GradtuneError(
            f"data '{data}' is a tabular data set; a language model trains on text "
            f"(data=shakespeare or a path to a .txt file)"
        )
    path = need_file(Path(data).expanduser(), "text file")
    raw = path.read_bytes()
    if not raw:
        raise GradtuneError(f"{data}: empty text file")
    return str(path), raw


def decode_utf8(label: str, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise InputError(
            f"{label}:{line}: not UTF-8 text (byte {e.start} is {raw[e.start : e.start + 1]!r}); save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")  # a byte-order mark is not text


def _encode(tok: Tokenizer, chunk: str) -> np.ndarray:
    """Token ids of one chunk as (n,) int64; a vectorised ``encode_array`` when the tokenizer has one."""
    fast = getattr(tok, "encode_array", None)
    return fast(chunk) if fast is not None else np.asarray(tok.encode(chunk), dtype=np.int64)


@dataclass
class TokenFile:
    """A text's tokens, memory-mapped read-only from the cache."""

    source: str  # "embedded:shakespeare" or the text file's path
    path: Path  # the token file: n_tokens little-endian uint16/uint32, no header
    tokens: np.ndarray  # (n_tokens,) np.memmap, uint16 or uint32
    tokenizer: Tokenizer
    tokenizer_path: Path  # the tokenizer as one JSON file next to the tokens (tokenizer.load reads it)
    cache_hit: bool  # True: found in the cache, nothing was tokenised
    seconds: float  # time to produce or find the tokens

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])


def _stem(label: str) -> str:
    name = Path(label.removeprefix("embedded:")).name.split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)[:40] or "text"


def _cached(meta_path: Path, bin_path: Path, tok_path: Path) -> Optional[dict]:
    """The cache entry's metadata if every file is there and consistent, else None (re-tokenise)."""
    try:
        meta = json.loads(meta_path.read_text())
        ok = (
            meta.get("format") == FORMAT
            and tok_path.is_file()
            and bin_path.stat().st_size == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if ok else None


def _write_tokens(path: Path, tok: Tokenizer, text: str, dtype: np.dtype, label: str) -> int:
    """Encode ``text`` chunk by chunk straight into ``path`` (atomically); returns the token count."""
    n = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            for chunk in tokenizers.pieces(text, CHUNK_CHARS):
                ids = _encode(tok, chunk)
                if ids.size and (ids.min() < 0 or ids.max() >= tok.vocab_size):
                    bad = int(ids.max() if ids.max() >= tok.vocab_size else ids.min())
                    raise GradtuneError(
                        f"{label}: tokenizer {tok.name} produced id {bad}, outside its vocab_size {tok.vocab_size}"
                    )
                f.write(ids.astype(dtype.newbyteorder("<")).tobytes())
                n += int(ids.size)
    return n


def tokenize(data: str, tokenizer: str = "byte", cache: Optional[Path] = None) -> TokenFile:
    """Tokens of ``data`` (embedded name or text file) under ``tokenizer`` (byte | char | path),
    from the cache when this text was tokenised the same way before."""
    t0 = time.perf_counter()
    label, raw = read_source(data)
    # The char vocabulary is a function of the text, so the text's hash already pins it down.
    tok = None if tokenizer == "char" else tokenizers.load(tokenizer)
    fingerprint = "char-v1:from-text" if tok is None else tok.fingerprint()
    key = hashlib.sha256(f"{hashlib.sha256(raw).hexdigest()}|{fingerprint}|{FORMAT}".encode()).hexdigest()[:20]
    root = Path(cache) if cache is not None else cache_dir()
    base = root / f"{_stem(label)}-{key}"
    bin_path, meta_path, tok_path = (base.with_suffix(s) for s in (".tokens", ".meta.json", ".tokenizer.json"))
    meta = _cached(meta_path, bin_path, tok_path)
    hit = meta is not None
    if meta is None:
        text = decode_utf8(label, raw)
        if tok is None:
            tok = tokenizers.load("char", text)
        dtype = token_dtype(tok.vocab_size)
        tokenizers.save(tok, tok_path)
        n = _write_tokens(bin_path, tok, text, dtype, label)
        meta = {
            "format": FORMAT,
            "source": label,
            "sha256": hashlib.sha256(raw).hexdigest(),
            "tokenizer": tok.name,
            "fingerprint": fingerprint,
            "vocab_size": tok.vocab_size,
            "dtype": dtype.name,
            "n_tokens": n,
            "text_bytes": len(raw),
            "tokenize_s": round(time.perf_counter() - t0, 4),
        }
        with atomic_path(meta_path) as tmp:  # written last: its presence marks a complete entry
            tmp.write_text(json.dumps(meta, indent=1))
    elif tok is None:  # char: the vocabulary saved with the tokens (no need to decode the text)
        tok = tokenizers.load(str(tok_path))
    if meta["n_tokens"] == 0:
        raise GradtuneError(f"{label}: the text has no tokens under tokenizer {tok.name}")
    tokens = np.memmap(bin_path, dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r")
    return TokenFile(label, bin_path, tokens, tok, tok_path, hit, time.perf_counter() - t0)


class TextWindows:
    """Windows of ``block_size + 1`` tokens, stride ``block_size``, over ``tokens[start:stop]``.

    ``get(idx)`` gives input_ids (B, T) = window[:-1] and labels (B, T) = window[1:], long.
    The (n, T + 1) window matrix is a strided *view* of the memory map (no copy, nothing loaded);
    a batch reads just its B windows from the page cache.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, start: int = 0, stop: Optional[int] = None) -> None:
        stop = len(tokens) if stop is None else stop
        self.block_size = block_size
        self.n = max((stop - start - 1) // block_size, 0)
        if self.n < 1:
            raise GradtuneError(
                f"{stop - start} tokens are fewer than one window of block_size + 1 = {block_size + 1} tokens"
            )
        span = tokens[start : start + self.n * block_size + 1]
        step = span.strides[0]
        # Row i starts at token i*T and spans T+1 tokens: rows share one token at their seams.
        self.windows = np.lib.stride_tricks.as_strided(
            span, shape=(self.n, block_size + 1), strides=(block_size * step, step), writeable=False
        )
        self.n_tokens = stop - start

    def __len__(self) -> int:
        return self.n

    def get(self, idx: torch.Tensor) -> Batch:
        rows = self.windows[idx.numpy()]  # (B, T+1) uint16/32: one gather from the map
        w = torch.from_numpy(rows.astype(np.int64))  # ids as long, as nn.Embedding wants them
        return {"input_ids": w[:, :-1], "labels": w[:, 1:], "sample_id": idx}


def split(tf: TokenFile, block_size: int, val_fraction: float = 0.1) -> tuple[TextWindows, Optional[TextWindows]]:
    """Training windows over the first (1 - val_fraction) of the tokens, validation over the rest."""
    n = tf.n_tokens
    n_val = int(n * val_fraction)
    n_train, need = n - n_val, block_size + 1
    if n_train < need:
        raise GradtuneError(
            f"{tf.source}: text too short: {n:,} tokens, training split {n_train:,} "
            f"(val_fraction={val_fraction:g}), but one window needs block_size + 1 = {need:,}; "
            "use a longer text or a smaller gpt.block_size"
        )
    if val_fraction > 0 and n_val < need:
        raise GradtuneError(
            f"{tf.source}: text too short for validation: {n:,} tokens, validation split "
            f"{n_val:,} (val_fraction={val_fraction:g}), but one window needs block_size + 1 = "
            f"{need:,}; use a longer text, a larger val_fraction, val_fraction=0 or a smaller "
            "gpt.block_size"
        )
    train = TextWindows(tf.tokens, block_size, 0, n_train)
    val = TextWindows(tf.tokens, block_size, n_train, n) if n_val else None
    return train, val
