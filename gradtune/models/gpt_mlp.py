"""The transformer block's MLP, in the three forms ``GPTConfig.mlp`` names.

  gelu    c_proj(gelu_tanh(c_fc(x)))           GPT-2; one fused ``F.gelu(approximate="tanh")`` kernel
  swiglu  c_proj(silu(gate) * up)              Llama; gate|up = c_fc(x) fused in one matmul
  relu2   c_proj(relu(c_fc(x)) ** 2)           the modded-nanoGPT speedrun's: sparse, cheap, no gate

Shapes: x (B, T, C) -> hidden (B, T, H) -> (B, T, C); swiglu's c_fc writes (B, T, 2H).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradtune.models.swiglu_kernel import swiglu

KINDS = ("gelu", "swiglu", "relu2")


class MLP(nn.Module):
    def __init__(self, n_embd: int, hidden: int, kind: str, bias: bool) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"mlp must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.c_fc = nn.Linear(n_embd, 2 * hidden if kind == "swiglu" else hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, H) or (B, T, 2H)
        if self.kind == "swiglu":
            h = swiglu(h)  # silu(gate) * up, one C pass each way on the CPU (models/swiglu_kernel.py)
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        return self.c_proj(h)
