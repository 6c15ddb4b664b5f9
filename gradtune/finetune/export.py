"""Export a fine-tuned model in the formats the ecosystem loads.

``save_adapter``: the LoRA factors as a PEFT adapter (adapter_config.json +
adapter_model.safetensors, keys ``base_model.model.<path>.lora_A.weight``), which
``peft.PeftModel.from_pretrained(base, dir)`` loads onto the same base model.
``save_merged``: the base model with every update folded in, as a plain HF folder
(``save_pretrained`` + tokenizer) that transformers loads with no gradtune or peft installed.
A head added by gradtune is not part of the HF model; both write it beside, as head.safetensors
+ head_config.json (``load_head`` reads it back).

Both refuse a destination that is a gradtune run folder or not empty (``runtime.outdir``), and
write into a temporary sibling renamed into place: never a half-written export, never an
overwritten model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gradtune.finetune.heads import EncoderWithHead
from gradtune.finetune.lora import LoRALinear, lora_layers
from gradtune.finetune.quantize import dequantized_state
from gradtune.models import loader_bars
from gradtune.runtime import outdir
from gradtune.runtime.errors import InputError


def hf_base(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model`` (the body under a gradtune head)."""
    return model.body if isinstance(model, EncoderWithHead) else model


def _target_modules(base: nn.Module, lora: dict[str, LoRALinear]) -> list[str]:
    """PEFT target_modules selecting exactly our LoRA layers, as readable as possible.

    PEFT matches a module when its name equals a target or ends with "." + target; for each
    LoRA layer take the shortest name suffix that no other linear layer ends with
    (BERT: ["key", "query", "value", "attention.output.dense"], not every "dense").
    """
    inside = tuple(f"{n}." for n in lora)
    others = [
        n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n not in lora and not n.startswith(inside)
    ]
    targets = set()
    for name in lora:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(o == suffix or o.endswith("." + suffix) for o in others):
                targets.add(suffix)
                break
    return sorted(targets)


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str = "") -> Path:
    """Write the LoRA adapter in PEFT's format; returns ``out_dir``."""
    base = hf_base(model)
    lora = lora_layers(base)
    if not lora:
        raise InputError(
            "a PEFT adapter holds LoRA factors and this model has none (it was not trained with "
            "method=lora); export --merged writes its weights as a transformers folder"
        )
    if any(m.merged for m in lora.values()):
        raise InputError("the LoRA layers are merged into W; unmerge them before writing an adapter")
    with outdir.staged(out_dir) as tmp:
        _write_adapter(model, base, lora, tmp, base_model_name_or_path)
    return Path(out_dir)


def _write_adapter(
    model: nn.Module, base: nn.Module, lora: dict[str, LoRALinear], out: Path, base_model_name_or_path: str
) -> None:
    first = next(iter(lora.values()))
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in lora.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_a.weight.detach().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_b.weight.detach().contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    is_causal = hasattr(base, "get_output_embeddings") and base.get_output_embeddings() is not None
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if is_causal else None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
        "target_modules": _target_modules(base, lora),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_head(model, out)


def merged_state_dict(base: nn.Module) -> dict[str, torch.Tensor]:
    """The base's state dict under its original names, LoRA updates folded into W.

    Non-destructive: the live weights are not touched, so training can continue after export.
    """
    lora = lora_layers(base)
    sd: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        owner = next((n for n in lora if key.startswith(n + ".")), None)
        if owner is None:
            sd[key] = value
            continue
        rest = key[len(owner) + 1 :]
        if not rest.startswith("base."):
            continue  # lora_a / lora_b
        layer = lora[owner]
        if rest == "base.weight" and not layer.merged:
            value = value + layer.delta_weight().detach()
        sd[f"{owner}.{rest[len('base.') :]}"] = value
    sd.update(dequantized_state(base, lora))  # a quantised base: float32 W (+ B A); not in state_dict
    return sd


def save_merged(model: nn.Module, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write the merged model as a transformers folder (+ tokenizer, + head if any)."""
    base = hf_base(model)
    with outdir.staged(out_dir) as out, loader_bars.terminal_only():  # no "Writing model shards" in a log
        base.save_pretrained(str(out), state_dict=merged_state_dict(base))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        save_head(model, out)
    return Path(out_dir)


def save_head(model: nn.Module, out_dir: Path) -> None:
    """head.safetensors + head_config.json beside the HF files; no-op without a head."""
    if isinstance(model, EncoderWithHead):
        state = {k: v.detach().contiguous() for k, v in model.head.state_dict().items()}
        save_file(state, str(out_dir / "head.safetensors"))
        config = {"num_outputs": model.num_outputs, "pooling": model.pooling}
        (out_dir / "head_config.json").write_text(json.dumps(config) + "\n")


def load_head(body: nn.Module, folder: str | Path) -> EncoderWithHead:
    """Rebuild the head written by ``save_head`` on ``body`` (e.g. the merged encoder)."""
    folder = Path(folder)
    config = json.loads((folder / "head_config.json").read_text())
    model = EncoderWithHead(body, config["num_outputs"], config["pooling"], dropout=0.0)
    model.head.load_state_dict(load_file(str(folder / "head.safetensors")))
    return model
