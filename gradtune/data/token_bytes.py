"""The UTF-8 bytes of text each token id stands for: what turns a loss per token into a loss per
byte, the one figure that compares language models across tokenizers (a BPE token carries ~3
bytes of English, a byte token one).

    table = token_bytes(tokenizer)   # (vocab_size,) int64, or None where a token's bytes are not fixed

Exact for every tokenizer whose tokens each decode to a fixed byte string, concatenated:
  byte       one byte each
  char       the character's UTF-8 length
  byte-level BPE (GPT-2's alphabet: ours from ``gradtune tokenizer train``, GPT-2's, Llama 3's,
             Qwen's) one byte per stand-in character of the token; special tokens 0 (an
             end-of-text marker between documents is not text)
Other Hugging Face tokenizers (SentencePiece's word marker, byte fallback, normalisers) decode a
token differently by its neighbours: None, and no per-byte figure is reported for them.
"""

from __future__ import annotations

import json
from typing import Optional

import torch

from gradtune.data.tokenizer import ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer
from gradtune.data.tokenizer_json import bytes_to_unicode


def token_bytes(tokenizer: Tokenizer) -> Optional[torch.Tensor]:
    """(vocab_size,) int64: the UTF-8 bytes of each token id; None where they are not fixed."""
    if isinstance(tokenizer, ByteTokenizer):
        return torch.ones(tokenizer.vocab_size, dtype=torch.int64)
    if isinstance(tokenizer, CharTokenizer):
        return torch.tensor([len(c.encode("utf-8")) for c in tokenizer.chars], dtype=torch.int64)
    if isinstance(tokenizer, HFTokenizer):
        return _byte_level(tokenizer)
    return None


def _byte_level(tokenizer: HFTokenizer) -> Optional[torch.Tensor]:
    spec = json.loads(tokenizer.raw)
    decoder = spec.get("decoder") or {}
    if decoder.get("type") != "ByteLevel" or spec.get("normalizer") is not None:
        return None
    alphabet = set(bytes_to_unicode().values())
    out = torch.zeros(tokenizer.vocab_size, dtype=torch.int64)  # ids with no token: 0 bytes
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    for token, i in tokenizer.tok.get_vocab(with_added_tokens=True).items():
        if not 0 <= i < len(out):
            return None
        if i in added:  # added tokens are matched as plain text before the BPE
            out[i] = 0 if added[i].get("special") else len(token.encode("utf-8"))
        elif all(ch in alphabet for ch in token):
            out[i] = len(token)  # one stand-in character per byte
        else:
            return None
    return out
