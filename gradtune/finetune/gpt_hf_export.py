"""A GPT pretrained by gradtune as a Hugging Face folder: ``gradtune export RUN --hf OUT``.

    export_gpt_hf(run.model, run.tokenizer, "out/hf")   # then AutoModelForCausalLM.from_pretrained

``family: llama`` becomes ``LlamaForCausalLM`` (``Qwen3ForCausalLM`` with ``gpt.qk_norm``: the same
block with q/k norms), ``family: gpt2`` ``GPT2LMHeadModel``
(``models/gpt_load.config_to_hf`` / ``state_dict_to_hf``, the inverse of the loader's mapping).
The folder holds config.json, model.safetensors (the run's dtype), generation_config.json and the
tokenizer: tokenizer.json (``data/tokenizer_json.py``: the run's own file, or the byte / char
tokenizer written as one with the same ids) and tokenizer_config.json (``PreTrainedTokenizerFast``,
so AutoTokenizer does not pick a model-specific class that would add a BOS the run never saw).
A tokenizer.json whose post-processor adds special tokens (a BOS template) is copied as it is:
AutoTokenizer then adds them, as for that tokenizer anywhere; training encoded without them.

What needs no conversion, checked against transformers' code:
  * rotary layout: our ``apply_rotary`` is HF's ``rotate_half`` (pairs i, i + hs/2) with the
    same inverse frequencies, so q/k rows are written as they are (GGUF export permutes them);
  * GPT-2: HF's Conv1D stores (in, out), so the four block matrices are transposed; our MLP's
    ``gelu(approximate="tanh")`` is HF's ``gelu_new``; attention scaled by 1/sqrt(hs) as HF's
    default ``scale_attn_weights``; a tied lm_head is left out and re-tied by transformers;
  * a model built without biases (``GPTConfig.bias=False``, gpt2 family) gets zero biases, which
    compute the same; dropout is written as the config's rates (inactive in eval / generation).
Refused, one line: a gpt2-family model whose head size is not n_embd / n_head (HF GPT-2 derives
it), a llama-family model with biases (our loader reads no Llama biases back), a gpt2-family
gpt.qk_norm, gpt.logit_softcap or a gpt.mlp other than the family's (``finetune/gpt_export_refusals.py``).

Special ids: the tokenizer's end-of-text token (documents were separated by it in training) is
``eos_token_id``, and ``bos_token_id`` as in GPT-2, since a document starts right after it;
none (byte, char tokenizers) is null in config.json so transformers' class defaults (Llama's
bos 1 / eos 2, GPT-2's 50256) do not stop generation on an ordinary token.

Like every export: the folder must be new or empty and overlap neither the run nor its inputs
(``runtime.outdir.staged``); it is written into a temporary sibling renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gradtune.data.tokenizer import Tokenizer
from gradtune.data.tokenizer_json import hf_tokenizer_json, token_text
from gradtune.finetune.gpt_export_refusals import refuse_unexpressible
from gradtune.models.gpt import GPT
from gradtune.models.gpt_load import config_to_hf, state_dict_to_hf
from gradtune.models.llama_parts import ARCH
from gradtune.runtime import outdir
from gradtune.runtime.atomic import file_mode
from gradtune.runtime.errors import GradtuneError

NO_BIAS = ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight")  # HF GPT-2 has none there


def check(model: GPT, tokenizer: Tokenizer) -> None:
    """Refuse (one line) a GPT shape the transformers class cannot hold, or a tokenizer with more
    ids than the model has rows."""
    cfg = model.config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise GradtuneError(
            f"export --hf: the tokenizer has {tokenizer.vocab_size} tokens, the model's embedding "
            f"{cfg.vocab_size} rows: they do not belong together"
        )
    if cfg.family == "gpt2" and cfg.head_dim * cfg.n_head != cfg.n_embd:
        raise GradtuneError(
            f"export --hf: GPT2LMHeadModel derives head size = n_embd / n_head; this gpt2-family model has "
            f"head_dim {cfg.head_dim} with n_embd {cfg.n_embd} and n_head {cfg.n_head}"
        )
    if cfg.family == "llama" and cfg.bias:
        raise GradtuneError("export --hf: a llama-family model with biases is not written (bias=False is Llama's)")
    target = ARCH[cfg.qk_norm][1] if cfg.family == "llama" else "GPT2LMHeadModel"
    refuse_unexpressible(cfg, "export --hf", target)


def hf_weights(model: GPT) -> dict[str, torch.Tensor]:
    """The model's tensors under transformers' names and layouts; zero biases where ours has none."""
    tensors = state_dict_to_hf(model)
    if model.config.family == "gpt2" and not model.config.bias:
        for name, t in list(tensors.items()):
            bias = name.removesuffix(".weight") + ".bias"
            if name.endswith(".weight") and name not in NO_BIAS and bias not in tensors:
                tensors[bias] = torch.zeros(t.shape[-1], dtype=t.dtype)  # Conv1D (in, out), LayerNorm (C,)
    return tensors


def hf_files(model: GPT, tokenizer: Tokenizer) -> dict[str, str]:
    """config.json, generation_config.json and the tokenizer files, as text."""
    cfg = model.config
    eos = tokenizer.eos_id
    specials = {"bos_token_id": eos, "eos_token_id": eos}
    config: dict[str, Any] = {**config_to_hf(cfg), **specials}
    config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    generation = {**specials, "pad_token_id": eos} if eos is not None else {}
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.block_size,
        "clean_up_tokenization_spaces": False,  # decode exactly, no " ." -> "." rewriting
    }
    text = token_text(tokenizer, eos)
    if text is not None:
        tok_config.update(bos_token=text, eos_token=text)
    template = getattr(tokenizer, "chat_template", None)  # ChatML where `tokenizer train` made its markers
    if template:
        tok_config["chat_template"] = template
    return {
        "config.json": json.dumps(config, indent=2) + "\n",
        "generation_config.json": json.dumps(generation, indent=2) + "\n",
        "tokenizer.json": hf_tokenizer_json(tokenizer),
        "tokenizer_config.json": json.dumps(tok_config, indent=2) + "\n",
    }


def export_gpt_hf(model: GPT, tokenizer: Tokenizer, out_dir: str | Path, inputs: outdir.Inputs = ()) -> Path:
    """Write ``model`` + ``tokenizer`` as a transformers folder at the new or empty ``out_dir``."""
    check(model, tokenizer)
    files = hf_files(model, tokenizer)  # every refusal before the folder exists
    tensors = hf_weights(model)
    with outdir.staged(out_dir, inputs) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", file_mode())  # safetensors creates it 0600; the umask's mode
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out_dir)
