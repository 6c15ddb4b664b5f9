"""GGUF (llama.cpp's format) -> our GPT: hyperparameters from metadata, weights dequantised.

Every quantised tensor (Q4_1, Q8_0, ...) is expanded to float32 by ``gguf.quants.dequantize``;
the model then trains or fine-tunes in full precision. Two layout facts of llama.cpp exports:
  * llama q/k rows are permuted from HF's "rotate half" rotary layout to GGML's interleaved
    pairs; we undo it so our rotary (HF layout) applies (``unpermute_rotary``); qwen3's (llama's
    block with q/k norms, read as ``gpt.qk_norm``) are in HF's layout already.
  * GPT-2's Conv1D weights were already transposed to (out, in) by the converter.
No ``output.weight`` tensor means the lm_head is tied to ``token_embd``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gradtune.models.gguf_index import read_index
from gradtune.models.gpt import GPT, GPTConfig
from gradtune.models.hf import LOAD_ERRORS, ModelSourceError, check_gguf
from gradtune.models.llama_parts import gguf_parts

GPT2_BLOCK = {  # ours (transformer.h.i.) -> GGUF (blk.i.), one tensor each
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert_hf_to_gguf ``permute``: per head, rows were reordered
    from [x0..x_{hs/2-1}, y0..] (rotate-half) to [x0, y0, x1, y1, ...] (interleaved). w (nh*hs, C)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata key -> python value, tensor name -> float32 tensor) of a .gguf file."""
    import gguf  # lazy: optional dependency

    check_gguf(Path(path))  # a file shorter than its header is named, not a struct.error
    try:
        index = read_index(path)
    except LOAD_ERRORS as e:  # past the header: truncated or corrupt metadata / tensor table
        raise ModelSourceError(f"model file {str(path)!r} is truncated or corrupt ({type(e).__name__}: {e})") from None
    vocabulary = ("tokens", "scores", "token_type", "merges")  # large and not needed for the network
    meta = {k: v for k, v in index.fields.items() if not (k.startswith("tokenizer.ggml.") and k.endswith(vocabulary))}
    tensors = {}
    for t in index.tensors:
        # data is in numpy (rows, cols) order, i.e. torch's (out, in); quantised types come as
        # raw bytes per row that dequantize expands.
        arr = gguf.quants.dequantize(index.data(t), gguf.GGMLQuantizationType(t.type_id)).astype(np.float32, copy=False)
        if not arr.flags.writeable:  # float tensors are views of the read-only memory map
            arr = arr.copy()
        tensors[t.name] = torch.from_numpy(arr)
    return meta, tensors


def config_from_gguf(meta: dict, tensors: dict[str, torch.Tensor]) -> GPTConfig:
    arch = meta["general.architecture"]
    vocab_size = tensors["token_embd.weight"].shape[0]
    tied = "output.weight" not in tensors

    def get(key: str, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return value

    common = dict(
        vocab_size=vocab_size,
        block_size=get("context_length"),
        n_layer=get("block_count"),
        n_head=get("attention.head_count"),
        n_embd=get("embedding_length"),
        intermediate_size=get("feed_forward_length"),
        tie_embeddings=tied,
    )
    if arch == "gpt2":
        return GPTConfig(family="gpt2", norm_eps=get("attention.layer_norm_epsilon"), **common)
    if arch in ("llama", "qwen3"):  # qwen3: llama's block with q/k norms (models/llama_parts.py)
        if "rope_freqs.weight" in tensors or meta.get(f"{arch}.rope.scaling.type", "none") != "none":
            raise ValueError(f"GGUF {arch} with rope scaling (e.g. Llama 3.1) is not supported")
        head_dim = meta.get(f"{arch}.attention.key_length") or common["n_embd"] // common["n_head"]
        return GPTConfig(
            family="llama",
            n_kv_head=get("attention.head_count_kv", common["n_head"]),
            head_dim=head_dim,
            norm_eps=get("attention.layer_norm_rms_epsilon"),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            qk_norm=arch == "qwen3",
            **common,
        )
    raise ValueError(f"GGUF architecture {arch!r} is not supported; gradtune loads 'gpt2', 'llama' and 'qwen3'")


def state_dict_from_gguf(tensors: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    out = {"transformer.wte.weight": tensors["token_embd.weight"]}
    if cfg.family == "gpt2":
        out["transformer.wpe.weight"] = tensors["position_embd.weight"]
        out["transformer.ln_f.weight"] = tensors["output_norm.weight"]
        out["transformer.ln_f.bias"] = tensors["output_norm.bias"]
        for i in range(cfg.n_layer):
            for ours, theirs in GPT2_BLOCK.items():
                for kind in ("weight", "bias"):
                    out[f"transformer.h.{i}.{ours}.{kind}"] = tensors[f"blk.{i}.{theirs}.{kind}"]
    else:
        out["transformer.ln_f.weight"] = tensors["output_norm.weight"]
        table = gguf_parts(cfg)
        for i in range(cfg.n_layer):
            t = {p: tensors[f"blk.{i}.{p}.weight"] for parts in table.values() for p in parts}
            if not cfg.qk_norm:  # qwen3 keeps HF's rotary layout
                t["attn_q"] = unpermute_rotary(t["attn_q"], cfg.n_head)
                t["attn_k"] = unpermute_rotary(t["attn_k"], cfg.n_kv_head)
            for ours, parts in table.items():
                out[f"transformer.h.{i}.{ours}"] = torch.cat([t[p] for p in parts])
    out["lm_head.weight"] = out["transformer.wte.weight"] if cfg.tie_embeddings else tensors["output.weight"]
    return out


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> GPT:
    """A GPT from a local .gguf file, weights dequantised to float32 then cast to ``dtype``."""
    meta, tensors = read_gguf(path)
    cfg = config_from_gguf(meta, tensors)
    return GPT.from_state_dict(cfg, state_dict_from_gguf(tensors, cfg)).to(dtype)
