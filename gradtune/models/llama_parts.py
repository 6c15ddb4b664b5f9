"""Our llama block's fused matrices and the parts other formats keep them in.

Ours fuses q|k|v into ``attn.c_attn`` and SwiGLU's gate|up into ``mlp.c_fc`` (one matmul each);
Hugging Face (names inside ``model.layers.i.``) and GGUF (llama.cpp's, inside ``blk.i.``) keep
the parts, which concatenate along rows, in this order, into ours. One table for both formats,
so a loader, a saver and the GGUF exporter cannot disagree on a name or an order.
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
HF_PARTS = {ours: [hf for hf, _ in parts] for ours, parts in PARTS.items()}
GGUF_PARTS = {ours: [gguf for _, gguf in parts] for ours, parts in PARTS.items()}


def part_rows(cfg: GPTConfig) -> dict[str, list[int]]:
    """Rows of each part of the fused matrices (the split back into parts): q, k, v are heads x
    head_dim; gate and up the MLP width."""
    q, kv, hidden = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.intermediate_size
    return {"attn.c_attn.weight": [q, kv, kv], "mlp.c_fc.weight": [hidden, hidden]}
