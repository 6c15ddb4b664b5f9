"""Pretrained weights in and out of our GPT: local Hugging Face folders and GGUF files.

  load_pretrained(path)      folder with config.json + *.safetensors (sharded or not), or a .gguf
  save_hf(model, folder)     our model -> config.json + model.safetensors that transformers loads

Never downloads: a name that is not a local path is a ``PretrainedPathError``. Never unpickles:
``pytorch_model.bin`` folders are refused (convert them to safetensors first).

Name mapping. Ours follows nanoGPT; q/k/v (and SwiGLU's gate/up) are fused into one matrix:
  gpt2 (HF Conv1D stores weights (in, out): transposed on the way in and out)
    transformer.h.i.attn.c_attn  <- transformer.h.i.attn.c_attn   (already fused in HF)
  llama
    transformer.wte              <- model.embed_tokens
    transformer.h.i.ln_1 / ln_2  <- model.layers.i.input_layernorm / post_attention_layernorm
    transformer.h.i.attn.c_attn  <- cat(self_attn.q_proj, k_proj, v_proj)
    transformer.h.i.attn.c_proj  <- self_attn.o_proj
    transformer.h.i.mlp.c_fc     <- cat(mlp.gate_proj, mlp.up_proj)
    transformer.h.i.mlp.c_proj   <- mlp.down_proj
    transformer.ln_f             <- model.norm
  qwen3 (a llama block with q/k norms: ``gpt.qk_norm``; models/llama_parts.py)
    transformer.h.i.attn.q_norm / k_norm  <- self_attn.q_norm / k_norm
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gradtune.models.gpt import GPT, GPTConfig
from gradtune.models.gpt_gguf import load_gguf  # imports the gguf package only when called
from gradtune.models.llama_parts import ARCH, hf_parts, part_rows

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# The sizes every config.json gives, per family: our GPTConfig field -> its key (read and written).
HF_SIZES = {
    "gpt2": {
        "vocab_size": "vocab_size",
        "block_size": "n_positions",
        "n_layer": "n_layer",
        "n_head": "n_head",
        "n_embd": "n_embd",
    },
    "llama": {
        "vocab_size": "vocab_size",
        "block_size": "max_position_embeddings",
        "n_layer": "num_hidden_layers",
        "n_head": "num_attention_heads",
        "n_embd": "hidden_size",
        "intermediate_size": "intermediate_size",
    },
}


class PretrainedPathError(ValueError):
    """The model name is not a local folder / .gguf file (we never download)."""


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32) -> GPT:
    """A GPT from a local HF folder (config.json + safetensors) or a local .gguf file."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return load_gguf(p, dtype=dtype)
    if not (p.is_dir() and (p / "config.json").is_file()):
        raise PretrainedPathError(
            f"{str(path)!r} is not a local folder with config.json nor a local .gguf file; "
            "gradtune never downloads: pass a path on disk"
        )
    tensors = read_safetensors(p)
    cfg = config_from_hf(json.loads((p / "config.json").read_text()))
    return GPT.from_state_dict(cfg, state_dict_from_hf(tensors, cfg)).to(dtype)


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder: model.safetensors or the shards listed in its index."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        found = sorted(f.name for f in folder.iterdir())
        raise PretrainedPathError(
            f"no model.safetensors(.index.json) in {folder} (found {found}); "
            "pickled .bin checkpoints are not loaded: convert them to safetensors"
        )
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_file(folder / shard))
    return tensors


def config_from_hf(c: dict) -> GPTConfig:
    """Translate a transformers config.json dict; unsupported variants fail loudly."""
    kind = c.get("model_type")
    if kind == "gpt2":
        if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported GPT-2 activation {c['activation_function']!r}")
        if c.get("scale_attn_by_inverse_layer_idx") or c.get("reorder_and_upcast_attn"):
            raise ValueError(
                "GPT-2 attention variants scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported"
            )
        return GPTConfig(
            family="gpt2",
            **sizes_from_hf(c, "gpt2"),
            intermediate_size=c.get("n_inner") or 4 * c["n_embd"],
            norm_eps=c.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=c.get("tie_word_embeddings", True),
        )
    if kind in ("llama", "qwen3"):
        return llama_config_from_hf(c, qk_norm=kind == "qwen3")
    raise ValueError(f"model_type {kind!r} is not supported; gradtune's GPT loads 'gpt2', 'llama' and 'qwen3'")


def llama_config_from_hf(c: dict, qk_norm: bool) -> GPTConfig:
    """A llama (or qwen3: the same block with q/k norms) config.json dict; variants we do not
    compute are refused."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"rope scaling {rope} is not supported (plain rotary only)")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise ValueError(f"{c.get('model_type')} with attention_bias / mlp_bias is not supported")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported {c.get('model_type')} activation {c['hidden_act']!r}")
    if c.get("use_sliding_window") or any(t != "full_attention" for t in c.get("layer_types") or ()):
        raise ValueError("sliding-window attention layers are not supported (full causal attention only)")
    return GPTConfig(
        family="llama",
        **sizes_from_hf(c, "llama"),
        n_kv_head=c.get("num_key_value_heads") or c["num_attention_heads"],
        head_dim=c.get("head_dim"),
        norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
        tie_embeddings=c.get("tie_word_embeddings", False),
        qk_norm=qk_norm,
    )


def sizes_from_hf(c: dict, family: str) -> dict[str, int]:
    """Our size fields from a config.json dict (``HF_SIZES``)."""
    return {ours: c[theirs] for ours, theirs in HF_SIZES[family].items()}


def config_to_hf(cfg: GPTConfig) -> dict:
    """The config.json transformers needs to rebuild the same network."""
    sizes = {theirs: getattr(cfg, ours) for ours, theirs in HF_SIZES[cfg.family].items()}
    if cfg.family == "gpt2":
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            **sizes,
            "n_inner": cfg.intermediate_size,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
        }
    model_type, hf_class, _ = ARCH[cfg.qk_norm]
    window = {"use_sliding_window": False} if cfg.qk_norm else {}  # qwen3's own switch: full attention
    return {
        "model_type": model_type,
        "architectures": [hf_class],
        **sizes,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": cfg.dropout,
        **window,
    }


def state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """HF tensor names/layouts -> ours (see module docstring). Missing lm_head = tied."""
    out: dict[str, torch.Tensor] = {}
    if cfg.family == "gpt2":
        for name, t in sd.items():
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # old checkpoints saved the causal mask as a buffer
            ours = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
            out[ours] = t.t() if ours.endswith(CONV1D) else t
    else:
        out["transformer.wte.weight"] = sd["model.embed_tokens.weight"]
        out["transformer.ln_f.weight"] = sd["model.norm.weight"]
        table = hf_parts(cfg)
        for i in range(cfg.n_layer):
            for ours, parts in table.items():
                out[f"transformer.h.{i}.{ours}"] = torch.cat([sd[f"model.layers.{i}.{p}"] for p in parts])
        if "lm_head.weight" in sd:
            out["lm_head.weight"] = sd["lm_head.weight"]
    if cfg.tie_embeddings or "lm_head.weight" not in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def state_dict_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """Ours -> HF names/layouts; contiguous copies, tied lm_head left out (HF re-ties it)."""
    cfg = model.config
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    if cfg.family == "gpt2":
        for name, t in sd.items():
            out[name] = t.t() if name.endswith(CONV1D) else t
    else:
        out["model.embed_tokens.weight"] = sd["transformer.wte.weight"]
        out["model.norm.weight"] = sd["transformer.ln_f.weight"]
        rows, table = part_rows(cfg), hf_parts(cfg)
        for i in range(cfg.n_layer):
            for ours, parts in table.items():
                t = sd[f"transformer.h.{i}.{ours}"]
                pieces = t.split(rows[ours]) if len(parts) > 1 else [t]
                for p, piece in zip(parts, pieces):
                    out[f"model.layers.{i}.{p}"] = piece
        out["lm_head.weight"] = sd["lm_head.weight"]
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def save_hf(model: GPT, folder: str | Path) -> Path:
    """Write config.json + model.safetensors that ``AutoModelForCausalLM.from_pretrained`` loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = config_to_hf(model.config)
    hf_config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(state_dict_to_hf(model), folder / "model.safetensors", metadata={"format": "pt"})
    return folder
