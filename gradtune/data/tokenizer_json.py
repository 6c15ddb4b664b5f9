"""A run's tokenizer as a Hugging Face ``tokenizer.json``: what ``export --hf`` writes beside the
model so that ``AutoTokenizer`` (or ``tokenizers.Tokenizer.from_file``) gives the ids training used.

    text = hf_tokenizer_json(tokenizer)      # the document, for every tokenizer gradtune trains with

Each kind and why its ids are the same:
  path  a Hugging Face tokenizer.json: the file the run saved, byte for byte.
  byte  exactly expressible. A BPE model with no merges whose 256 tokens are GPT-2's printable
        stand-ins for the bytes (``bytes_to_unicode``, the ByteLevel alphabet), each given the id
        of its byte value, behind the ByteLevel pre-tokenizer with ``use_regex=False`` (text ->
        UTF-8 bytes -> stand-ins, no word split) and the ByteLevel decoder (stand-ins -> bytes ->
        text, invalid UTF-8 shown as U+FFFD as ours does). Every text encodes to its UTF-8 bytes.
  char  expressible for every text the run can encode. A BPE model with no merges over the run's
        characters (id = position in its vocabulary), no pre-tokenizer (the text is one word that
        BPE splits into characters), the Fuse decoder (tokens joined with nothing between). A
        character outside the vocabulary, which gradtune refuses with an error, has no id to give:
        tokenizers' BPE, with no unknown token, drops it.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from gradtune.data.tokenizer import ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer
from gradtune.runtime.errors import GradtuneError


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the ByteLevel pre-tokenizer's alphabet): printable
    Latin-1 bytes stand for themselves, the other 68 take code points 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _bpe(vocab: dict[str, int], pre_tokenizer: Optional[dict], decoder: dict) -> dict[str, Any]:
    """A tokenizer.json document (tokenizers' serialised form) of a merge-free BPE."""
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": [],
    }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": decoder,
        "model": model,
    }


def hf_tokenizer_json(tokenizer: Tokenizer) -> str:
    """``tokenizer`` as a tokenizer.json document encoding every text to the ids it gives."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.to_json()
    if isinstance(tokenizer, ByteTokenizer):
        byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        vocab = {ch: b for b, ch in bytes_to_unicode().items()}
        spec = _bpe(vocab, {"type": "ByteLevel", **byte_level}, {"type": "ByteLevel", **byte_level})
        return json.dumps(spec, ensure_ascii=False, indent=2)
    if isinstance(tokenizer, CharTokenizer):
        vocab = {ch: i for i, ch in enumerate(tokenizer.chars)}
        return json.dumps(_bpe(vocab, None, {"type": "Fuse"}), ensure_ascii=False, indent=2)
    raise GradtuneError(f"tokenizer {tokenizer.name}: no tokenizer.json form known for it")


def token_text(tokenizer: Tokenizer, token_id: Optional[int]) -> Optional[str]:
    """The text of special token ``token_id`` (an HF tokenizer's), None when there is none."""
    if token_id is None or not isinstance(tokenizer, HFTokenizer):
        return None
    return tokenizer.tok.id_to_token(token_id)
