"""gradtune's own tokenizers (byte, char, BPE tokenizer.json: ``data/tokenizer.py``) seen through
the few Hugging Face tokenizer attributes that instruction and preference data use
(``instructions.encode``, ``sequences.pad_id``): calling it on a text gives ``{"input_ids": ...}``,
``eos_token_id`` / ``pad_token_id`` / ``bos_token_id`` and no chat template. So a GPT trained here
reads prompt / response and preference JSONL exactly as a pretrained model without a template
does: the prompt's tokens, then the response's, then the end token when the tokenizer has one.
"""

from __future__ import annotations

from typing import Any, Optional

from gradtune.data.tokenizer import Tokenizer


class PlainTokenizer:
    chat_template = None  # no template: instructions.encode's plain prompt + response path
    bos_token_id: Optional[int] = None

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.pad_token_id = tokenizer.eos_id

    def __call__(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> dict[str, list[int]]:
        return {"input_ids": list(self.tokenizer.encode(text))}

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, ids: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(list(ids))
