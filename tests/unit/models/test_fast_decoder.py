"""models/fast_decoder.py decodes Llama-family models as transformers does: next-token logits
equal transformers' forward (float32, 1e-5; bfloat16 within its rounding), left-padded batches
give each row what it gives alone and what transformers' generate gives with the same padding,
a LoRA layer is read as its merged weight, and the sampled text equals the transformers path's
token for token (seeded). Batched sampling (one batch of N copies of a prompt, one KV cache):
greedy rows all equal the single greedy text; seeded rows repeat with the seed and differ from
each other; ``gradtune generate --num-samples`` prints them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from gradtune.cli import main  # noqa: E402
from gradtune.commands import generate as generate_cmd  # noqa: E402
from gradtune.finetune import methods  # noqa: E402
from gradtune.finetune.lora import LoRALinear  # noqa: E402
from gradtune.jobs.reload import load_run  # noqa: E402
from gradtune.models import fast_decoder  # noqa: E402
from gradtune.models import generate as generate_module  # noqa: E402
from gradtune.models.generate import generate  # noqa: E402
from tests import tiny_hf  # noqa: E402

V = 64


def _llama(lora: bool = False) -> torch.nn.Module:
    model = tiny_hf.llama(vocab_size=V)
    if lora:
        model, _ = methods.apply(model, "lora")
    torch.manual_seed(1)
    with torch.no_grad():  # peaked next-token distributions: greedy is no near-tie
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def _left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _family(name: str) -> torch.nn.Module:
    """A tiny Llama, Mistral (no sliding window) or Qwen2 (q/k/v biases) with peaked weights."""
    if name == "llama":
        return _llama()
    import transformers

    config_cls, model_cls = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[name]
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    config = config_cls(vocab_size=V, intermediate_size=64, max_position_embeddings=64, sliding_window=None, **shape)
    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_supported_and_logits_equal_transformers(family: str) -> None:
    model = _family(family)
    assert fast_decoder.supported(model)
    prompt = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.1)):
        model.to(dtype)
        decoder = fast_decoder.Decoder(model, 2, 12, None)
        with torch.no_grad():
            got = [decoder(prompt[:, :6])] + [decoder(prompt[:, i : i + 1]) for i in range(6, 9)]
            for i, logits in enumerate(got):
                expected = model(prompt[:, : 6 + i]).logits[:, -1]  # (2, V), no cache
                assert torch.allclose(logits.float(), expected.float(), atol=tol, rtol=0), (dtype, i)
    model.to(torch.float32)


@pytest.mark.parametrize("new", [12, 40], ids=["unpacked", "packed"])  # packed from PACK_MIN_TOKENS
def test_left_padded_batch_equals_rows_alone_and_transformers(new: int) -> None:
    assert 12 < generate_module.PACK_MIN_TOKENS <= 40
    model = _llama()
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, V, (n,), generator=gen).tolist() for n in (7, 3, 5)]
    ids, mask = _left_padded(rows)
    got = generate(model, ids, new, temperature=0, attention_mask=mask)  # (3, 7 + new)
    expected = model.generate(
        ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    assert torch.equal(got, expected)
    for i, row in enumerate(rows):
        alone = generate(model, torch.tensor([row]), new, temperature=0)[0, len(row) :]
        assert torch.equal(got[i, ids.shape[1] :], alone), i


@pytest.mark.parametrize("new", [12, 40], ids=["unpacked", "packed"])
def test_repeated_prompts_prefilled_once_give_the_rows_computed_one_by_one(new: int, monkeypatch) -> None:
    """repeats=G (GRPO's G samples of each prompt): each left-padded prompt runs once, its keys and
    values copied to its G rows; the seeded draws equal those of every row computed (repeats=1),
    and the prefill computed B / G rows."""
    model = _llama()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, V, (n,), generator=gen).tolist() for n in (7, 3, 5)]
    ids, mask = _left_padded([p for p in prompts for _ in range(4)])  # (12, 7)
    kwargs = dict(temperature=1.0, seed=[1, 2, 3], attention_mask=mask)
    every_row = generate(model, ids, new, **kwargs)
    rows_seen = []
    embedding = fast_decoder.F.embedding
    monkeypatch.setattr(fast_decoder.F, "embedding", lambda i, w: rows_seen.append(i.shape[0]) or embedding(i, w))
    shared = generate(model, ids, new, repeats=4, **kwargs)
    assert rows_seen[0] == 3 and torch.equal(shared, every_row)  # 3 prompts prefilled, the same 12 samples
    assert not torch.equal(shared[0], shared[1])  # a prompt's 4 rows still draw 4 samples
    with pytest.raises(ValueError, match="repeats=5 does not split 12 rows"):
        generate(model, ids, 2, repeats=5, attention_mask=mask)
    with pytest.raises(ValueError, match="not the same prompt"):
        generate(model, ids, 2, repeats=6, attention_mask=mask)


def test_lora_read_as_merged_and_model_unchanged() -> None:
    model = _llama(lora=True)
    assert fast_decoder.supported(model) and any(isinstance(m, LoRALinear) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(5))
    unmerged = generate(model, prompt, 15, temperature=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # no merge in place
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()
    assert torch.equal(generate(model, prompt, 15, temperature=0), unmerged)


def test_sampling_equals_the_transformers_path(monkeypatch) -> None:
    """The fast path changes the speed, not the text: seeded samples equal the tokens the
    transformers forward gives (the path every HF model took before it)."""
    model = _llama(lora=True)
    prompt = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(6))
    kwargs = dict(temperature=0.9, top_k=40, top_p=0.95, seed=11)
    fast = generate(model, prompt, 30, **kwargs)
    monkeypatch.setattr(generate_module.fast_decoder, "supported", lambda m: False)
    assert torch.equal(generate(model, prompt, 30, **kwargs), fast)


def test_batched_samples() -> None:
    """N copies of a prompt in one batch: greedy rows all equal the single greedy text;
    seeded rows repeat with the seed, differ from each other, and do not depend on the path."""
    model = _llama()
    prompt = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(7))
    single = generate(model, prompt, 40, temperature=0)
    batch = generate(model, prompt.repeat(4, 1), 40, temperature=0)  # packed weights (40 tokens)
    assert all(torch.equal(row, single[0]) for row in batch)
    a = generate(model, prompt.repeat(4, 1), 20, temperature=1.0, seed=3)
    assert torch.equal(a, generate(model, prompt.repeat(4, 1), 20, temperature=1.0, seed=3))
    assert len({tuple(r) for r in a[:, 5:].tolist()}) == 4
    assert not torch.equal(a, generate(model, prompt.repeat(4, 1), 20, temperature=1.0, seed=4))


def test_command_num_samples(tmp_path: Path, capsys) -> None:
    tiny_hf.llama(tmp_path / "llama")
    pairs = [("what time", "the answer is now"), ("hello world", "yes good")]
    (tmp_path / "ins.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    run = tmp_path / "run"
    train = [f"model={tmp_path / 'llama'}", f"data={tmp_path / 'ins.jsonl'}", "task=instruction", "method=lora"]
    settings = ["lr=3e-2", "epochs=2", "batch_size=1", "val_fraction=0", "progress=off", "plot=false"]
    assert main(["train", *train, *settings, f"out_dir={run}"]) == 0
    capsys.readouterr()
    base = ["generate", str(run), "--prompt", "what time", "--max-new-tokens", "8"]
    assert main([*base, "--temperature", "0", "--echo"]) == 0
    greedy = capsys.readouterr().out
    assert main([*base, "--temperature", "0", "--echo", "--num-samples", "3"]) == 0
    out = capsys.readouterr().out
    assert out == "".join(f"--- sample {i}\n{greedy}" for i in (1, 2, 3))
    seeded = [*base, "--temperature", "1.0", "--num-samples", "4", "--seed", "5"]
    assert main(seeded) == 0
    first = capsys.readouterr().out
    assert main(seeded) == 0
    assert capsys.readouterr().out == first and first.count("--- sample ") == 4
    assert main([*base, "--temperature", "0", "--precision", "bf16", "--echo"]) == 0
    r = load_run(run)
    ids = generate_cmd.encode_prompt(r, "what time")
    expected = generate(
        r.model.to(torch.bfloat16), torch.tensor([ids]), 8, temperature=0, eos_id=r.tokenizer.eos_token_id
    )
    assert capsys.readouterr().out.strip() == r.tokenizer.decode(expected[0].tolist(), skip_special_tokens=True).strip()
    assert main([*base, "--temperature", "0", "--precision", "auto", "--echo"]) == 0  # trained in fp32
    assert capsys.readouterr().out == greedy


def test_command_precision_auto_follows_a_bf16_run(tmp_path: Path, capsys) -> None:
    tiny_hf.llama(tmp_path / "llama")
    pairs = [("what time", "the answer is now"), ("hello world", "yes good")]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    run = tmp_path / "run"
    settings = ["task=instruction", "method=lora", "precision=bf16", "epochs=1", "batch_size=1", "val_fraction=0"]
    assert (
        main(["train", f"model={tmp_path / 'llama'}", f"data={tmp_path / 't.jsonl'}", *settings, f"out_dir={run}"]) == 0
    )
    capsys.readouterr()
    base = ["generate", str(run), "--prompt", "hello", "--max-new-tokens", "6", "--temperature", "0"]
    assert main([*base, "--precision", "bf16"]) == 0
    bf16 = capsys.readouterr().out
    assert main([*base, "--precision", "auto"]) == 0
    got = capsys.readouterr()
    assert got.out == bf16 and "precision auto: bf16 (the run trained in bf16)" in got.err


def test_left_padded_cached_equals_uncached() -> None:
    """The fast decoder (cached) and transformers' forward on the whole padded text (uncached)
    give the same tokens; past the context the sliding window carries the mask along."""
    model = _llama()
    ids, mask = _left_padded([[5, 6, 7], [1, 2, 3, 4, 5]])
    cached = generate(model, ids, 10, temperature=0, attention_mask=mask)
    assert torch.equal(cached, generate(model, ids, 10, temperature=0, attention_mask=mask, use_cache=False))
    assert generate(model, ids, 70, temperature=0, attention_mask=mask).shape == (2, 75)  # context: 64


def test_packed_weights_kept_until_a_weight_changes() -> None:
    """Asked to keep it, the packed copy (float32 at B > 1, bfloat16) is built once and reused by
    the next call while the parameters are unchanged; any write -- in place, to a LoRA factor, by gradtune's
    fused optimizer, ``.to`` and back (new storages) -- makes the next call pack the new weights
    (its tokens equal those of a fresh copy of the model, which shares no kept copy)."""
    from gradtune.optim import SGD

    model = _llama(lora=True)
    prompt = torch.randint(1, V, (4, 5), generator=torch.Generator().manual_seed(8))
    new = generate_module.PACK_MIN_TOKENS

    def fresh() -> torch.Tensor:  # a copy: its own kept weights, built from scratch
        import copy

        return generate(copy.deepcopy(model), prompt, new, temperature=0, keep_packed=True)

    first = generate(model, prompt, new, temperature=0, keep_packed=True)
    kept = fast_decoder._PACKED[model][2]
    assert kept.head.kind == "onednn" and torch.equal(
        generate(model, prompt, new, temperature=0, keep_packed=True), first
    )
    assert fast_decoder._PACKED[model][2] is kept  # unchanged weights: reused, not re-packed
    assert fast_decoder.weights(model, 3) is not kept  # another batch size: packed for it
    assert fast_decoder.weights(model, 4, keep=False) is not fast_decoder.weights(model, 4)  # not asked: fresh

    down = model.model.layers[1].mlp.down_proj
    changes = [lambda: getattr(down, "base", down).weight[0, :].mul_(-5.0)]  # one row of one layer, in place
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    changes.append(lambda: [m.lora_b.weight.add_(0.5) for m in lora])  # the LoRA update B A: W + B A packed

    def sgd_step() -> None:
        params = list(model.parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        SGD(params, lr=0.5).step()  # the fused C kernel: writes around torch
        for p in params:
            p.grad = None

    changes.append(sgd_step)
    changes.append(lambda: model.to(torch.bfloat16).to(torch.float32))  # rounded, new storages
    for i, change in enumerate(changes):
        before = generate(model, prompt, new, temperature=0, keep_packed=True)
        with torch.no_grad():
            change()
        after = generate(model, prompt, new, temperature=0, keep_packed=True)
        assert torch.equal(after, fresh()), i
        assert not torch.equal(after, before) or i == 3, i  # bf16 rounding need not change a token


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_batch_one_float32_steps_in_c_equal_transformers(family: str, monkeypatch) -> None:
    """The C step (models/decode_kernel.py) at batch 1: logits of every cached step equal
    transformers' uncached forward to float32 rounding; without the library, the torch path."""
    from gradtune.models import decode_kernel

    if decode_kernel.load() is None:
        pytest.skip("no C compiler here: the torch path is the one tested above")
    model = _family(family)
    prompt = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(3))
    decoder = fast_decoder.Decoder(model, 1, 20, None)
    assert decoder.step is not None
    with torch.no_grad():
        got = [decoder(prompt[:, :4])] + [decoder(prompt[:, i : i + 1]) for i in range(4, 16)]
        for i, logits in enumerate(got):
            expected = model(prompt[:, : 4 + i]).logits[:, -1]
            assert torch.allclose(logits, expected, atol=5e-5, rtol=1e-5), (i, (logits - expected).abs().max())
    assert torch.equal(
        generate(model, prompt[:, :4], 12, temperature=0),
        model.generate(prompt[:, :4], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0),
    )
    monkeypatch.setattr(decode_kernel, "load", lambda: None)
    assert fast_decoder.Decoder(model, 1, 20, None).step is None


def test_c_gemv_equals_mm_on_every_tail() -> None:
    from gradtune.models import decode_kernel

    if decode_kernel.load() is None:
        pytest.skip("no C compiler here")
    gen = torch.Generator().manual_seed(0)
    for rows, n in ((1, 1), (7, 15), (8, 16), (9, 17), (37, 131), (64, 576)):
        w, x = torch.randn(rows, n, generator=gen), torch.randn(n, generator=gen)
        assert torch.allclose(decode_kernel.gemv(w, x), w @ x, atol=1e-4, rtol=1e-5), (rows, n)


@pytest.mark.parametrize("family,pack", [("llama", True), ("llama", False), ("qwen2", True)])
def test_batched_float32_steps_in_c_equal_transformers(family: str, pack: bool) -> None:
    """Batches (decode_step.BatchStep: the GEMMs, C between them): left-padded rows' logits of
    every cached step equal transformers' with the same padding, on oneDNN-packed weights, on the
    model's own (a short call packs nothing), and with q/k/v biases (qwen2: plain GEMMs)."""
    from gradtune.models import decode_kernel, decode_step

    if decode_kernel.load() is None:
        pytest.skip("no C compiler here")
    model = _family(family)
    rows = [torch.randint(1, V, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (6, 2, 4)]
    ids, mask = _left_padded(rows)
    decoder = fast_decoder.Decoder(model, 3, 14, mask, pack)
    assert isinstance(decoder.step, decode_step.BatchStep)
    assert decoder.w.layers[0][1].kind == ("onednn" if pack and family == "llama" else "plain")  # q/k/v
    text, full = ids, mask
    with torch.no_grad():
        logits = decoder(ids)
        for i in range(8):
            tok = logits.argmax(-1, keepdim=True)  # (3, 1)
            text, full = torch.cat([text, tok], 1), torch.cat([full, torch.ones_like(tok)], 1)
            positions = (full.cumsum(-1) - 1).masked_fill(full == 0, 1)
            expected = model(text, attention_mask=full, position_ids=positions).logits[:, -1]
            logits = decoder(tok)
            assert torch.allclose(logits, expected, atol=5e-5, rtol=1e-5), (i, (logits - expected).abs().max())
