"""Tokenizers: text <-> token ids. Byte-level by default (needs no file), character-level, or any
Hugging Face ``tokenizer.json`` (through the ``tokenizers`` package, imported only when used).

    byte  vocab 256: the UTF-8 bytes of the text. Any text, no file, no unknown tokens; about
          one token per character of English, so sequences are long.
    char  vocab = the distinct characters of the training text (about 65 for Shakespeare);
          the smallest softmax, but a character it never saw cannot be encoded.
    path  a Hugging Face tokenizer.json (BPE, WordPiece, Unigram...): ~4 characters per token
          for English, a vocab of 32k-256k, so a larger embedding and output layer.

Every tokenizer can be written to one JSON file (``save``) and read back (``load``): a run saves
the one it trained with, so generation decodes exactly the way training encoded. Byte and char
tokenizers are written in a small gradtune format (``{"gradtune_tokenizer": "char", ...}``);
a Hugging Face one is written as its own tokenizer.json, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from gradtune.runtime.atomic import atomic_path
from gradtune.runtime.errors import GradtuneError


@runtime_checkable
class Tokenizer(Protocol):
    name: str  # human-readable: "byte", "char", "hf:tokenizer.json"
    vocab_size: int  # ids are in [0, vocab_size)
    eos_id: Optional[int]  # end-of-text id when the tokenizer has one (documents are separated by it)

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def fingerprint(self) -> str:
        """Changes whenever the same text would encode differently: part of the token cache key."""
        ...

    def to_json(self) -> str:
        """The whole tokenizer as one JSON document (``load`` reads it back)."""
        ...


# A newline between two non-space characters: every BPE pre-tokenizer in use (GPT-2's split, Llama 3's,
# digits-first) ends a pre-token right after it, so encoding piece by piece gives the whole text's tokens.
# (A newline that starts a non-blank line after a blank one is not enough: GPT-2's split makes "\n\n" at
# the end of a piece one pre-token, but "\n", "\n" inside the text.)
_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def pieces(text: str, size: int) -> Iterator[str]:
    """``text`` in pieces of about ``size`` characters, each cut after a newline between two
    non-space characters. BPE pre-tokenizers split there anyway, so encoding piece by piece gives
    the tokens of encoding the whole; a text with no such newline is one piece."""
    start = 0
    while start < len(text):
        m = _CUT.search(text, start + size)
        end = len(text) if m is None else m.end()
        yield text[start:end]
        start = end


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, nothing to fit, nothing unknown."""

    name = "byte"
    vocab_size = 256
    eos_id: Optional[int] = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as (n,) int64 through one array copy, without a Python int per token."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        # A model can emit a byte sequence that is not valid UTF-8 (half a character); show U+FFFD.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "byte-v1"

    def to_json(self) -> str:
        return json.dumps({"gradtune_tokenizer": "byte"})


class CharTokenizer:
    """One token per distinct character of the text it was built from, in code-point order."""

    name = "char"
    eos_id: Optional[int] = None

    def __init__(self, chars: Sequence[str]) -> None:
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        if len(self.index) != len(self.chars) or any(len(c) != 1 for c in self.chars):
            raise GradtuneError("char tokenizer: the vocabulary must be distinct single characters")
        self.vocab_size = len(self.chars)
        self._table: Optional[np.ndarray] = None

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise GradtuneError(
                f"char tokenizer: character {e.args[0]!r} is not in its vocabulary "
                f"of {self.vocab_size} characters (it was never in the training text)"
            ) from None

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as (n,) int64, vectorised: code points (UTF-32) through a lookup table."""
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        if self._table is None:  # code point -> id, -1 for characters outside the vocabulary
            self._table = np.full(max(map(ord, self.chars)) + 1, -1, dtype=np.int64)
            self._table[[ord(c) for c in self.chars]] = np.arange(self.vocab_size)
        ids = self._table[np.minimum(points, len(self._table) - 1)]
        ids[points >= len(self._table)] = -1
        if (ids < 0).any():
            self.encode(text[int(np.argmax(ids < 0))])  # raises, naming the character
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def fingerprint(self) -> str:
        return "char-v1:" + hashlib.sha256("".join(self.chars).encode("utf-8")).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps({"gradtune_tokenizer": "char", "chars": "".join(self.chars)})


# Names Hugging Face tokenizers commonly give the end-of-text token, most specific first.
_EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")


# ChatML as a Jinja chat template (transformers' ``apply_chat_template``, llama.cpp, Ollama):
# the template ``gradtune tokenizer train --chat-template chatml`` makes its markers for.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` loaded from a tokenizer.json file."""

    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        try:
            import tokenizers
        except ImportError:
            raise GradtuneError(
                f"tokenizer {path}: reading a tokenizer.json needs the tokenizers package (pip install tokenizers)"
            ) from None
        if not path.is_file():
            raise GradtuneError(
                f"tokenizer file not found: {path} (text.tokenizer is byte, char or a path to a tokenizer.json)"
            )
        self.raw = path.read_bytes()
        try:
            self.tok = tokenizers.Tokenizer.from_str(self.raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception for every parse error
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise GradtuneError(f"{path}: not a valid tokenizer.json ({first})") from None
        # A tokenizer.json may carry truncation/padding for a classifier (e.g. max_length 512);
        # a corpus is encoded whole, so both are switched off.
        self.tok.no_truncation()
        self.tok.no_padding()
        self.path = path
        self.name = f"hf:{path.name}"
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = next((i for i in map(self.tok.token_to_id, _EOS_NAMES) if i is not None), None)

    @property
    def chat_template(self) -> Optional[str]:
        """ChatML when both its markers are special tokens of this tokenizer (a tokenizer.json has
        no template of its own; exports write this one beside it), else None."""
        special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        return CHATML if all(m in special for m in CHATML_MARKERS) else None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as (n,) int64; a long text is cut into line-aligned pieces that the Rust side
        encodes in parallel (one long string would use one core). A tokenizer that marks the start
        of every input (a SentencePiece-style prefix space) gets one extra mark per 256K chars."""
        parts = self.tok.encode_batch(list(pieces(text, 1 << 18)), add_special_tokens=False)
        return np.fromiter((i for e in parts for i in e.ids), dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def fingerprint(self) -> str:
        return "hf-v1:" + hashlib.sha256(self.raw).hexdigest()[:16]

    def to_json(self) -> str:
        return self.raw.decode("utf-8")


def _from_json_file(path: Path) -> Tokenizer:
    """A saved tokenizer: gradtune's byte/char format, else a Hugging Face tokenizer.json."""
    try:
        head: Any = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GradtuneError(f"{path}: not a valid tokenizer.json (not JSON: {e})") from None
    kind = head.get("gradtune_tokenizer") if isinstance(head, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        if not isinstance(head.get("chars"), str) or not head["chars"]:
            raise GradtuneError(f"{path}: a char tokenizer needs a non-empty 'chars' string")
        return CharTokenizer(list(head["chars"]))
    if kind is not None:
        raise GradtuneError(f"{path}: unknown gradtune tokenizer kind {kind!r} (byte or char)")
    return HFTokenizer(path)


def load(spec: str, text: Optional[str] = None) -> Tokenizer:
    """``byte`` | ``char`` (built from ``text``) | path to a saved or Hugging Face tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "char":
        if text is None:
            raise GradtuneError("char tokenizer: needs the training text to build its vocabulary")
        if not text:
            raise GradtuneError("char tokenizer: the text is empty, so the vocabulary would be empty")
        return CharTokenizer.from_text(text)
    path = Path(spec).expanduser()
    if not path.is_file():
        # A FIFO is never opened (reading it would wait for a writer); a folder is named as one.
        what = " is a folder" if path.is_dir() else " is not a regular file" if path.exists() else ""
        raise GradtuneError(
            f"tokenizer file not found: {spec}{what} (text.tokenizer is byte, char or a path to a tokenizer.json)"
        )
    return _from_json_file(path)


def save(tokenizer: Tokenizer, path: Path | str) -> Path:
    """Write ``tokenizer`` as one JSON file (atomically); ``load(str(path))`` reads it back."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(tokenizer.to_json().encode("utf-8"))  # UTF-8 whatever the locale
    return path
