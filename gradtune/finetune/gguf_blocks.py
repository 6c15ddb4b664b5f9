"""A GGUF base's own quantised blocks, kept as they are in the file (no second rounding).

    blocks = read_blocks("SmolLM2-135M-Instruct.Q4_1.gguf", ["model.layers.0.self_attn.q_proj", ...])
    w = dequantize_blocks(b.kind, b.codes, b.scales, b.mins, n_in)   # == transformers' float32 weight

transformers dequantises a .gguf to float32 on load; re-quantising that (int8 / nf4) rounds weights
that were already rounded. For the llama.cpp block types below, the linear layers keep the file's
blocks instead, so the quantised base computes exactly what the float32 base computes. Layouts
(ggml, checked against ``gguf.quants.dequantize``), per block of ``QK`` = 32 consecutive weights
of a row:
  * Q4_0: f16 d, 16 bytes of 4-bit codes q; w = d * (q - 8). 18 bytes.
  * Q4_1: f16 d, f16 m, 16 bytes of codes; w = d * q + m. 20 bytes.
  * Q8_0: f16 d, 32 int8 q; w = d * q. 34 bytes.
In the 4-bit types byte j holds weight j in its low nibble and weight j + 16 in its high nibble.
Scales and minimums stay float16 as in the file (exact); they are widened to float32 per matmul.

llama.cpp permutes the rows of attn_q / attn_k for its rotary layout and transformers un-permutes
them on load: the same permutation is applied to the rows of blocks (a whole row is permuted, and
blocks run along rows, so codes and scales move together).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from gradtune.models.gguf_index import read_index
from gradtune.models.gpt_gguf import unpermute_rotary

QK = 32  # weights per block in Q4_0, Q4_1, Q8_0
# GGUF type name -> (our kind, bytes per block)
TYPES = {"Q4_0": ("q4_0", 18), "Q4_1": ("q4_1", 20), "Q8_0": ("q8_0", 34)}
BLOCK_KINDS = tuple(kind for kind, _ in TYPES.values())
# GGUF block tensor -> HF Llama module under model.layers.{i}
LLAMA_LINEAR = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass
class Blocks:
    """One linear weight W (out, in) as blocks: ``scales`` / ``mins`` float16 (out, in / 32);
    ``codes`` uint8 (out, in / 2) for the 4-bit kinds, int8 (out, in) for q8_0."""

    kind: str
    codes: torch.Tensor
    scales: torch.Tensor
    mins: Optional[torch.Tensor] = None


def split_blocks(kind: str, raw: np.ndarray) -> Blocks:
    """raw uint8 (rows, n_blocks * block bytes), as ``GGUFReader`` gives a tensor -> Blocks."""
    size = next(s for k, s in TYPES.values() if k == kind)
    b = np.ascontiguousarray(raw).reshape(raw.shape[0], -1, size)  # (rows, n_blocks, bytes)

    def half(at: int) -> torch.Tensor:  # the f16 at byte ``at`` of each block -> (rows, n_blocks)
        return torch.from_numpy(np.ascontiguousarray(b[..., at : at + 2]).view(np.float16)[..., 0].copy())

    start = 4 if kind == "q4_1" else 2
    codes = np.ascontiguousarray(b[..., start:]).reshape(raw.shape[0], -1)
    codes = codes.view(np.int8) if kind == "q8_0" else codes
    return Blocks(kind, torch.from_numpy(codes.copy()), half(0), half(2) if kind == "q4_1" else None)


def dequantize_blocks(
    kind: str,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: Optional[torch.Tensor],
    n_in: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W (out, n_in) in ``dtype``, computed in float32 in ggml's order (d * q, then + m)."""
    out, n_blocks = scales.shape
    if kind == "q8_0":
        values = codes.reshape(out, n_blocks, QK).to(torch.float32)
    else:
        q = codes.reshape(out, n_blocks, QK // 2)
        values = torch.cat([q & 15, q >> 4], dim=-1).to(torch.float32)  # (out, n_blocks, 32)
        if kind == "q4_0":
            values = values - 8
    w = values * scales.to(torch.float32)[..., None]
    if mins is not None:
        w = w + mins.to(torch.float32)[..., None]
    return w.reshape(out, -1)[:, :n_in].to(dtype)


def rotary_rows(rows: int, n_head: int) -> np.ndarray:
    """Index r -> the GGUF row that transformers' un-permutation puts at HF row r."""
    return unpermute_rotary(torch.arange(rows)[:, None], n_head)[:, 0].numpy()


def gguf_file(source: str | Path | None) -> Optional[Path]:
    """The .gguf file a model source names, or None (an HF folder, no source)."""
    if source is None:
        return None
    path = Path(source).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def read_blocks(path: str | Path, names: list[str]) -> dict[str, Blocks]:
    """Blocks of every module in ``names`` (HF Llama names, e.g. ``model.layers.3.mlp.up_proj``)
    whose GGUF tensor is Q4_0, Q4_1 or Q8_0; others (F16, F32, K-quants) and non-llama files are
    absent, for the caller to re-quantise."""
    index = read_index(path)
    arch = index.fields["general.architecture"]
    if arch != "llama":
        return {}
    heads = {"attn_q": index.fields["llama.attention.head_count"]}
    heads["attn_k"] = index.fields.get("llama.attention.head_count_kv", heads["attn_q"])
    wanted = set(names)
    out = {}
    for t in index.tensors:
        parts = t.name.split(".")  # blk.{i}.{tensor}.weight
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in LLAMA_LINEAR or t.type_name not in TYPES:
            continue
        name = f"model.layers.{parts[1]}.{LLAMA_LINEAR[parts[2]]}"
        if name not in wanted:
            continue
        raw = index.data(t)  # (rows = out, bytes), a view of the memory map
        if parts[2] in heads:
            raw = raw[rotary_rows(raw.shape[0], heads[parts[2]])]
        out[name] = split_blocks(TYPES[t.type_name][0], raw)
    return out
