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


def _llama(vocab: int, width: int):
    """A random 2-layer transformers Llama with grouped-query attention (4 heads, 2 key/value)."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=width * 3 // 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg)


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
        hf = _llama(vocab=300, width=64)
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


def test_seed_per_group_draws_each_group_as_alone() -> None:
    """A list of n seeds: the rows are n groups, each drawing from its own generator, so a group's
    samples are those of a call with that group alone (several prompts' samples in one batch). A
    float64 Llama with left-padded prompts of different lengths (the rounding of a batched step
    cannot flip a draw); our GPT with prompts of one length."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    llama = _llama(vocab=50, width=32).double().eval()
    prompts, g, seeds = [[5, 7, 9], [11, 2, 3, 4, 6, 8], [1]], 3, [11, 22, 33]
    ids = torch.tensor([[0] * (6 - len(p)) + p for p in prompts for _ in range(g)])  # (9, 6) left pads
    mask = torch.tensor([[0] * (6 - len(p)) + [1] * len(p) for p in prompts for _ in range(g)])
    both = generate(llama, ids, 12, temperature=1.0, seed=seeds, attention_mask=mask)[:, 6:]
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        alone = generate(llama, torch.tensor([p] * g), 12, temperature=1.0, seed=s)[:, len(p) :]
        assert torch.equal(both[i * g : (i + 1) * g], alone), i
    assert not torch.equal(both[:g], both[g : 2 * g])  # the groups' draws differ
    gpt = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=32)).double().eval()
    rows = torch.randint(0, 50, (4, 5))
    both = generate(gpt, rows, 8, temperature=1.0, seed=[3, 4])
    assert torch.equal(both[:2], generate(gpt, rows[:2], 8, temperature=1.0, seed=3))
    assert torch.equal(both[2:], generate(gpt, rows[2:], 8, temperature=1.0, seed=4))
    with pytest.raises(ValueError, match="3 seeds do not split 4 rows"):
        generate(gpt, rows, 2, seed=[1, 2, 3])
