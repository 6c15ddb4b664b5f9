"""Our GPT against oracles: transformers' GPT2LMHeadModel / LlamaForCausalLM for the forward,
PyTorch autograd without checkpointing for the backward, hand counts for parameters/FLOPs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gradtune.models.gpt import GPT, GPTConfig, KVCache
from gradtune.optim.groups import decay_groups

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny(family: str, **kw) -> GPTConfig:
    return GPTConfig.preset(f"tiny-{family}", **kw)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_forward_shape_and_causality(family: str) -> None:
    torch.manual_seed(0)
    model = GPT(tiny(family)).eval()
    x = torch.randint(0, 256, (2, 12))
    logits = model(x)
    assert logits.shape == (2, 12, 256)
    # Changing a future token must not change earlier logits.
    y = x.clone()
    y[:, 8] = (y[:, 8] + 1) % 256
    assert torch.equal(model(y)[:, :8], logits[:, :8])
    assert not torch.allclose(model(y)[:, 8:], logits[:, 8:])


def test_presets_and_param_counts() -> None:
    # GPT-2 small: the well-known 124M (124,439,808 with the tied lm_head counted once).
    with torch.device("meta"):
        assert GPT(GPTConfig.preset("gpt2")).num_params() == 124_439_808
        smol = GPT(GPTConfig.preset("smollm2-135m"))
    assert smol.num_params() == 134_515_008  # SmolLM2-135M
    shakespeare = GPT(GPTConfig.preset("shakespeare"))
    cfg = shakespeare.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (4, 4, 256, 256, 256)
    assert 100_000 < GPT(tiny("gpt2")).num_params() < 1_000_000
    wide = GPTConfig.preset("shakespeare", n_embd=512)  # derived sizes follow the override
    assert (wide.head_dim, wide.intermediate_size) == (128, 2048)
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.preset("gpt5")
    with pytest.raises(ValueError, match="did you mean 'n_layer'"):
        GPTConfig.preset("gpt2", n_layers=3)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        GPTConfig(family="llama", n_head=4, n_kv_head=3)


def test_a_meta_build_draws_nothing_and_imports_no_compiler() -> None:
    """The memory check counts a GPT's parameters on the meta device before every run: normal_ (or
    a rotary table's pow) on a meta tensor would import torch._dynamo, ~1 s of each run's start-up.
    Fails if either is drawn or computed there again. A fresh interpreter: the suite's own process
    has imported torch._dynamo long before."""
    code = (
        "import sys, torch\n"
        "from gradtune.models.gpt import GPT, GPTConfig\n"
        "for family in ('gpt2', 'llama'):\n"
        "    with torch.device('meta'):\n"
        "        model = GPT(GPTConfig.preset('shakespeare', family=family))\n"
        "    assert all(p.is_meta for p in model.parameters())\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_flops_per_token_matches_hand_count() -> None:
    model = GPT(GPTConfig.preset("shakespeare"))
    L, C, T, V = 4, 256, 256, 256
    # Per layer 12*C^2 weights (+ biases and norms), plus the (tied) lm_head V*C; wpe excluded.
    n = model.num_params() - T * C
    assert model.num_params(non_embedding=True) == n
    assert model.flops_per_token() == 6 * n + 12 * L * C * T
    assert abs(n - (L * 12 * C * C + V * C)) / n < 0.01


def test_init_std_and_tied_weights() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("shakespeare"))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 1e-3
    assert abs(model.transformer.h[0].mlp.c_proj.weight.std().item() - 0.02 / (2 * 4) ** 0.5) < 1e-3
    untied = GPT(tiny("llama", tie_embeddings=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight


def test_optim_groups() -> None:
    model = GPT(tiny("gpt2"))
    decay, no_decay = decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params()  # every parameter once, the tied matrix included once
    decay2, _ = decay_groups(model, 0.1, decay_embeddings=False)
    assert len(decay2["params"]) == len(decay["params"]) - 2  # wte (= lm_head) and wpe
    torch.optim.AdamW(decay_groups(model, 0.1), lr=1e-3)  # accepted as-is
    assert decay_groups(model, 0.0) is None  # no decay: one group of everything


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_activation_checkpointing_gives_same_gradients(family: str) -> None:
    torch.manual_seed(0)
    plain = GPT(tiny(family))
    ckpt = GPT(tiny(family, activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randint(0, 256, (2, 16))
    for m in (plain, ckpt):
        F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_equals_full_forward(family: str) -> None:
    torch.manual_seed(0)
    model = GPT(tiny(family)).eval()
    x = torch.randint(0, 256, (2, 14))
    full = model(x)
    cache = KVCache(model.config, 2, torch.float32, torch.device("cpu"))
    parts = [model(x[:, :5], cache=cache), model(x[:, 5:9], cache=cache)]  # prefill, then a chunk
    parts += [model(x[:, i : i + 1], cache=cache) for i in range(9, 14)]  # one token at a time
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)
    assert cache.pos == 14


def test_too_long_sequence_is_an_error() -> None:
    model = GPT(tiny("gpt2"))
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_bf16_autocast_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = GPT(tiny("llama"))
    x = torch.randint(0, 256, (2, 16))
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0, atol=0.05)


def test_overfits_one_batch() -> None:
    """The whole model trains: loss on one fixed batch falls far below ln(256) ~ 5.5."""
    torch.manual_seed(0)
    model = GPT(tiny("gpt2"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    x = torch.randint(0, 256, (4, 33))
    for _ in range(60):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0
