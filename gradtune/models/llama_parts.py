"""Our llama block's fused matrices and the parts other formats keep them in.

Ours fuses q|k|v into ``attn.c_attn`` and SwiGLU's gate|up into ``mlp.c_fc`` (one matmul each);
Hugging Face (names inside ``model.layers.i.``) and GGUF (llama.cpp's, inside ``blk.i.``) keep
the parts, which concatenate along rows, in this order, into ours. One table for both formats,
so a loader, a saver and the GGUF exporter cannot disagree on a name or an order.

A llama block with ``gpt.qk_norm`` (an RMSNorm over each head's q and k, before rotary) is Qwen3's
block: transformers' ``Qwen3ForCausalLM`` and llama.cpp's ``qwen3`` architecture hold the two norm
weights under the names of ``QK_NORM_PARTS``, and differ from Llama in nothing else we write (the
MLP, norms, rotary and grouped heads are the same; llama.cpp runs qwen3's rotary on HF's
"rotate half" pairs, so its q/k rows are not permuted as llama's are).
"""

from __future__ import annotations

from gradtune.models.gpt import GPTConfig

PARTS: dict[str, list[tuple[str, str]]] = {  # ours (inside transformer.h.i.) -> [(HF part, GGUF part)]
    "ln_1.weight": [("input_layernorm.weight", "attn_norm")],
    "ln_2.weight": [("post_attention_layernorm.weight", "ffn_norm")],
    "attn.c_attn.weight": [
        ("self_attn.q_proj.weight", "attn_q"),
        ("self_attn.k_proj.weight", "attn_k"),
        ("self_attn.v_proj.weight", "attn_v"),
    ],
    "attn.c_proj.weight": [("self_attn.o_proj.weight", "attn_output")],
    "mlp.c_fc.weight": [("mlp.gate_proj.weight", "ffn_gate"), ("mlp.up_proj.weight", "ffn_up")],
    "mlp.c_proj.weight": [("mlp.down_proj.weight", "ffn_down")],
}
QK_NORM_PARTS: dict[str, list[tuple[str, str]]] = {
    "attn.q_norm.weight": [("self_attn.q_norm.weight", "attn_q_norm")],
    "attn.k_norm.weight": [("self_attn.k_norm.weight", "attn_k_norm")],
}
# (HF model_type, HF class, GGUF architecture) of a llama block without / with q/k norms
ARCH = {False: ("llama", "LlamaForCausalLM", "llama"), True: ("qwen3", "Qwen3ForCausalLM", "qwen3")}


def _parts(cfg: GPTConfig, side: int) -> dict[str, list[str]]:
    """Ours -> one format's parts (side 0: HF, 1: GGUF), the q/k norms where ``cfg`` has them."""
    table = {**PARTS, **QK_NORM_PARTS} if cfg.qk_norm else PARTS
    return {ours: [names[side] for names in parts] for ours, parts in table.items()}


def hf_parts(cfg: GPTConfig) -> dict[str, list[str]]:
    return _parts(cfg, 0)


def gguf_parts(cfg: GPTConfig) -> dict[str, list[str]]:
    return _parts(cfg, 1)


def part_rows(cfg: GPTConfig) -> dict[str, list[int]]:
    """Rows of each part of the fused matrices (the split back into parts): q, k, v are heads x
    head_dim; gate and up the MLP width."""
    q, kv, hidden = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.intermediate_size
    return {"attn.c_attn.weight": [q, kv, kv], "mlp.c_fc.weight": [hidden, hidden]}
