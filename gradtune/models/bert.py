"""BERT-family encoders (config.json ``model_type``: bert, roberta, xlm-roberta) as gradtune's
own module, for a run that only computes: ``eval`` and ``predict`` of an encoder fine-tuned on
classification or regression.

Why: importing transformers' BERT modules costs more than evaluating a few thousand texts (its
import pulls torch.distributed.tensor, sympy and the model-loading machinery); this module needs
torch and safetensors only. Training, exports and every other architecture load through
transformers (models/hf.py); this module is the same computation, not another model:

    module tree and parameter names  = transformers' BertModel / RobertaModel (a run's weights,
                                       LoRA wrappers, freeze patterns and heads address both alike)
    forward, op for op               = theirs with SDPA attention: embeddings summed in their order
                                       (RoBERTa's positions count from the pad id + 1 over non-pad
                                       tokens), post-norm residuals, exact-erf GELU, a boolean
                                       padding mask or none when a batch has no padding; so eval
                                       prints the loss training logged, float32 and bf16 autocast

    body = load_bert("path/to/MiniLM", torch.float32)    # or None: not one this module computes
    hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state      # (B, T, H)

``load_bert`` returns None (the caller uses transformers) for anything it does not compute the
same way: a GGUF file, a decoder or cross-attention config, relative positions, an activation
other than gelu / relu, a chunked feed-forward, or weights whose names do not map.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from gradtune.models.dropout import swap_dropouts
from gradtune.models.hf import ModelSourceError, read_config, resolve, safetensors_shapes
from gradtune.models.onednn_linear import swap_linears

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}  # transformers' ACT2FN entries that are these functions
# model_type -> the prefix a task model's checkpoint (BertForSequenceClassification...) holds the body under
PREFIXES = {"bert": "bert.", "roberta": "roberta.", "xlm-roberta": "roberta."}
LEGACY = {".gamma": ".weight", ".beta": ".bias"}  # LayerNorm names of the original TF checkpoints


@dataclass
class BertConfig:
    """The config.json fields the computation reads; ``hidden_size`` is what heads read."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: Optional[int] = 0
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    roberta: bool = False  # positions as RoBERTa numbers them (from the pad id + 1, pads keep the pad id)


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor  # (B, T, H)


class Embeddings(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.roberta_pad = c.pad_token_id if c.roberta else None
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size, padding_idx=self.roberta_pad)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor]) -> torch.Tensor:
        T = input_ids.shape[1]
        if self.roberta_pad is None:
            positions = torch.arange(T, device=input_ids.device)[None]  # (1, T)
        else:  # (B, T): pad + 1, pad + 2, ... over real tokens, pad on padding
            real = input_ids.ne(self.roberta_pad).int()
            positions = (torch.cumsum(real, dim=1).type_as(real) * real).long() + self.roberta_pad
        if token_type_ids is None:  # segment 0 everywhere: one row, broadcast (B, T, H)
            types = self.token_type_embeddings.weight[0].expand(1, T, -1)
        else:
            types = self.token_type_embeddings(token_type_ids)
        x = self.word_embeddings(input_ids) + types  # the order transformers sums in
        x = x + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.heads, self.head_size = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.dropout = nn.Dropout(c.attention_probs_dropout_prob)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        B, T, _ = x.shape
        q, k, v = (
            f(x).view(B, T, self.heads, self.head_size).transpose(1, 2) for f in (self.query, self.key, self.value)
        )
        p = self.dropout.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.head_size**-0.5)
        return out.transpose(1, 2).contiguous().reshape(B, T, -1)  # (B, nh, T, hs) -> (B, T, H)


class Residual(nn.Module):
    """dense -> dropout -> LayerNorm(+ the block's input): BertSelfOutput and BertOutput."""

    def __init__(self, width_in: int, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(width_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + x)


class Attention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.self = SelfAttention(c)
        self.output = Residual(c.hidden_size, c)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = Residual(c.intermediate_size, c)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class Stack(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))


class Pooler(nn.Module):
    """BERT's tanh dense on the first token: held so that a run's and a checkpoint's names all
    load; never computed (gradtune's heads pool ``last_hidden_state`` themselves)."""

    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)


class BertModel(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.config = c
        self.embeddings = Embeddings(c)
        self.encoder = Stack(c)
        self.pooler = Pooler(c)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> EncoderOutput:  # (B, T) ids, (B, T) 1 = real token, 0 = padding
        x = self.embeddings(input_ids, token_type_ids)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            B, T = input_ids.shape  # keys to attend to, for every query: (B, 1, T, T), True = attend
            mask = attention_mask.bool()[:, None, None, :].expand(B, 1, T, T)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return EncoderOutput(last_hidden_state=x)


def _config(raw: dict[str, Any]) -> Optional[BertConfig]:
    """The config when this module computes that model as transformers does, else None."""
    if raw.get("model_type") not in PREFIXES or raw.get("is_decoder") or raw.get("add_cross_attention"):
        return None
    if raw["model_type"] != "bert" and raw.get("pad_token_id") is None:
        return None  # RoBERTa numbers positions from its pad id
    if raw.get("position_embedding_type", "absolute") != "absolute" or raw.get("chunk_size_feed_forward"):
        return None
    if raw.get("hidden_act", "gelu") not in ACTIVATIONS:
        return None
    try:
        fields = {k: raw[k] for k in BertConfig.__dataclass_fields__ if k in raw}
        c = BertConfig(**fields, roberta=raw["model_type"] != "bert")
    except TypeError:  # a required field missing: transformers says which
        return None
    return c if c.hidden_size % c.num_attention_heads == 0 else None


def _names(file_key: str, prefix: str) -> str:
    """A file's tensor name as this module names it: without the task model's ``prefix`` ('' for
    a bare body), legacy LayerNorm names renamed."""
    key = file_key[len(prefix) :] if prefix and file_key.startswith(prefix) else file_key
    for old, new in LEGACY.items():
        if key.endswith(old) and ".LayerNorm" in key:
            key = key[: -len(old)] + new
    return key


def load_bert(source: str | Path, dtype: torch.dtype = torch.float32) -> Optional[BertModel]:
    """The encoder at ``source`` (a local folder) in ``dtype``, train mode, as ``hf.load_model``
    returns transformers' (dropout and linears swapped for gradtune's); None where transformers
    must load it (see the module's docstring). The pooler may be absent from the files (zeros)."""
    folder, gguf = resolve(source)
    raw = read_config(folder) if gguf is None else {}
    config = _config(raw) if raw else None
    if config is None:
        return None
    files = sorted(folder.glob("*.safetensors"))
    keys = [k for f in files for k in safetensors_shapes(f)]
    prefix = PREFIXES[raw["model_type"]]
    prefix = (
        prefix if not any(k.startswith("embeddings.") for k in keys) and any(k.startswith(prefix) for k in keys) else ""
    )
    model = BertModel(config)  # (not on the meta device: that imports torch._dynamo, a second)
    wanted = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    names = {k: _names(k, prefix) for k in keys}  # the file's name -> this module's
    if any(n not in names.values() for n in wanted if not n.startswith("pooler.")):
        return None  # names transformers may know how to rename
    state = {}
    for f in files:
        state.update({names[k]: t for k, t in load_file(str(f)).items() if names[k] in wanted})
    for n, shape in wanted.items():
        if n not in state:  # the pooler, never computed
            state[n] = torch.zeros(shape, dtype=dtype)
        elif tuple(state[n].shape) != shape:
            raise ModelSourceError(
                f"model {str(source)!r}: {n} is {list(state[n].shape)}, config.json says {list(shape)}"
            )
    model.load_state_dict({n: t.to(dtype) for n, t in state.items()}, assign=True)
    swap_dropouts(model)
    swap_linears(model)
    return model.train()
