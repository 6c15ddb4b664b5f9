"""Which of our GPT's speedrun settings a target format cannot express: one line naming the setting.

transformers' ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` and llama.cpp's ``gpt2`` / ``llama``
architectures have no final-logit soft-capping (Gemma-2 has one, under another architecture we do
not write) and exactly their family's MLP (GELU-tanh, SwiGLU). Writing such a model anyway would
load without an error and compute something else, so export refuses it. A llama block with q/k
norms is Qwen3's and is written as one (models/llama_parts.py); GPT-2 has no such sibling.
``zero_init_proj`` changes only the starting weights: it exports as any other run.
"""

from __future__ import annotations

from gradtune.models.gpt import GPTConfig
from gradtune.runtime.errors import GradtuneError

FAMILY_MLP = {"gpt2": "gelu", "llama": "swiglu"}


def refuse_unexpressible(cfg: GPTConfig, where: str, target: str) -> None:
    """Raise a one-line GradtuneError when ``cfg`` uses a setting ``target`` cannot hold.
    where: the command's words ("export --hf"); target: the format's class ("LlamaForCausalLM")."""
    if cfg.qk_norm and cfg.family != "llama":
        raise GradtuneError(f"{where}: gpt.qk_norm=true (RMSNorm on q and k) has no counterpart in {target}")
    if cfg.logit_softcap is not None:
        raise GradtuneError(
            f"{where}: gpt.logit_softcap={cfg.logit_softcap:g} (logits soft-capped) has no counterpart in {target}"
        )
    if cfg.mlp != FAMILY_MLP[cfg.family]:
        raise GradtuneError(
            f"{where}: gpt.mlp={cfg.mlp} has no counterpart in {target} "
            f"(its MLP is {FAMILY_MLP[cfg.family]}, gpt.family={cfg.family}'s own)"
        )
