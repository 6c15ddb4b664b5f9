"""Pretrained models and tokenizers from local files, through transformers; never a download.

A source is a local HF folder (config.json + *.safetensors + tokenizer files) or a ``.gguf``
file (llama.cpp format; transformers dequantises it to ``dtype`` on load). ``kind`` picks the
class: ``encoder`` -> AutoModel (the bare body, for our heads), ``causal_lm`` ->
AutoModelForCausalLM. transformers is imported inside the functions: heavy optional packages
(``gradtune[hf]``) load lazily, so the core installs and imports without them and only runs
that use a pretrained model pay their import time.

Before transformers sees a source, ``resolve`` checks what file headers alone can tell, so a
broken download is one line naming the file instead of a struct / Rust / numpy error from deep
inside a loader: a FIFO or device given as the model, a GGUF file shorter than its fixed header
or announcing more than it holds, a config.json that is not a JSON object, a .safetensors file
whose header is not one or whose tensors run past its end.
"""

from __future__ import annotations

import json
import math
import stat
import struct
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from gradtune.models import gguf_cache, hf_attention, loader_bars
from gradtune.models.dropout import swap_dropouts
from gradtune.models.onednn_linear import swap_linears
from gradtune.models.rms_norm_kernel import swap_rms_norms
from gradtune.runtime import collector
from gradtune.runtime.errors import InputError
from gradtune.runtime.json_object import parse_object

Kind = Literal["encoder", "causal_lm"]


class ModelSourceError(InputError):
    """The model source is not a loadable local folder or GGUF file."""


# What transformers and the gguf reader raise on a file they cannot parse: the message names the
# file; anything else is a bug and keeps its traceback.
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError, EOFError, struct.error)
GGUF_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata key/value count
MAX_HEADER = 100 << 20  # a safetensors JSON header beyond this is not one (real ones: KBs to a few MB)


def _special(path: Path) -> str:
    """'' for a regular file or a folder; else what the path is (a FIFO would block a reader)."""
    mode = path.stat().st_mode
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return ""
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"


def check_gguf(path: Path) -> None:
    """The fixed GGUF header is there and plausible. Without this a file shorter than its header
    fails deep inside the reader (struct.error, or a numpy reshape error) with no file named."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(GGUF_HEADER.size)
    if len(head) < 4 or head[:4] != b"GGUF":
        raise ModelSourceError(f"model file {str(path)!r} is not a GGUF file (it does not start with 'GGUF')")
    if len(head) < GGUF_HEADER.size:
        raise ModelSourceError(
            f"model file {str(path)!r} is truncated: {size} bytes, shorter than the {GGUF_HEADER.size}-byte GGUF header"
        )
    _, version, n_tensors, n_kv = GGUF_HEADER.unpack(head)
    if version not in (2, 3):
        raise ModelSourceError(f"model file {str(path)!r}: GGUF version {version} is not supported (2 or 3)")
    # Each metadata entry takes at least 12 bytes and each tensor description at least 24.
    if n_tensors == 0 or GGUF_HEADER.size + 12 * n_kv + 24 * n_tensors > size:
        raise ModelSourceError(
            f"model file {str(path)!r} is truncated or corrupt: its header announces "
            f"{n_tensors} tensors and {n_kv} metadata entries in {size} bytes"
        )


def safetensors_shapes(path: Path) -> dict[str, tuple[list[int], str]]:
    """tensor name -> (shape, dtype) from a .safetensors header, after checking the header is
    one and the file holds every byte it announces (a truncated download is caught here, with its
    name, instead of as a Rust deserialisation error)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, MAX_HEADER):
            raise ModelSourceError(f"weights file {str(path)!r} is not a safetensors file (no valid header)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        tensors = {k: (v["shape"], v["dtype"], v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"}
        end = max((t[2] for t in tensors.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise ModelSourceError(f"weights file {str(path)!r} is not a safetensors file (bad header)") from None
    if 8 + n + end > size:
        raise ModelSourceError(
            f"weights file {str(path)!r} is truncated: {size} bytes, the header announces {8 + n + end}"
        )
    return {k: (shape, dtype) for k, (shape, dtype, _) in tensors.items()}


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json as a dict; a file that is not a JSON object is one clear error."""
    path = folder / "config.json"
    return parse_object(path.read_bytes(), str(path), ModelSourceError)


def parameter_count(source: str | Path) -> int:
    """Number of weights in a model source, from file headers only (nothing is loaded). A GGUF
    file's tensors are quantised (~4.5 bits each for Q4_1): counted as at least one per byte."""
    folder, gguf = resolve(source)
    if gguf:
        return (folder / gguf).stat().st_size
    return sum(
        math.prod(shape) for f in sorted(folder.glob("*.safetensors")) for shape, _ in safetensors_shapes(f).values()
    )


def resolve(source: str | Path) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a local folder or .gguf file, their headers checked;
    else ModelSourceError."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelSourceError(
            f"model {str(source)!r} is not a local folder or .gguf file (gradtune does not download from the Hub)"
        )
    special = _special(path)
    if special:
        raise ModelSourceError(f"model {str(source)!r} is {special}, not a model folder or .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(
                f"model file {str(path)!r} is not a .gguf file; give a folder "
                f"with config.json and *.safetensors, or a .gguf file"
            )
        check_gguf(path)
        return path.parent, path.name
    ggufs = sorted(path.glob("*.gguf"))
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        if len(ggufs) == 1:
            check_gguf(ggufs[0])
            return path, ggufs[0].name
        pickled = (
            " (pytorch_model.bin is pickle, which gradtune does not load: convert it to safetensors)"
            if (path / "pytorch_model.bin").exists()
            else ""
        )
        raise ModelSourceError(
            f"model folder {str(path)!r} has no weights: expected *.safetensors or one .gguf file{pickled}"
        )
    if not (path / "config.json").exists():
        raise ModelSourceError(f"model folder {str(path)!r} has no config.json")
    read_config(path)
    for w in weights:
        safetensors_shapes(w)
    return path, None


@collector.paused()  # transformers' import and the model's modules: no garbage
def load_model(source: str | Path, kind: Kind = "causal_lm", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The pretrained model on the CPU, in train mode (dropout on, as the loop expects). Weights
    read from safetensors (a folder, or a .gguf's converted copy) are views of the file's memory
    map until something writes them: see ``own_weights``."""
    from transformers import AutoModel, AutoModelForCausalLM  # lazy: heavy import
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load buries gradtune's one-line output

    if kind not in ("encoder", "causal_lm"):
        raise InputError(f"model kind must be 'encoder' or 'causal_lm', got {kind!r}")
    folder, gguf = resolve(source)
    cls = AutoModel if kind == "encoder" else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True, "use_safetensors": True}
    converted = gguf_cache.cached(folder / gguf, f"{kind}-model") if gguf else None
    if converted:  # a .gguf converted by an earlier load (models/gguf_cache.py)
        folder = converted
    elif gguf:
        kwargs["gguf_file"] = gguf
        del kwargs["use_safetensors"]
    try:
        with loader_bars.terminal_only():  # transformers' GGUF conversion bar: not in a log file
            model = cls.from_pretrained(str(folder), **kwargs)
    except LOAD_ERRORS as e:  # transformers' errors for a bad folder or file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSourceError(f"cannot load model from {str(source)!r}: {first}") from e
    if gguf and not converted:  # transformers read the .gguf itself
        gguf_cache.unmark(model)
        if dtype == torch.float32:
            nbytes = sum(p.numel() * 4 for p in model.parameters())
            gguf_cache.store(folder / gguf, f"{kind}-model", lambda d: gguf_cache.save_model(model, d), nbytes)
    fast_dropout(model)
    swap_linears(model)  # float32 linears through oneDNN where the CPU is AMD (models/onednn_linear.py)
    swap_rms_norms(model)  # Llama-family RMSNorms in one C pass each way (models/rms_norm_kernel.py)
    contiguous_head(model)
    return model.train()


def own_weights(model: nn.Module) -> None:
    """Every parameter in memory of the process's own, none a view of a file's memory map. A
    quantised base needs it: once its linear layers are replaced (a GGUF's blocks are read from
    the .gguf, so the converted copy's float layers are never touched), the tensors that stay
    float (the tied embedding, norms) would keep the whole mapping alive, and every page of it
    that was read resident."""
    with torch.no_grad():
        for p in model.parameters():  # tied weights are one Parameter: cloned once, still tied
            p.data = p.data.clone()


def contiguous_head(model: nn.Module) -> None:
    """The output head's input made contiguous. A causal LM cut to its last K positions
    (``logits_to_keep``, objectives/logits.py) hands its head the slice hidden[:, -K:] (B, K, D),
    which cannot be viewed as (B*K, D); with the head's weight frozen (LoRA) torch's matmul then
    runs a batched product against the (V, D) weight expanded B times, forward and back, at a
    fraction of the speed of one (B*K, D) x (D, V) product (V ~ 50k: the largest matmul of a
    small model's step). The copy is B*K*D floats."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Module):
        head.register_forward_pre_hook(_contiguous_input)


def _contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def fast_dropout(model: nn.Module) -> None:
    """Dropout with the cheap CPU mask (models/dropout.py) in the model's modules and, where the
    model runs transformers' SDPA, on its attention probabilities (models/hf_attention.py).
    Numerics without dropout (eval, generation) are transformers' own."""
    swap_dropouts(model)
    if getattr(model.config, "_attn_implementation", None) == "sdpa" and model._can_set_attn_implementation():
        model.set_attn_implementation(hf_attention.register())


@collector.paused()  # transformers' import and the model's modules: no garbage
def load_tokenizer(source: str | Path, weights: bool = True) -> Any:
    """The tokenizer stored with the model (tokenizer.json / GGUF metadata), right padding.
    ``weights=False``: a folder holding only a saved tokenizer (a run's ``tokenizer/``)."""
    from transformers import AutoTokenizer  # lazy

    folder, gguf = resolve(source) if weights else (Path(source), None)
    kwargs: dict[str, Any] = {"local_files_only": True}
    converted = gguf_cache.cached(folder / gguf, "tokenizer") if gguf else None
    if converted:
        folder = converted
    elif gguf:
        kwargs["gguf_file"] = gguf
    try:
        with loader_bars.terminal_only():
            tok = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except LOAD_ERRORS as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSourceError(f"cannot load tokenizer from {str(source)!r}: {first}") from e
    if gguf and not converted:
        gguf_cache.store(folder / gguf, "tokenizer", lambda d: tok.save_pretrained(str(d)))
    tok.padding_side = "right"  # labels and masks assume real tokens first
    return tok


def check_vocab(model: nn.Module, tokenizer: Any) -> None:
    """A tokenizer with more ids than the embedding has rows would index out of range."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelSourceError(
            f"tokenizer has {len(tokenizer)} tokens but the model's embedding "
            f"has {rows} rows: tokenizer and model do not belong together"
        )


def load(source: str | Path, kind: Kind = "causal_lm", dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(model, tokenizer), checked to belong together."""
    model, tokenizer = load_model(source, kind, dtype), load_tokenizer(source)
    check_vocab(model, tokenizer)
    return model, tokenizer
