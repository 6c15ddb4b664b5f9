"""Your own tokenizer: a byte-level BPE trained on your corpus (the ``tokenizers`` package's
``BpeTrainer``), saved as a Hugging Face tokenizer.json.

Byte-level: every string is first mapped to its UTF-8 bytes (GPT-2's byte alphabet), so any
text encodes with no unknown token and decodes back byte for byte; GPT-2's pre-tokenizer split
(the one llama.cpp calls "gpt-2"), so ``export --gguf`` can write the vocabulary. Special tokens:
``<|endoftext|>`` (id 0: the end-of-text id between documents) and the chosen chat template's
markers (``chatml``: ``<|im_start|>``, ``<|im_end|>``), never split by the BPE.

``text.tokenizer: train`` trains one on the run's data first, on the training text alone: the
validation split is the last ``val_fraction`` of each source's text (at most that share of its
bytes, data/text.val_tokens), so the BPE learns from each source's first ``1 - val_fraction`` of
bytes (a name found only in the held-out text earns no token). The result
is cached under ``$GRADTUNE_CACHE/tokenizers`` by the data's shard fingerprints and the settings,
so a second run (or a resume, or another rank) loads it instead of training again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from gradtune.data import corpus, records
from gradtune.data.records import Shard
from gradtune.runtime import cache
from gradtune.runtime.atomic import atomic_path
from gradtune.runtime.errors import GradtuneError

EOS = "<|endoftext|>"
CHAT_TOKENS = {"chatml": ["<|im_start|>", "<|im_end|>"], "none": []}
VERSION = 1  # bump when the training recipe changes: cached tokenizers are retrained


def train_share(val_fraction: float) -> float:
    """The share of each source's bytes a run's BPE learns from: the training text's. The
    validation split (data/text.val_tokens) holds at most ``val_fraction`` of the bytes at the
    end, so it starts at or after this share."""
    return 1.0 - max(val_fraction, 0.0)


def _all(shards: list[Shard], field: str) -> Iterator[str]:
    for shard in shards:
        for _, text, _ in records.texts(shard, field):
            yield text


def _texts(sources: Sequence[list[Shard]], field: str, share: float) -> Iterator[str]:
    """Each source's texts in order, up to ``share`` of its UTF-8 bytes (the last text cut)."""
    for shards in sources:
        if share >= 1.0:
            yield from _all(shards, field)
            continue
        left = share * sum(len(t.encode("utf-8")) for t in _all(shards, field))  # a first pass: the total
        for text in _all(shards, field):
            raw = text.encode("utf-8")
            if len(raw) >= left:
                yield raw[: int(left)].decode("utf-8", errors="ignore")
                break
            left -= len(raw)
            yield text


def train(
    sources: Sequence[list[Shard]], vocab_size: int, field: str = "text", chat: str = "chatml", share: float = 1.0
) -> str:
    """A byte-level BPE of ``vocab_size`` tokens (special ones included) trained on the text of
    ``sources`` (lists of shards: a corpus each), streamed, on the first ``share`` of each one's
    bytes; returns its tokenizer.json text."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise GradtuneError("tokenizer training needs the tokenizers package (pip install tokenizers)") from None
    if chat not in CHAT_TOKENS:
        raise GradtuneError(f"chat template {chat!r}: choose one of {', '.join(CHAT_TOKENS)}")
    specials = [EOS] + CHAT_TOKENS[chat]
    if vocab_size < 256 + len(specials) + 1:
        raise GradtuneError(f"vocab size {vocab_size}: a byte-level BPE needs at least {256 + len(specials) + 1}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(sources, field, share), trainer)
    return tok.to_str()


def save(text: str, out: Path | str) -> Path:
    """Write a trained tokenizer.json atomically."""
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out


def cached(
    sources: list[list[Shard]],
    digests: list[str],
    vocab_size: int,
    field: str,
    share: float = 1.0,
    chat: str = "chatml",
) -> Path:
    """The path of the tokenizer trained on the first ``share`` of each source's bytes with these
    settings, training it first when the cache has none (``digests``: every shard's fingerprint,
    data/fingerprint.shard_digest, in order)."""
    shards = [s for group in sources for s in group]
    key: Any = [VERSION, vocab_size, field, chat, [str(s.path.resolve()) for s in shards], digests]
    if share < 1.0 or len(sources) > 1:  # a whole single corpus keeps the key it always had
        key += [share, [len(g) for g in sources]]
    name = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]
    path = cache.path("tokenizers", f"bpe{vocab_size}-{name}.json")
    with corpus.locked(path.with_suffix(".lock")):  # under torchrun one rank trains, the others wait
        if not path.is_file():
            save(train(sources, vocab_size, field, chat, share), path)
    return path
