"""A decoder-only transformer readable in one sitting: the GPT-2 and the Llama families.

One ``GPTConfig.family`` switch picks the three places where the families differ:
  gpt2   learned positions, LayerNorm (with bias), GELU(tanh) MLP, tied embeddings
  llama  rotary positions (theta), RMSNorm (eps), SwiGLU MLP, grouped-query attention,
         no biases, optionally untied lm_head
Everything else (pre-norm residual blocks, causal SDPA attention, init) is shared.

The modded-nanoGPT speedrun's choices are settings, off by default (today's models unchanged):
  mlp             gelu | swiglu | relu2 (models/gpt_mlp.py); None = the family's own
  qk_norm         RMSNorm (learned weight, hs) on each head's q and k before rotary: bounded logits
  logit_softcap   c * tanh(logits / c): |logits| < c, in the loss and in generation alike
  zero_init_proj  attention's and the MLP's output projections start at zero: each block is the identity

Shapes in comments: B batch, T time (tokens), C width (n_embd), nh heads, nkv key/value heads,
hs head size, V vocabulary. The model returns logits only; the loss lives in an objective.

Why it is shaped for speed: q, k and v come from one matmul (one large GEMM instead of three
small ones), and so do SwiGLU's gate and up; causal attention on the CPU is one C pass a head
each way over the keys each query sees (models/fused_attention.py; float32 arithmetic, also under
bf16 autocast), elsewhere ``F.scaled_dot_product_attention(is_causal=True)``, so no (T, T) mask
is built and torch picks its fused attention kernel; GELU-tanh is the single fused ``F.gelu(approximate="tanh")`` kernel
instead of a chain of elementwise ops.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradtune.models import fused_attention, rms_norm_kernel, rotary
from gradtune.models.dropout import Dropout
from gradtune.models.dropout import attention as dropout_attention
from gradtune.models.gpt_mlp import KINDS as MLP_KINDS
from gradtune.models.gpt_mlp import MLP
from gradtune.models.onednn_linear import swap_linears
from gradtune.models.rotary import apply_rotary


@dataclass
class GPTConfig:
    family: Literal["gpt2", "llama"] = "gpt2"  # see module docstring: positions, norm, MLP
    vocab_size: int = 256  # 256 = raw bytes; GPT-2 BPE is 50257
    block_size: int = 256  # longest context; sizes the position table / rotary cache
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # grouped-query attention: fewer k/v heads, smaller KV cache; None = n_head
    n_embd: int = 256
    head_dim: int | None = None  # None = n_embd // n_head (some Llama variants decouple it)
    intermediate_size: int | None = None  # MLP hidden width; None = 4*C, or SwiGLU's 8/3*C rounded
    bias: bool | None = None  # biases in linears and LayerNorm; None = True for gpt2, False for llama
    norm_eps: float = 1e-5  # LayerNorm / RMSNorm epsilon
    rope_theta: float = 10000.0  # rotary base; larger = slower-turning angles, longer contexts
    tie_embeddings: bool = True  # lm_head shares wte: fewer parameters; untied is more expressive
    dropout: float = 0.0  # attention probs + residual branches: regularises small data (0.1-0.2); 0 for big runs
    activation_checkpointing: bool = False  # recompute each block in backward: ~1/3 more compute, far less memory
    mlp: Literal["gelu", "swiglu", "relu2"] | None = None  # None = the family's: gelu (gpt2), swiglu (llama)
    qk_norm: bool = False  # RMSNorm on q and k per head before rotary / attention
    logit_softcap: float | None = None  # c: logits = c * tanh(logits / c); None = off
    zero_init_proj: bool = False  # attention and MLP output projections start at zero

    def __post_init__(self) -> None:
        if self.family not in ("gpt2", "llama"):
            raise ValueError(f"family must be 'gpt2' or 'llama', got {self.family!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.bias is None:
            self.bias = self.family == "gpt2"
        if self.mlp is None:
            self.mlp = "gelu" if self.family == "gpt2" else "swiglu"
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f"logit_softcap must be > 0 (or None), got {self.logit_softcap}")
        if self.intermediate_size is None:
            if self.mlp != "swiglu":
                self.intermediate_size = 4 * self.n_embd
            else:  # SwiGLU has 3 matrices: 8/3*C keeps the 2-matrix MLP's parameter count (Llama)
                self.intermediate_size = 256 * math.ceil(8 * self.n_embd / 3 / 256)
        if self.family == "gpt2" and self.n_kv_head != self.n_head:
            raise ValueError("grouped-query attention (n_kv_head != n_head) is a llama-family feature")

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """Named sizes; keyword overrides win (e.g. ``preset("gpt2", block_size=512)``)."""
        presets = {
            # Character/byte-level Shakespeare: ~3.3M parameters, trains on a laptop CPU.
            "shakespeare": {},
            "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),  # 124M
            "gpt2-medium": dict(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
            "gpt2-large": dict(vocab_size=50257, block_size=1024, n_layer=36, n_head=20, n_embd=1280),
            "gpt2-xl": dict(vocab_size=50257, block_size=1024, n_layer=48, n_head=25, n_embd=1600),
            # A few hundred thousand parameters: for tests and smoke runs.
            "tiny-gpt2": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
            "tiny-llama": dict(
                family="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64, intermediate_size=192
            ),
            # SmolLM2-135M's shape (Llama family): the real model the tests load from GGUF.
            "smollm2-135m": dict(
                family="llama",
                vocab_size=49152,
                block_size=8192,
                n_layer=30,
                n_head=9,
                n_kv_head=3,
                n_embd=576,
                intermediate_size=1536,
                rope_theta=100000.0,
            ),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        known = [f.name for f in fields(cls)]
        for key in overrides:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown GPTConfig field {key!r}{hint}")
        # Build from keywords (not dataclasses.replace) so derived fields such as head_dim and
        # intermediate_size follow an overridden n_embd / n_head.
        return cls(**{**presets[name], **overrides})


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like Llama (bf16 squares lose precision)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, w = x.unsqueeze(-2), self.weight.view(1, -1)  # (..., 1, C): one group a row
        layout = rms_norm_kernel.takes(rows, w)  # one C pass each way (models/rms_norm_kernel.py)
        if layout:
            return rms_norm_kernel.rms_norm(rows, w, self.eps, layout).squeeze(-2)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


def rotary_cache(cfg: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (block_size, hs) for rotary positions, HF's "rotate half" layout."""
    hs = cfg.head_dim
    if torch.get_default_device().type == "meta":  # shapes only: see _embedding below
        return torch.empty(cfg.block_size, hs), torch.empty(cfg.block_size, hs)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
    angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), inv_freq)  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs): pair i with i + hs/2
    return angles.cos(), angles.sin()


class KVCache:
    """Keys and values of past tokens per layer, preallocated (B, nkv, block_size, hs).

    Generation feeds one token at a time; attention then reads the cache instead of recomputing
    the whole prefix, making each new token O(T) instead of O(T^2)."""

    def __init__(self, cfg: GPTConfig, batch_size: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch_size, cfg.n_kv_head, cfg.block_size, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.pos = 0  # tokens already stored; advanced by GPT.forward after all layers ran

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hs) at positions pos..pos+T; return all keys/values so far."""
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.q_size = cfg.n_head * cfg.head_dim
        self.kv_size = cfg.n_kv_head * cfg.head_dim
        # q, k, v in one matmul: one big GEMM beats three small ones, esp. on CPU.
        self.c_attn = nn.Linear(cfg.n_embd, self.q_size + 2 * self.kv_size, bias=cfg.bias)
        self.c_proj = nn.Linear(self.q_size, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_norm:  # per head (hs,): q.k stays bounded whatever the residual stream's scale
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache | None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        cfg = self.cfg
        qkv = self.c_attn(x)  # (B, T, q_size + 2 kv_size)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm or rope is not None:
            q, k = self.norm_and_rotate(qkv, q, k, rope)
        past = 0 if cache is None else cache.pos
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, past + T, hs)
        mask = None
        if past and T > 1:  # a chunk after cached tokens: query i sees keys 0..past+i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        dropout = cfg.dropout if self.training else 0.0
        gqa = cfg.n_kv_head != cfg.n_head  # each k/v head serves n_head // n_kv_head query heads
        causal = past == 0 and T > 1
        cpu = x.device.type == "cpu"
        # On the CPU a causal window (training, evaluation, a prompt) takes the C kernel at any dropout
        # (fused_attention.py: half the square's work, grouped k/v read in place); SDPA's own CPU
        # dropout would leave its fused kernels for the math path and draw with bernoulli_.
        fused = cpu and causal and fused_attention.takes_causal(q, k, v, dropout)
        if fused or (dropout > 0.0 and cpu):
            if gqa and not fused:
                k = k.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)
                v = v.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)
            y = dropout_attention(q, k, v, mask, causal, dropout)
        else:  # grouped heads read their shared k/v in place (enable_gqa): no (B, nh, T, hs) copies
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, enable_gqa=gqa
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.q_size)
        return self.c_proj(y)

    def norm_and_rotate(
        self, qkv: torch.Tensor, q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k (B, nh / nkv, T, hs) after the q/k norms (gpt.qk_norm) and rotary positions. On the CPU
        the q|k columns of ``qkv`` (B, T, .) are read in place as (B, T, nh + nkv, hs) heads: one
        kernel pass normalises both (models/rms_norm_kernel.py), one rotates both (models/rotary.py)."""
        cfg = self.cfg
        heads = qkv[..., : self.q_size + self.kv_size].unflatten(-1, (cfg.n_head + cfg.n_kv_head, cfg.head_dim))
        if cfg.qk_norm:
            w = torch.cat([self.q_norm.weight.expand(cfg.n_head, -1), self.k_norm.weight.expand(cfg.n_kv_head, -1)])
            layout = rms_norm_kernel.takes(heads, w)
            if not layout:  # the torch ops throughout
                q, k = self.q_norm(q), self.k_norm(k)
                return (apply_rotary(q, *rope), apply_rotary(k, *rope)) if rope is not None else (q, k)
            heads = rms_norm_kernel.rms_norm(heads, w, self.q_norm.eps, layout)  # float32 (B, T, nh + nkv, hs)
        turn = rotary.takes(heads, *rope) if rope is not None else None
        if turn:
            heads = rotary.rotate(heads, *rope, turn)  # type: ignore[misc]
        q, k = heads.split([cfg.n_head, cfg.n_kv_head], dim=2)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, T, nh, hs) -> (B, nh, T, hs)
        return (apply_rotary(q, *rope), apply_rotary(k, *rope)) if rope is not None and not turn else (q, k)


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.family == "llama":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg.n_embd, cfg.intermediate_size, cfg.mlp, cfg.bias)
        self.drop = Dropout(cfg.dropout)  # the cheap CPU mask (models/dropout.py)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), rope, cache))
        return x + self.drop(self.mlp(self.ln_2(x)))


# Built on the meta device (the memory check's parameter count, GPT.from_state_dict), a model has
# nothing to draw or compute: and normal_ (or pow) on a meta tensor runs a Python decomposition whose
# first call imports torch._dynamo, about a second of every run's start-up. Real tensors are as before.
def _embedding(num: int, dim: int) -> nn.Embedding:
    if torch.get_default_device().type == "meta":
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))  # no reset_parameters draw
    return nn.Embedding(num, dim)


def _normal_(p: torch.Tensor, std: float) -> None:
    if not p.is_meta:
        nn.init.normal_(p, mean=0.0, std=std)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=_embedding(cfg.vocab_size, cfg.n_embd),
                drop=Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
                ln_f=make_norm(cfg),
            )
        )
        if cfg.family == "gpt2":
            self.transformer["wpe"] = _embedding(cfg.block_size, cfg.n_embd)
        else:  # rotary tables are derived, not learned: non-persistent, absent from state_dict
            cos, sin = rotary_cache(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:  # one (V, C) matrix reads tokens in and writes logits out
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2 paper: residual projections scaled by 1/sqrt(2 * n_layer) so the residual
        # stream's variance does not grow with depth (two adds per block).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                _normal_(p, 0.02 / math.sqrt(2 * cfg.n_layer))
                if cfg.zero_init_proj:  # drawn first all the same: the other weights' draws stay as they were
                    nn.init.zeros_(p)
        swap_linears(self)  # float32 linears' forward and input gradient through oneDNN on AMD CPUs (onednn_linear.py)

    @classmethod
    def from_state_dict(cls, cfg: GPTConfig, state_dict: dict[str, torch.Tensor]) -> "GPT":
        """Adopt pretrained tensors without first drawing random ones: the model is built on the
        meta device (no memory, no init) and the state dict's tensors are assigned in place."""
        with torch.device("meta"):
            model = cls(cfg)
        state_dict = {k: v.contiguous() for k, v in state_dict.items()}  # e.g. transposed Conv1D
        model.load_state_dict(state_dict, strict=True, assign=True)
        if cfg.tie_embeddings:  # assign gave lm_head its own Parameter object: tie it again
            model.lm_head.weight = model.transformer.wte.weight
        if cfg.family == "llama":  # non-persistent buffers are not in state_dict: still on meta
            model.rope_cos, model.rope_sin = rotary_cache(cfg)
        return model

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            _normal_(module.weight, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _normal_(module.weight, 0.02)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) long -> logits (B, T, V). With ``cache``, positions start at cache.pos."""
        B, T = input_ids.shape
        start = 0 if cache is None else cache.pos
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}")
        x = self.transformer.wte(input_ids)  # (B, T, C)
        rope = None
        if self.config.family == "gpt2":
            pos = torch.arange(start, start + T, device=input_ids.device)
            x = x + self.transformer.wpe(pos)  # (T, C) broadcast over B
        else:
            rope = (self.rope_cos[start : start + T].to(x.dtype), self.rope_sin[start : start + T].to(x.dtype))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.config.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, cache)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        if self.config.logit_softcap is not None:  # smooth clip to (-c, c): no logit runs away
            c = self.config.logit_softcap
            logits = c * torch.tanh(logits / c)
        return logits

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once). non_embedding drops wpe, and wte when untied:
        the lookups that cost no FLOPs, as in the scaling-law papers and nanoGPT's MFU."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B as in nanoGPT:
        6N for the matmuls with the weights plus 12*L*nh*hs*T for attention's QK^T and AV."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T
