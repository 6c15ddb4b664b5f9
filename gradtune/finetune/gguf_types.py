"""GGUF weight types: which type each tensor is written in, and its bytes.

    gguf_types.tensor_type("blk.0.attn_q.weight", (64, 32), "q4_0", has_output=False)  # "q4_0"
    gguf_types.add_tensor(writer, "blk.0.attn_q.weight", w, "q4_0", has_output=False)

``--type`` names the file's type (``general.file_type``, gguf.LlamaFileType); each tensor's own
type follows llama.cpp's rules as far as the ``gguf`` package's numpy quantizers reach:
  * 1-D tensors (norm weights) stay float32 whatever the type, as llama.cpp's converter does;
  * f16 / bf16 / q8_0: every matrix in that type (``convert_hf_to_gguf.py --outtype``);
  * q4_0 / q4_1 / q5_0 / q5_1 (llama.cpp's ``llama-quantize`` types; its converter has none):
    every matrix in that type except the output projection (``output.weight``, or
    ``token_embd.weight`` when the head is tied to it, since it is then both). llama-quantize
    writes that one Q6_K, a K-quant no numpy quantizer writes; it is written q8_0 here, the
    nearest type above it, because a 4/5-bit output projection costs the most accuracy;
  * the quantised types cut each row into blocks of 32 values (one scale per block, plus a
    minimum for the ``_1`` types); a matrix whose rows are not whole blocks is written f16, as
    llama-quantize falls back for such rows.
K-quants (Q4_K_M, Q5_K_M, ...) need llama.cpp's own quantizer: ``llama-quantize`` on an f16
export.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gradtune.runtime.errors import GradtuneError

# file type (gguf.LlamaFileType value) of each --type; the order is the help's: exact to smallest
FILE_TYPE = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q5_1": 9, "q5_0": 8, "q4_1": 3, "q4_0": 2}
TYPES = tuple(FILE_TYPE)
BLOCK = 32  # values per block of the q*_0 / q*_1 types (gguf.GGML_QUANT_SIZES)
SMALL = ("q5_1", "q5_0", "q4_1", "q4_0")  # the llama-quantize types, whose output projection is kept q8_0


def check_type(qtype: str, where: str = "GGUF type") -> str:
    """``qtype`` lower-cased if it is one of TYPES, else one line naming them."""
    if qtype.lower() in TYPES:
        return qtype.lower()
    hint = " (K-quants: llama.cpp's llama-quantize on an f16 export)" if "k" in qtype.lower() else ""
    raise GradtuneError(f"{where} {qtype!r} is not one of {', '.join(TYPES)}{hint}")


def tensor_type(name: str, shape: tuple[int, ...], qtype: str, has_output: bool) -> str:
    """The type tensor ``name`` of ``shape`` is written in, in a ``qtype`` file; ``has_output``:
    the file has an ``output.weight`` (an untied head)."""
    if len(shape) == 1 or qtype == "f32":
        return "f32"
    if qtype in ("f16", "bf16"):
        return qtype
    if shape[-1] % BLOCK:
        return "f16"
    if qtype in SMALL and (name == "output.weight" or (name == "token_embd.weight" and not has_output)):
        return "q8_0"
    return qtype


def add_tensor(writer: Any, name: str, t: torch.Tensor, qtype: str, has_output: bool) -> None:
    """Add float32 ``t`` to the gguf.GGUFWriter in the type ``tensor_type`` chooses."""
    import gguf  # lazy: optional dependency, as in gpt_gguf

    arr = t.numpy()
    kind = tensor_type(name, arr.shape, qtype, has_output)
    if kind == "f32":
        writer.add_tensor(name, arr)
    elif kind == "f16":
        writer.add_tensor(name, arr.astype(np.float16))
    else:  # bytes per row: (rows, cols * 2) for bf16, (rows, cols / 32 * block bytes) for the others
        raw = gguf.GGMLQuantizationType[kind.upper()]
        writer.add_tensor(name, gguf.quants.quantize(arr, raw), raw_dtype=raw)
