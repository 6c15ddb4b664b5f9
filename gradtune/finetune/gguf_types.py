"""GGUF weight types: which type each tensor is written in, and its bytes.

    gguf_types.tensor_type("blk.0.attn_q.weight", (64, 32), "q4_0", has_output=False)  # "q4_0"
    gguf_types.add_tensor(writer, "blk.0.attn_q.weight", w, "q4_0", has_output=False)

``--type`` names the file's type (``general.file_type``, gguf.LlamaFileType); each tensor's own
type follows llama.cpp's rules (``llama_tensor_get_type``, no importance matrix):
  * 1-D tensors (norm weights) stay float32 whatever the type, as llama.cpp's converter does;
  * f16 / bf16 / q8_0: every matrix in that type (``convert_hf_to_gguf.py --outtype``);
  * q4_0 / q4_1 / q5_0 / q5_1 (llama.cpp's ``llama-quantize`` types; its converter has none):
    every matrix in that type except the output projection (``output.weight``, or
    ``token_embd.weight`` when the head is tied to it, since it is then both), which
    llama-quantize writes Q6_K (q8_0 when its rows are not whole 256-value super-blocks);
  * the quantised types cut each row into blocks of 32 values (one scale per block, plus a
    minimum for the ``_1`` types); a matrix whose rows are not whole blocks is written f16, as
    llama-quantize falls back for such rows;
  * K-quants (q6_k, q5_k_m, q5_k_s, q4_k_m, q4_k_s; ``gguf_kquants`` writes the blocks): the
    mix ``llama-quantize`` gives (its ``llama_tensor_get_type``): the output projection Q6_K;
    q4_k_m / q5_k_m: attn_v and ffn_down Q6_K in the layers ``use_more_bits`` picks (the first
    and last eighth, every third between), q4_k_s: attn_v of layers 0-3 and ffn_down of the
    first eighth Q5_K; every other matrix Q4_K / Q5_K / Q6_K. A matrix whose rows are not whole
    256-value super-blocks falls back as llama-quantize's does: Q4_K -> q5_0, Q5_K -> q5_1,
    Q6_K (and the output projection) -> q8_0, then f16 for rows not whole 32-value blocks.
    (llama.cpp's extra rules for 70B models, 8-expert models and Falcon are not ours to meet.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gradtune.finetune import gguf_kquants
from gradtune.runtime.errors import GradtuneError

# file type (gguf.LlamaFileType value) of each --type; the order is the help's: exact to smallest, roughly
FILE_TYPE = {
    "f32": 0,
    "f16": 1,
    "bf16": 32,
    "q8_0": 7,
    "q6_k": 18,
    "q5_k_m": 17,
    "q5_k_s": 16,
    "q5_1": 9,
    "q5_0": 8,
    "q4_k_m": 15,
    "q4_k_s": 14,
    "q4_1": 3,
    "q4_0": 2,
}
TYPES = tuple(FILE_TYPE)
BLOCK = 32  # values per block of the q*_0 / q*_1 types (gguf.GGML_QUANT_SIZES)
SMALL = ("q5_1", "q5_0", "q4_1", "q4_0")  # the llama-quantize types, whose output projection is Q6_K / q8_0
KQUANT = {"q6_k": "q6_k", "q5_k_m": "q5_k", "q5_k_s": "q5_k", "q4_k_m": "q4_k", "q4_k_s": "q4_k"}  # file -> base
ALIAS = {"q4_k": "q4_k_m", "q5_k": "q5_k_m"}  # llama-quantize's names for its default 4/5-bit K mixes
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}  # a K-quant's type for rows not whole super-blocks


def check_type(qtype: str, where: str = "GGUF type") -> str:
    """``qtype`` lower-cased if it is one of TYPES (or llama-quantize's alias of one), else one line naming them."""
    if qtype.lower() in TYPES or qtype.lower() in ALIAS:
        return ALIAS.get(qtype.lower(), qtype.lower())
    hint = " (other K-quant mixes: llama.cpp's llama-quantize on an f16 export)" if "k" in qtype.lower() else ""
    raise GradtuneError(f"{where} {qtype!r} is not one of {', '.join(TYPES)}{hint}")


def tensor_type(name: str, shape: tuple[int, ...], qtype: str, has_output: bool, n_layer: int = 0) -> str:
    """The type tensor ``name`` of ``shape`` is written in, in a ``qtype`` file; ``has_output``:
    the file has an ``output.weight`` (an untied head); ``n_layer``: its block count (K-quant mixes)."""
    if len(shape) == 1 or qtype == "f32":
        return "f32"
    if qtype in ("f16", "bf16"):
        return qtype
    if qtype in KQUANT:
        kind = _k_mix(name, qtype, has_output, n_layer)
        if shape[-1] % gguf_kquants.QK:
            kind = FALLBACK[kind]
        return kind if shape[-1] % BLOCK == 0 else "f16"
    if shape[-1] % BLOCK:
        return "f16"
    if qtype in SMALL and (name == "output.weight" or (name == "token_embd.weight" and not has_output)):
        return "q8_0" if shape[-1] % gguf_kquants.QK else "q6_k"
    return qtype


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's pick of the layers given more bits: the first and last eighth, every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _k_mix(name: str, qtype: str, has_output: bool, n_layer: int) -> str:
    """The K-quant a ``qtype`` file gives matrix ``name`` (rows whole super-blocks)."""
    base = KQUANT[qtype]
    if name == "output.weight" or (name == "token_embd.weight" and not has_output):
        return "q6_k"
    parts = name.split(".")
    if parts[0] != "blk" or parts[2] not in ("attn_v", "ffn_down"):
        return base
    i = int(parts[1])
    if qtype in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n_layer):
        return "q6_k"
    if qtype == "q4_k_s" and (i < 4 if parts[2] == "attn_v" else i < n_layer // 8):
        return "q5_k"
    return base


def add_tensor(writer: Any, name: str, t: torch.Tensor, qtype: str, has_output: bool, n_layer: int = 0) -> None:
    """Add float32 ``t`` to the gguf.GGUFWriter in the type ``tensor_type`` chooses."""
    import gguf  # lazy: optional dependency, as in gpt_gguf

    arr = t.numpy()
    kind = tensor_type(name, arr.shape, qtype, has_output, n_layer)
    if kind == "f32":
        writer.add_tensor(name, arr)
    elif kind == "f16":
        writer.add_tensor(name, arr.astype(np.float16))
    else:  # bytes per row: (rows, cols * 2) for bf16, (rows, cols / 32 * block bytes) for the others
        raw = gguf.GGMLQuantizationType[kind.upper()]
        data = gguf_kquants.quantize(arr, kind) if kind in gguf_kquants.BYTES else gguf.quants.quantize(arr, raw)
        writer.add_tensor(name, data, raw_dtype=raw)
