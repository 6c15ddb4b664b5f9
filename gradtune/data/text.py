"""Text data for language models: a corpus tokenised once into a memory-mapped token file, cut
into training windows of ``block_size + 1`` tokens.

Tokenising is the slow part, and the result depends only on the corpus and the tokenizer, so it
is done once (data/corpus.py: streamed in bounded memory, in parallel over shards, resumable):
the tokens go to a flat ``uint8`` (byte), ``uint16`` (vocab up to 65,536) or ``uint32`` file in
a cache entry keyed by the shards' fingerprints + the tokenizer's fingerprint. A second run --
another learning rate, a resume, another rank -- finds the entry and maps it; it does not
tokenise again. The cache lives in ``$GRADTUNE_CACHE/tokens`` (default
``~/.cache/gradtune/tokens``); deleting it is always safe.

Windows. The corpus's tokens are split by position: the first ``1 - val_fraction`` for
training, the rest for validation (a split by position, not by window, so no validation token
is ever a training label). Each split is cut into windows of ``T + 1`` tokens with stride
``T``: the inputs ``window[:-1]`` of consecutive windows do not overlap, and every token after
the first is a label exactly once per epoch. So a window is a *sample* exactly as a table row
is: the sampler shuffles windows per epoch from (seed, epoch), batch_size=full is the whole
text per step, and an epoch is one pass over the text.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from gradtune.data import corpus
from gradtune.data import tokenizer as tokenizers
from gradtune.data.dataset import Batch
from gradtune.data.records import path_kind
from gradtune.data.token_bytes import token_bytes
from gradtune.data.tokenizer import Tokenizer
from gradtune.runtime import cache, distributed
from gradtune.runtime.errors import GradtuneError, InputError


def cache_dir() -> Path:
    return cache.path("tokens")


token_dtype = corpus.token_dtype  # the smallest unsigned integer that holds every id


# --- files and messages shared by every data reader (tables, texts, tokenizers) -----------------


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


def decode_utf8(label: str, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise InputError(
            f"{label}:{line}: not UTF-8 text (byte {e.start} is {raw[e.start : e.start + 1]!r}); save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")  # a byte-order mark is not text


@dataclass
class TokenFile:
    """A corpus's tokens, memory-mapped read-only from the cache."""

    source: str  # "embedded:shakespeare", the file's path, or the spec of several shards
    path: Path  # the token file: n_tokens little-endian uint8/uint16/uint32, no header
    tokens: np.ndarray  # (n_tokens,) np.memmap
    tokenizer: Tokenizer
    tokenizer_path: Path  # the tokenizer as one JSON file next to the tokens (tokenizer.load reads it)
    cache_hit: bool  # True: found in the cache, nothing was tokenised
    seconds: float  # time to produce or find the tokens
    meta: dict = dataclasses.field(default_factory=dict)  # the cache entry's meta.json (shards, docs, chars, ...)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def note(self) -> str:
        """One line on what tokenising did (told by the process that did it)."""
        m, workers = self.meta, self.meta.get("workers", 1)
        return (
            f"tokenised {self.source}: {m['n_tokens']:,} tokens, {m['docs']:,} document{'s' * (m['docs'] != 1)}, "
            f"{len(m['encoded_shards'])} of {len(m['shards'])} shards encoded by {workers} "
            f"process{'es' * (workers > 1)} in {m['tokenize_s']:.1f} s"
        )


def tokenize(
    data: Any, tokenizer: str = "byte", cache: Optional[Path] = None, field: str = "text", workers: int = 0
) -> TokenFile:
    """Tokens of ``data`` (embedded name, file, folder, glob or list of them; data/corpus.py)
    under ``tokenizer`` (byte | char | path), from the cache when this corpus was tokenised the
    same way before; else built in bounded memory by ``workers`` processes (0: every core)."""
    t0 = time.perf_counter()
    label, shards = corpus.shards_of(data)
    # The char vocabulary is a function of the text, so the shards' fingerprints already pin it down.
    tok = None if tokenizer == "char" else tokenizers.load(tokenizer)
    fingerprint = "char-v1:from-text" if tok is None else tok.fingerprint()
    root = Path(cache) if cache is not None else cache_dir()
    entry = root / f"{corpus.stem(label)}-{corpus.key(shards, field, fingerprint)}"
    if tok is None and corpus.cached(entry) is None:
        tok = tokenizers.CharTokenizer(list(corpus.char_vocab(shards, field)))
    if tok is None:  # char, cached: the vocabulary saved with the tokens
        tok = tokenizers.load(str(entry / "tokenizer.json"))
    meta, hit = corpus.build(entry, label, shards, tok, field, workers)
    if meta["n_tokens"] == 0:
        raise GradtuneError(f"{label}: the text has no tokens under tokenizer {tok.name}")
    tokens = np.memmap(entry / "tokens", dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r")
    seconds = time.perf_counter() - t0
    return TokenFile(label, entry / "tokens", tokens, tok, entry / "tokenizer.json", hit, seconds, meta)


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


SCAN = 1 << 22  # tokens per slice while counting the validation tail's bytes (32 MB of int64)


def val_tokens(tf: TokenFile, val_fraction: float) -> int:
    """Tokens of the validation tail: the most tokens at the end whose text is at most
    ``val_fraction`` of the corpus's UTF-8 bytes, so that the split falls at the same text
    whatever the tokenizer (a BPE's tokens of held-out text carry fewer bytes than the rest: a
    split counted in tokens would hold out less text); counted in tokens where a token's bytes
    are not fixed (data/token_bytes.py). With bytes as tokens both counts are the same."""
    n, total = tf.n_tokens, tf.meta.get("bytes")
    table = None if isinstance(tf.tokenizer, tokenizers.ByteTokenizer) else token_bytes(tf.tokenizer)
    if val_fraction <= 0 or table is None or not total:
        return int(n * val_fraction)
    per, want, tail, stop = table.numpy(), total * val_fraction, 0, n
    while stop > 0:  # back from the end, a slice at a time: only the tail is read
        start = max(stop - SCAN, 0)
        seen = tail + np.cumsum(per[tf.tokens[start:stop][::-1]])  # bytes of the last 1, 2, ... tokens
        k = int(np.searchsorted(seen, want, side="right"))  # how many of them fit in want
        if k < len(seen):
            return n - stop + k
        tail, stop = int(seen[-1]), start
    return n


def split(tf: TokenFile, block_size: int, val_fraction: float = 0.1) -> tuple[TextWindows, Optional[TextWindows]]:
    """Training windows over the first (1 - val_fraction) of the text, validation over the rest
    (``val_tokens``)."""
    n = tf.n_tokens
    n_val = val_tokens(tf, val_fraction)
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
