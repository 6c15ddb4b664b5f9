"""Export a Llama-family model as one GGUF file (llama.cpp's format), with its tokenizer.

    vocab = vocab_from_gguf("base.gguf")             # a GGUF base: its tokenizer metadata copied
    vocab = vocab_from_hf_folder(run / "tokenizer")  # tokenizer.json (+ tokenizer_config.json)
    export_gguf(model, vocab, "out.gguf", "q4_0")    # our GPT (family llama) or a HF Llama / Qwen3

The model is our ``GPT`` with ``family: llama`` or a transformers ``LlamaForCausalLM`` /
``Qwen3ForCausalLM``, LoRA updates folded in (``export.merged_state_dict``); both are mapped to our
GPT's layout first (one writer), then to llama.cpp's tensor names, as its ``llama`` architecture or,
with q/k norms (``gpt.qk_norm``), its ``qwen3`` (models/llama_parts.py). Layout facts of the format:
  * llama's q/k rows are permuted from HF's "rotate half" rotary layout to GGML's interleaved pairs
    (``permute_rotary``, the inverse of ``gpt_gguf.unpermute_rotary`` used on load); qwen3's are
    not (llama.cpp rotates its "rotate half" pairs, NEOX style);
  * a tied lm_head is written as no ``output.weight`` tensor;
  * 1-D tensors (norm weights) stay float32 whatever the type; which type each matrix gets
    (f32, f16, bf16, q8_0, the K-quant mixes q6_k / q5_k_m / q4_k_m / ..., q5_1, q5_0, q4_1,
    q4_0) is ``gguf_types``'s rule.

The tokenizer must be one llama.cpp can run: a byte-level BPE ("gpt2" model: tokens + merges).
gradtune's byte / char tokenizers and WordLevel / WordPiece / Unigram / SentencePiece-style
tokenizer.json files are refused with one line rather than written as a vocabulary llama.cpp
would tokenize differently.

The file is written to a temporary sibling and linked into place: never half a file, never an
existing file replaced (a file that appears meanwhile is an error, not overwritten).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from gradtune.finetune.export import hf_base, merged_state_dict
from gradtune.finetune.gguf_types import FILE_TYPE, add_tensor, check_type
from gradtune.finetune.gpt_export_refusals import refuse_unexpressible
from gradtune.finetune.heads import EncoderWithHead
from gradtune.models.gguf_index import ARRAY, read_index
from gradtune.models.gpt import GPT, GPTConfig
from gradtune.models.gpt_load import config_from_hf, state_dict_from_hf
from gradtune.models.llama_parts import ARCH, gguf_parts, part_rows
from gradtune.runtime.atomic import fsync_dir
from gradtune.runtime.errors import GradtuneError

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # gguf.TokenType
SPECIALS = ("bos", "eos", "unk", "pad")


@dataclass
class Vocab:
    """A tokenizer as GGUF metadata: tokens in id order, their types, and the other
    ``tokenizer.*`` keys as (key, value, GGUFValueType, array element type or None)."""

    tokens: list[str]
    token_types: list[int]
    scores: Optional[list[float]] = None  # SentencePiece vocabularies only (copied from a GGUF)
    extra: list[tuple[str, Any, Any, Any]] = field(default_factory=list)
    source: str = ""  # where it came from, for messages


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf ``permute``: per head, rows [x0..x_{hs/2-1}, y0..]
    (rotate-half) become [x0, y0, x1, y1, ...] (interleaved). w (nh*hs, C)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# --- the network ---------------------------------------------------------------------------------


def llama_weights(model: nn.Module) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(config, state dict in our GPT's names) of our llama GPT or a HF Llama causal LM."""
    if isinstance(model, GPT):
        if model.config.family != "llama":
            raise GradtuneError(
                f"GGUF export writes Llama-family models; this GPT has family "
                f"'{model.config.family}' (gpt.family: llama)"
            )
        refuse_unexpressible(model.config, "GGUF export", "llama.cpp's llama / qwen3 architectures")
        return model.config, {k: v.detach() for k, v in model.state_dict().items()}
    if isinstance(model, EncoderWithHead) or not hasattr(model, "config"):
        raise GradtuneError(
            "GGUF export writes causal language models; this model is an encoder with a classification/regression head"
        )
    base = hf_base(model)
    hf_config = base.config.to_dict()
    kind = hf_config.get("model_type")
    if kind not in ("llama", "qwen3") or not hasattr(base, "lm_head"):
        raise GradtuneError(
            f"GGUF export writes Llama-family (and Qwen3) causal LMs; this model is {type(base).__name__} "
            f"(model_type '{kind}')"
        )
    try:
        cfg = config_from_hf(hf_config)
    except ValueError as e:
        raise GradtuneError(f"GGUF export: {e}") from None
    sd = {k: v.detach() for k, v in merged_state_dict(base).items()}
    return cfg, state_dict_from_hf(sd, cfg)


def gguf_tensors(cfg: GPTConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our llama state dict -> llama.cpp tensor names (float32; llama's q/k rows permuted)."""
    out = {"token_embd.weight": sd["transformer.wte.weight"], "output_norm.weight": sd["transformer.ln_f.weight"]}
    rows, table = part_rows(cfg), gguf_parts(cfg)
    for i in range(cfg.n_layer):
        for ours, parts in table.items():
            t = sd[f"transformer.h.{i}.{ours}"]
            for name, piece in zip(parts, t.split(rows[ours]) if len(parts) > 1 else [t]):
                if name in ("attn_q", "attn_k") and not cfg.qk_norm:  # qwen3: HF's pairs as they are
                    piece = permute_rotary(piece, cfg.n_head if name == "attn_q" else cfg.n_kv_head)
                out[f"blk.{i}.{name}.weight"] = piece
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def _add_hparams(writer: Any, cfg: GPTConfig, vocab_size: int, qtype: str, name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(FILE_TYPE[qtype])
    writer.add_vocab_size(vocab_size)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_dimension_count(cfg.head_dim)  # transformers reads head_dim from this key
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    # llama.cpp (and our loader) read a decoupled head size here; qwen3's always (its head size is its own)
    if cfg.head_dim * cfg.n_head != cfg.n_embd or cfg.qk_norm:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    if qtype.startswith("q"):
        writer.add_quantization_version(2)  # gguf.GGML_QUANT_VERSION


def _add_vocab(writer: Any, vocab: Vocab, rows: int) -> None:
    """The tokenizer keys; a vocabulary shorter than the embedding (rows padded to a multiple,
    as some models do) is completed with unused placeholder tokens, as llama.cpp's converter does."""
    import gguf

    n = len(vocab.tokens)
    if n > rows:
        raise GradtuneError(
            f"{vocab.source}: the tokenizer has {n} tokens but the model's embedding has "
            f"{rows} rows: they do not belong together"
        )
    pad = [f"[PAD{i}]" for i in range(n, rows)]
    writer.add_token_list(vocab.tokens + pad)
    writer.add_token_types(vocab.token_types + [UNUSED] * len(pad))
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores + [-1000.0] * len(pad))
    for key, value, vtype, sub in vocab.extra:
        if vtype == gguf.GGUFValueType.ARRAY and not len(value):
            continue  # the writer cannot write an empty array
        writer.add_key_value(key, value, vtype, sub_type=sub)


def export_gguf(model: nn.Module, vocab: Vocab, out: str | Path, qtype: str = "f16", name: str = "") -> Path:
    """Write ``model`` (+ ``vocab``) to the new file ``out``; refuses an existing ``out``."""
    import gguf

    qtype = check_type(qtype)
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise GradtuneError(f"{out}: exists; GGUF export never overwrites a file, choose a new path")
    cfg, sd = llama_weights(model)
    tensors = gguf_tensors(cfg, sd)
    writer = gguf.GGUFWriter(None, ARCH[cfg.qk_norm][2])
    _add_hparams(writer, cfg, tensors["token_embd.weight"].shape[0], qtype, name or out.stem)
    _add_vocab(writer, vocab, tensors["token_embd.weight"].shape[0])
    for tname, t in tensors.items():
        add_tensor(writer, tname, t, qtype, "output.weight" in tensors, cfg.n_layer)

    def write(tmp: Path) -> None:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_new(out, write)
    return out


def write_new(target: Path, write: Any) -> None:
    """``write(tmp)`` into a temporary sibling of ``target``, fsync, then hard-link it to
    ``target``: unlike a rename, a link fails if ``target`` appeared meanwhile."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise GradtuneError(f"{target}: created by someone else meanwhile; nothing written") from None
        except OSError:  # a filesystem without hard links: check, then rename (a narrower race)
            if target.exists():
                raise GradtuneError(f"{target}: created by someone else meanwhile; nothing written") from None
            os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


# --- the tokenizer -------------------------------------------------------------------------------


def vocab_from_gguf(path: str | Path) -> Vocab:
    """Every ``tokenizer.*`` key of an existing GGUF file, as written there."""
    import gguf
    import numpy as np

    index = read_index(path, strings=True)
    if "tokenizer.ggml.tokens" not in index.fields:
        raise GradtuneError(f"{path}: has no tokenizer (no tokenizer.ggml.tokens) to copy")
    tokens, types, scores, extra = [], [], None, []
    for key, value in index.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = value.tolist() if isinstance(value, np.ndarray) else value  # python values for the writer
        if key == "tokenizer.ggml.tokens":
            tokens = list(value)
        elif key == "tokenizer.ggml.token_type":
            types = [int(v) for v in value]
        elif key == "tokenizer.ggml.scores":
            scores = [float(v) for v in value]
        else:
            kind = index.types[key]
            sub = gguf.GGUFValueType(kind[1]) if kind[0] == ARRAY else None
            extra.append((key, value, gguf.GGUFValueType(kind[0]), sub))
    return Vocab(tokens, types or [NORMAL] * len(tokens), scores, extra, str(path))


def _pre_tokenizer(pre: Any, where: str) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a tokenizer.json pre-tokenizer it splits the
    same way; anything else is refused (a different split gives different tokens)."""

    def byte_level(p: Any) -> bool:
        return isinstance(p, dict) and p.get("type") == "ByteLevel" and p.get("use_regex", True)

    if byte_level(pre):
        return "gpt-2"  # GPT-2's regex, then bytes
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else []
    if (
        len(steps) == 2
        and steps[0].get("type") == "Digits"
        and steps[0].get("individual_digits")
        and byte_level(steps[1])
    ):
        return "smollm"  # each digit alone, then GPT-2's regex (SmolLM, StarCoder)
    kind = pre.get("type") if isinstance(pre, dict) else pre
    raise GradtuneError(
        f"{where}: pre-tokenizer {kind!r} has no llama.cpp equivalent gradtune can name "
        f"(byte-level BPE with GPT-2's split, optionally digits split first)"
    )


def vocab_from_tokenizer_json(
    path: str | Path,
    specials: Optional[dict[str, int]] = None,
    add_bos: bool = False,
    chat_template: Optional[str] = None,
) -> Vocab:
    """A byte-level BPE tokenizer.json as llama.cpp's "gpt2" vocabulary: tokens (added tokens
    included: special ones as CONTROL, others USER_DEFINED), merges, pre-tokenizer name.
    ``specials``: {"bos"|"eos"|"unk"|"pad": token id}."""
    import gguf

    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec["model"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise GradtuneError(f"{path}: not a readable tokenizer.json ({type(e).__name__}: {e})") from None
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
    ):
        what = "SentencePiece-style BPE" if model.get("type") == "BPE" else f"model {model.get('type')!r}"
        raise GradtuneError(
            f"{path}: {what} is not a byte-level BPE; GGUF export writes llama.cpp's "
            f"'gpt2' vocabulary only (or copies a GGUF base's tokenizer)"
        )
    if spec.get("normalizer"):
        raise GradtuneError(
            f"{path}: has a normalizer ({spec['normalizer'].get('type')}), which llama.cpp's "
            f"'gpt2' vocabulary does not apply"
        )
    pre = _pre_tokenizer(spec.get("pre_tokenizer"), str(path))
    ids: dict[int, tuple[str, int]] = {i: (tok, NORMAL) for tok, i in model["vocab"].items()}
    for added in spec.get("added_tokens") or []:
        ids[added["id"]] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    n = max(ids) + 1 if ids else 0
    tokens = [ids.get(i, (f"[PAD{i}]", UNUSED)) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:
        raise GradtuneError(f"{path}: a BPE with no merges; llama.cpp's 'gpt2' vocabulary needs them")
    t = gguf.GGUFValueType
    extra: list[tuple[str, Any, Any, Any]] = [
        ("tokenizer.ggml.model", "gpt2", t.STRING, None),
        ("tokenizer.ggml.pre", pre, t.STRING, None),
        ("tokenizer.ggml.merges", merges, t.ARRAY, t.STRING),
    ]
    for name, i in (specials or {}).items():
        key = "unknown" if name == "unk" else "padding" if name == "pad" else name
        extra.append((f"tokenizer.ggml.{key}_token_id", int(i), t.UINT32, None))
    extra.append(("tokenizer.ggml.add_bos_token", bool(add_bos), t.BOOL, None))
    if chat_template:
        extra.append(("tokenizer.chat_template", chat_template, t.STRING, None))
    return Vocab([tok for tok, _ in tokens], [kind for _, kind in tokens], None, extra, str(path))


def vocab_from_hf_folder(folder: str | Path) -> Vocab:
    """A saved HF tokenizer folder: tokenizer.json, its special tokens and add_bos_token from
    tokenizer_config.json, the chat template from there or chat_template.jinja."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise GradtuneError(f"{folder}: no tokenizer.json (a fast tokenizer is needed to write a GGUF vocabulary)")
    config: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise GradtuneError(f"{folder / 'tokenizer_config.json'}: not valid JSON ({e})") from None
    template = config.get("chat_template")
    if not isinstance(template, str):  # absent, or a list of named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template or [] if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        index = dict(spec["model"].get("vocab") or {})
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise GradtuneError(f"{folder / 'tokenizer.json'}: not a readable tokenizer.json ({e})") from None
    index.update({a["content"]: a["id"] for a in spec.get("added_tokens") or []})
    specials = {}
    for name in SPECIALS:
        value = config.get(f"{name}_token")
        content = value.get("content") if isinstance(value, dict) else value
        if content in index:
            specials[name] = index[content]
    return vocab_from_tokenizer_json(folder / "tokenizer.json", specials, bool(config.get("add_bos_token")), template)
