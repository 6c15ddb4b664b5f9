"""A fine-tuned encoder's saved tokenizer (a run's ``tokenizer/``) read with the tokenizers
library alone, called as transformers' fast tokenizer is by the text tasks, for a run that only
computes (``eval``, ``predict``): it spares importing transformers (see models/bert.py).

    tok = encoder_tokenizer(run / "tokenizer")     # or None: load it with transformers
    ids = tok(texts, truncation=True, max_length=64)["input_ids"]

Only BERT's WordPiece tokenizers (``tokenizer_class`` BertTokenizer / BertTokenizerFast): their
tokenizer.json holds the whole pipeline (normaliser, pre-tokeniser, the [CLS] ... [SEP] template),
so encoding it with the file's own truncation and padding switched off and truncation at
``max_length`` (special tokens counted, as transformers does) gives transformers' ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

CLASSES = ("BertTokenizer", "BertTokenizerFast")


class EncoderTokenizer:
    """The subset of transformers' tokenizer interface the text tasks and ``pad_id`` read."""

    def __init__(self, tok: Any, config: dict[str, Any]) -> None:
        self.tok = tok
        self.tok.no_padding()  # a saved file may pad every text to 128: batches pad themselves
        self.pad_token_id = self._id(config.get("pad_token"))
        self.eos_token_id = self._id(config.get("eos_token"))
        self.padding_side = "right"

    def _id(self, token: Any) -> Optional[int]:
        return self.tok.token_to_id(token) if isinstance(token, str) else None

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: list[str], truncation: bool = True, max_length: Optional[int] = None) -> dict[str, Any]:
        """{"input_ids": one list of ids per text}, [CLS] and [SEP] included."""
        if truncation and max_length is not None:
            self.tok.enable_truncation(max_length)
        else:
            self.tok.no_truncation()
        return {"input_ids": [e.ids for e in self.tok.encode_batch(list(texts))]}


def encoder_tokenizer(folder: Path) -> Optional[EncoderTokenizer]:
    """The tokenizer saved in ``folder`` when it is one this module encodes as transformers does;
    else None (a missing or unreadable file included: transformers' loader then says what is wrong)."""
    try:
        import tokenizers  # lazy: an optional package (gradtune[hf])

        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict) or config.get("tokenizer_class") not in CLASSES:
            return None
        text = (folder / "tokenizer.json").read_text(encoding="utf-8")
        pipeline, tok = json.loads(text), tokenizers.Tokenizer.from_str(text)
    except Exception:  # tokenizers raises a bare Exception for a file it cannot parse
        return None
    return EncoderTokenizer(tok, config) if _same_settings(config, pipeline) else None


def _same_settings(config: dict[str, Any], pipeline: Any) -> bool:
    """tokenizer_config.json's settings that transformers would apply over the file's pipeline
    agree with it (a hand-edited folder may disagree: transformers' reading then decides)."""
    norm = pipeline.get("normalizer") if isinstance(pipeline, dict) else None
    lower = norm.get("lowercase") if isinstance(norm, dict) and norm.get("type") == "BertNormalizer" else None
    return (
        config.get("truncation_side", "right") == "right"
        and lower is not None
        and config.get("do_lower_case", lower) == lower
    )
