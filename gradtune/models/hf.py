"""Pretrained models and tokenizers from local files, through transformers; never a download.

A source is a local HF folder (config.json + *.safetensors + tokenizer files) or a ``.gguf``
file (llama.cpp format; transformers dequantises it to ``dtype`` on load). ``kind`` picks the
class: ``encoder`` -> AutoModel (the bare body, for our heads), ``causal_lm`` ->
AutoModelForCausalLM. transformers is imported inside the functions: heavy optional packages
(``gradtune[hf]``) load lazily, so the core installs and imports without them and only runs
that use a pretrained model pay their import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from gradtune.runtime.errors import InputError

Kind = Literal["encoder", "causal_lm"]


class ModelSourceError(InputError):
    """The model source is not a loadable local folder or GGUF file."""


def resolve(source: str | Path) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a local folder or .gguf file; else ModelSourceError."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelSourceError(f"model {str(source)!r} is not a local folder or .gguf file "
                               f"(gradtune does not download from the Hub)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(f"model file {str(path)!r} is not a .gguf file; give a folder "
                                   f"with config.json and *.safetensors, or a .gguf file")
        return path.parent, path.name
    ggufs = sorted(path.glob("*.gguf"))
    if not any(path.glob("*.safetensors")):
        if len(ggufs) == 1:
            return path, ggufs[0].name
        pickled = " (pytorch_model.bin is pickle, which gradtune does not load: convert it " \
                  "to safetensors)" if (path / "pytorch_model.bin").exists() else ""
        raise ModelSourceError(f"model folder {str(path)!r} has no weights: expected "
                               f"*.safetensors or one .gguf file{pickled}")
    if not (path / "config.json").exists():
        raise ModelSourceError(f"model folder {str(path)!r} has no config.json")
    return path, None


def load_model(source: str | Path, kind: Kind = "causal_lm",
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """The pretrained model on the CPU, in train mode (dropout on, as the loop expects)."""
    from transformers import AutoModel, AutoModelForCausalLM  # lazy: heavy import
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load buries gradtune's one-line output

    if kind not in ("encoder", "causal_lm"):
        raise InputError(f"model kind must be 'encoder' or 'causal_lm', got {kind!r}")
    folder, gguf = resolve(source)
    cls = AutoModel if kind == "encoder" else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if gguf:
        kwargs["gguf_file"] = gguf
    else:
        kwargs["use_safetensors"] = True
    try:
        model = cls.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError) as e:  # transformers' errors for a bad folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSourceError(f"cannot load model from {str(source)!r}: {first}") from e
    return model.train()


def load_tokenizer(source: str | Path, weights: bool = True) -> Any:
    """The tokenizer stored with the model (tokenizer.json / GGUF metadata), right padding.
    ``weights=False``: a folder holding only a saved tokenizer (a run's ``tokenizer/``)."""
    from transformers import AutoTokenizer  # lazy

    folder, gguf = resolve(source) if weights else (Path(source), None)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSourceError(f"cannot load tokenizer from {str(source)!r}: {first}") from e
    tok.padding_side = "right"  # labels and masks assume real tokens first
    return tok


def check_vocab(model: nn.Module, tokenizer: Any) -> None:
    """A tokenizer with more ids than the embedding has rows would index out of range."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelSourceError(f"tokenizer has {len(tokenizer)} tokens but the model's embedding "
                               f"has {rows} rows: tokenizer and model do not belong together")


def load(source: str | Path, kind: Kind = "causal_lm",
         dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(model, tokenizer), checked to belong together."""
    model, tokenizer = load_model(source, kind, dtype), load_tokenizer(source)
    check_vocab(model, tokenizer)
    return model, tokenizer
