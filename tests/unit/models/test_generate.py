"""Sampling: greedy must equal transformers' generate(do_sample=False) token for token; the KV
cache must not change what is sampled; top-k / top-p / eos behave as documented."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gradtune.models.generate import filter_logits, generate
from gradtune.models.gpt import GPT, GPTConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_equals_transformers_generate(tmp_path: Path, family: str) -> None:
    transformers = pytest.importorskip("transformers")
    from gradtune.models.gpt_load import load_pretrained

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4)
        hf = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights: a peaked distribution, so argmax is not a near-tie
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.eval().save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    prompt = torch.randint(0, 300, (2, 7))
    expected = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=20,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    for use_cache in (True, False):
        got = generate(ours, prompt, max_new_tokens=20, temperature=0, use_cache=use_cache)
        assert torch.equal(got, expected), use_cache


@pytest.mark.slow
def test_sampling_is_seeded_and_cache_invariant() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny-llama"))
    prompt = torch.randint(0, 256, (3, 5))
    a = generate(model, prompt, 30, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    b = generate(model, prompt, 30, temperature=1.0, top_k=50, top_p=0.9, seed=7, use_cache=False)
    assert a.shape == (3, 35) and torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(model, prompt, 30, seed=8))


def test_generation_beyond_block_size_crops_context() -> None:
    model = GPT(GPTConfig.preset("tiny-gpt2"))  # block_size 64
    out = generate(model, torch.zeros(1, 60, dtype=torch.long), 10, temperature=0)
    assert out.shape == (1, 70)


def test_eos_stops_and_pads() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny-gpt2"))
    with torch.no_grad():  # make token 3 overwhelmingly likely after anything
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[3] = 10.0
    out = generate(model, torch.zeros(2, 4, dtype=torch.long), 10, temperature=0, eos_id=3)
    assert out.shape == (2, 5) and (out[:, 4] == 3).all()


def test_filter_logits() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]]).log_softmax(-1)  # probs ~ .64 .24 .09 .03
    assert torch.isinf(filter_logits(logits, top_k=2, top_p=None)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, top_k=None, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]  # .64 < .7, so the second one stays
    assert (~torch.isinf(filter_logits(logits, None, top_p=0.01))).sum() == 1  # top token always
