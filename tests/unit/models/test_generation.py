"""One sampling function for our GPT and Hugging Face causal LMs: greedy equals transformers'
generate(do_sample=False) token for token on a tiny Llama (plain and LoRA-wrapped, batch of
2); the KV cache changes nothing, also once the text outgrows the context; each row stops at
its own eos; seeded sampling repeats; ``gradtune generate`` validates its options and works on
a fine-tuned run and on a checkpoint folder inside it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from gradtune.cli import main  # noqa: E402
from gradtune.finetune import methods  # noqa: E402
from gradtune.finetune.lora import LoRALinear  # noqa: E402
from gradtune.jobs.reload import load_run  # noqa: E402
from gradtune.models.generate import context_length, generate  # noqa: E402
from gradtune.models.gpt import GPT, GPTConfig  # noqa: E402
from tests import tiny_hf  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
V = 64  # tiny_hf.llama's vocabulary; its context (max_position_embeddings) is 64 too


def _peaked(model: torch.nn.Module) -> torch.nn.Module:
    """Larger random weights: a peaked next-token distribution, so greedy argmax is no near-tie
    that float rounding between two code paths could flip."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def _llama(lora: bool = False) -> torch.nn.Module:
    model = tiny_hf.llama(vocab_size=V)
    if lora:  # B starts at zero (LoRA == base); _peaked then makes the update matter
        model, _ = methods.apply(model, "lora")
        assert any(isinstance(m, LoRALinear) for m in model.modules())
    return _peaked(model)


def _gpt() -> GPT:
    torch.manual_seed(0)
    return _peaked(GPT(GPTConfig.preset("tiny-llama")))


def _hf_greedy(model: torch.nn.Module, prompt: torch.Tensor, n: int) -> torch.Tensor:
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_hf_greedy_equals_transformers_generate(lora: bool) -> None:
    model = _llama(lora)
    prompt = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = _hf_greedy(model, prompt, 20)  # (2, 27)
    assert expected.shape == (2, 27)
    for use_cache in (True, False):
        got = generate(model, prompt, 20, temperature=0, use_cache=use_cache)
        assert torch.equal(got, expected), use_cache
    if lora:  # the LoRA update is live: the base weights alone generate something else
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.weight.data.zero_()
        assert not torch.equal(generate(model, prompt, 20, temperature=0), expected)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["hf", "gpt"])
def test_cache_invariant_past_the_context(family: str) -> None:
    """Cached until the text fills the context, then a sliding window: same tokens as a
    window from the start. Also greedy cached == uncached inside the context."""
    model = _llama() if family == "hf" else _gpt()
    limit = context_length(model)
    assert limit == 64
    for length in (10, limit - 4):  # 10 + 20 fits; 60 + 20 crosses the context after 4 tokens
        prompt = torch.randint(0, V, (2, length), generator=torch.Generator().manual_seed(length))
        cached = generate(model, prompt, 20, temperature=0)
        assert cached.shape == (2, length + 20)
        assert torch.equal(cached, generate(model, prompt, 20, temperature=0, use_cache=False)), length


@pytest.mark.parametrize("family", ["hf", "gpt"])
def test_eos_per_row(family: str) -> None:
    """Each row equals its eos-free greedy text up to its first eos, then only eos; generation
    stops when the last row has emitted it."""
    model = _llama() if family == "hf" else _gpt()
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(3))
    free = generate(model, prompt, 24, temperature=0)[:, 5:]  # (2, 24) without eos handling
    first = [{t: i for i, t in reversed(list(enumerate(row)))} for row in free.tolist()]  # token -> first step
    # eos: a token both rows emit, at steps at least 2 apart, so one row pads while the other runs.
    both = [t for t in first[0] if t in first[1] and abs(first[0][t] - first[1][t]) > 1]
    eos = min(both, key=lambda t: max(first[0][t], first[1][t]))
    stops = [first[0][eos], first[1][eos]]
    got = generate(model, prompt, 24, temperature=0, eos_id=eos)[:, 5:]
    assert got.shape == (2, max(stops) + 1) and max(stops) + 1 < 24  # stopped early, with the last row
    for row, stop in enumerate(stops):
        assert torch.equal(got[row, : stop + 1], free[row, : stop + 1]), row
        assert (got[row, stop + 1 :] == eos).all(), row


@pytest.mark.parametrize("family", ["hf", "gpt"])
def test_seeded_sampling_repeats_without_touching_global_rng(family: str) -> None:
    model = _llama() if family == "hf" else _gpt()
    prompt = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(4))
    state = torch.get_rng_state()
    a = generate(model, prompt, 16, temperature=1.5, top_k=40, top_p=0.95, seed=7)
    b = generate(model, prompt, 16, temperature=1.5, top_k=40, top_p=0.95, seed=7, use_cache=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and torch.equal(a[:, :4], prompt)
    assert not torch.equal(a, generate(model, prompt, 16, temperature=1.5, seed=8))
    assert model.training is False


def test_training_mode_is_restored() -> None:
    model = _llama().train()
    generate(model, torch.zeros(1, 3, dtype=torch.long), 2)
    assert model.training


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--num-samples", "0", "--num-samples must be in [1, 4096]"),
        ("--top-p", "0", "--top-p must be in (0, 1]"),
        ("--top-p", "1.5", "--top-p must be in (0, 1]"),
        ("--top-p", "nan", "--top-p must be in (0, 1]"),
        ("--temperature", "nan", "--temperature must be a finite number >= 0"),
        ("--temperature", "inf", "--temperature must be a finite number >= 0"),
        ("--temperature", "-1", "--temperature must be a finite number >= 0"),
        ("--max-new-tokens", "0", "--max-new-tokens must be >= 1"),
        ("--top-k", "0", "--top-k must be >= 1"),
    ],
)
def test_command_rejects_bad_options(tmp_path: Path, capsys, option: str, value: str, message: str) -> None:
    assert main(["generate", str(tmp_path), f"{option}={value}"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_command_on_lora_run_and_checkpoint(tmp_path: Path, capsys) -> None:
    """``gradtune generate`` on a LoRA-tuned tiny Llama run and on its checkpoint folder prints
    what transformers' greedy generate gives for the same weights."""
    tiny_hf.llama(tmp_path / "llama")
    pairs = [("what time", "the answer is now"), ("hello world", "yes good")]
    (tmp_path / "ins.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                f"model={tmp_path / 'llama'}",
                f"data={tmp_path / 'ins.jsonl'}",
                "task=instruction",
                "method=lora",
                "lr=3e-2",
                "epochs=4",
                "batch_size=1",
                "val_fraction=0",
                "checkpoint_every=2",
                "keep_checkpoints=4",
                "progress=off",
                "plot=false",
                f"out_dir={run}",
            ]
        )
        == 0
    )
    checkpoint = sorted((run / "checkpoints").iterdir())[0]  # step 2: weights of its own
    for folder in (run, checkpoint):
        r = load_run(folder)
        ids = r.tokenizer("what time")["input_ids"]
        expected = r.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=r.tokenizer.eos_token_id,
        )[0].tolist()
        capsys.readouterr()
        args = ["--prompt", "what time", "--temperature", "0", "--max-new-tokens", "6"]
        assert main(["generate", str(folder), *args, "--echo"]) == 0
        assert capsys.readouterr().out.strip() == r.tokenizer.decode(expected, skip_special_tokens=True)
        assert main(["generate", str(folder), *args]) == 0  # the new text only
        assert capsys.readouterr().out.strip() == r.tokenizer.decode(expected[len(ids) :], skip_special_tokens=True)
