"""GGUF export: the file reloads in our GGUF loader and in transformers (oracles) with the same
logits, the tokenizer metadata gives transformers the same tokenizer, and bad input writes nothing."""

from __future__ import annotations

import json

import pytest
import torch

from gradtune.config import LoraSection
from gradtune.finetune import gguf_export, lora, methods
from gradtune.models.gpt import GPT, GPTConfig
from gradtune.models.gpt_gguf import load_gguf, unpermute_rotary
from gradtune.runtime.errors import GradtuneError

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
from tests import tiny_hf  # noqa: E402

TEXT = (
    "the quick brown fox jumps over the lazy dog. what time is it? answer the question now, "
    "hello world 12345 free prize call me at home. "
) * 4
IDS = torch.tensor([[2, 17, 40, 33, 5, 60, 61, 1, 9, 30, 44, 45]])  # (1, 12)


def bpe_folder(folder, vocab_size: int = 300):
    """A byte-level BPE (GPT-2 split) trained on TEXT with <|endoftext|>, <s>, <pad> specials,
    saved as a HF tokenizer folder; returns the fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(str(folder))
    return fast


def test_permute_inverts_the_loaders_unpermute():
    w = torch.randn(4 * 8, 5)  # 4 heads of size 8
    assert torch.equal(unpermute_rotary(gguf_export.permute_rotary(w, 4), 4), w)
    assert not torch.equal(gguf_export.permute_rotary(w, 4), w)


@pytest.mark.parametrize("tied", [True, False])
def test_our_llama_gpt_round_trips_f32(tmp_path, tied):
    tok = bpe_folder(tmp_path / "tok")
    torch.manual_seed(0)
    cfg = GPTConfig(
        family="llama",
        vocab_size=len(tok) + 4,
        block_size=32,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=32,
        intermediate_size=64,
        norm_eps=1e-5,
        rope_theta=500.0,
        tie_embeddings=tied,
    )
    model = GPT(cfg).eval()
    for p in model.parameters():  # norms away from 1: a swapped norm would show
        torch.nn.init.normal_(p, 0.0, 0.2)
    out = gguf_export.export_gguf(model, gguf_export.vocab_from_hf_folder(tmp_path / "tok"), tmp_path / "m.gguf", "f32")
    back = load_gguf(out).eval()
    assert back.config.tie_embeddings == tied and back.config.n_kv_head == 2 and back.config.rope_theta == 500.0
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), model(IDS), atol=1e-5, rtol=0)
    tokens = gguf.GGUFReader(str(out)).fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == cfg.vocab_size and tokens[-1] == f"[PAD{cfg.vocab_size - 1}]"  # padded rows


def test_qk_norm_gpt_is_written_as_qwen3(tmp_path):
    """gpt.qk_norm: llama.cpp's qwen3 architecture (its q/k norms, HF's rotary rows unpermuted);
    transformers' GGUF reader builds a Qwen3ForCausalLM with our logits, and so does our loader.
    Head size 128: transformers reads no qwen3 head size from GGUF and takes Qwen3's default."""
    from transformers import AutoModelForCausalLM

    tok = bpe_folder(tmp_path / "tok")
    shape = dict(family="llama", vocab_size=len(tok), block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**shape, head_dim=128, intermediate_size=96, qk_norm=True, tie_embeddings=False)).eval()
    for p in model.parameters():  # q/k norm weights away from 1: a dropped or swapped norm would show
        torch.nn.init.normal_(p, 1.0 if p.dim() == 1 else 0.0, 0.2)
    out = gguf_export.export_gguf(
        model, gguf_export.vocab_from_hf_folder(tmp_path / "tok"), tmp_path / "o" / "m.gguf", "f32"
    )
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "qwen3"
    raw = {t.name: torch.from_numpy(t.data.copy()).reshape(t.data.shape) for t in reader.tensors}
    q_rows = model.transformer.h[0].attn.c_attn.weight[: 2 * 128]
    assert torch.equal(raw["blk.0.attn_q.weight"], q_rows.detach())  # not permuted
    assert torch.equal(raw["blk.1.attn_k_norm.weight"], model.transformer.h[1].attn.k_norm.weight.detach())
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "o"), gguf_file="m.gguf").eval()
    assert type(theirs).__name__ == "Qwen3ForCausalLM"
    back = load_gguf(out).eval()
    assert back.config.qk_norm and back.config.head_dim == 128
    with torch.no_grad():
        ours = model(IDS)
        assert ours.abs().max() > 1.0
        torch.testing.assert_close(theirs(IDS).logits, ours, atol=1e-4, rtol=0)
        torch.testing.assert_close(back(IDS), ours, atol=1e-5, rtol=0)


def _hf_llama(tmp_path, lora_steps: int = 0):
    tok = bpe_folder(tmp_path / "hf")
    model = tiny_hf.llama(vocab_size=len(tok), seed=1)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.normal_(p, 1.0, 0.3)
    model.save_pretrained(str(tmp_path / "hf"))
    return model.eval(), tok


def test_hf_llama_round_trips_through_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = _hf_llama(tmp_path)
    gguf_export.export_gguf(
        model, gguf_export.vocab_from_hf_folder(tmp_path / "hf"), tmp_path / "out" / "m.gguf", "f32"
    )
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), gguf_file="m.gguf").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, model(IDS).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(load_gguf(tmp_path / "out" / "m.gguf")(IDS), model(IDS).logits, atol=1e-4, rtol=0)
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path / "out"), gguf_file="m.gguf")
    sample = "hello world, what time is it? 123 the lazy fox"
    assert tok2(sample)["input_ids"] == tok(sample)["input_ids"]
    assert (tok2.bos_token, tok2.eos_token, tok2.pad_token) == ("<s>", "<|endoftext|>", "<pad>")
    assert tok2.chat_template == tok.chat_template


def test_lora_updates_are_folded_in_and_q8_0_is_close(tmp_path):
    model, _ = _hf_llama(tmp_path)
    with torch.no_grad():
        reference = model(IDS).logits
    model, _ = methods.apply(model, "lora", lora=LoraSection(rank=4, alpha=8))
    for layer in lora.lora_layers(model).values():  # a nonzero update (B starts at 0)
        torch.nn.init.normal_(layer.lora_b.weight, 0.0, 0.2)
    with torch.no_grad():
        tuned = model(IDS).logits
    assert (tuned - reference).abs().max() > 1e-2
    vocab = gguf_export.vocab_from_hf_folder(tmp_path / "hf")
    f32 = load_gguf(gguf_export.export_gguf(model, vocab, tmp_path / "f32.gguf", "f32"))
    q8 = gguf_export.export_gguf(model, vocab, tmp_path / "q8.gguf", "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(q8)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    with torch.no_grad():
        torch.testing.assert_close(f32(IDS), tuned, atol=1e-5, rtol=0)
        diff = (load_gguf(q8)(IDS) - tuned).abs()
    assert 0 < diff.max() < 0.05 * tuned.abs().max()  # quantised: close, not equal


def test_bad_input_writes_nothing(tmp_path):
    tok = bpe_folder(tmp_path / "tok")
    vocab = gguf_export.vocab_from_hf_folder(tmp_path / "tok")
    gpt2 = GPT(GPTConfig(family="gpt2", vocab_size=len(tok), block_size=8, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(GradtuneError, match="family 'gpt2'"):
        gguf_export.export_gguf(gpt2, vocab, tmp_path / "a.gguf")
    small = GPT(GPTConfig(family="llama", vocab_size=len(tok) - 1, block_size=8, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(GradtuneError, match="do not belong together"):
        gguf_export.export_gguf(small, vocab, tmp_path / "a.gguf")
    with pytest.raises(GradtuneError, match="not one of f32, f16, bf16, q8_0, q6_k, .*q4_0.*llama-quantize"):
        gguf_export.export_gguf(small, vocab, tmp_path / "a.gguf", "q3_k_m")
    (tmp_path / "b.gguf").write_text("keep")
    llama = GPT(GPTConfig(family="llama", vocab_size=len(tok), block_size=8, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(GradtuneError, match="exists"):
        gguf_export.export_gguf(llama, vocab, tmp_path / "b.gguf")
    assert (tmp_path / "b.gguf").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.gguf", "tok"]  # no temporary left


def test_tokenizers_llama_cpp_cannot_express_are_refused(tmp_path):
    tiny_hf.tokenizer("llama").save_pretrained(str(tmp_path / "word"))  # WordLevel
    with pytest.raises(GradtuneError, match="model 'WordLevel' is not a byte-level BPE"):
        gguf_export.vocab_from_hf_folder(tmp_path / "word")
    bpe_folder(tmp_path / "tok")
    spec = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(GradtuneError, match="pre-tokenizer 'Whitespace'"):
        gguf_export.vocab_from_hf_folder(tmp_path / "tok")


def test_speedrun_settings_llama_cpp_cannot_express_are_refused(tmp_path):
    """zero_init_proj (only the starting weights) round-trips; soft-capping, relu2 are refused by name
    (qk_norm is qwen3's block: test_qk_norm_gpt_is_written_as_qwen3)."""
    tok = bpe_folder(tmp_path / "tok")
    vocab = gguf_export.vocab_from_hf_folder(tmp_path / "tok")
    shape = dict(family="llama", vocab_size=len(tok), block_size=16, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    zero = GPT(GPTConfig(**shape, zero_init_proj=True)).eval()
    for name, p in zero.named_parameters():
        if name.endswith("c_proj.weight"):
            torch.nn.init.normal_(p, 0.0, 0.2)
    back = load_gguf(gguf_export.export_gguf(zero, vocab, tmp_path / "zero.gguf", "f32")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), zero(IDS), atol=1e-5, rtol=0)
    for setting, kw in [("gpt.logit_softcap", dict(logit_softcap=30.0))]:
        with pytest.raises(GradtuneError, match=f"GGUF export: {setting}=.*has no counterpart"):
            gguf_export.export_gguf(GPT(GPTConfig(**shape, **kw)), vocab, tmp_path / "a.gguf")
    for mlp in ("relu2", "gelu"):
        with pytest.raises(GradtuneError, match=f"GGUF export: gpt.mlp={mlp} has no counterpart"):
            gguf_export.export_gguf(GPT(GPTConfig(**shape, mlp=mlp)), vocab, tmp_path / "a.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok", "zero.gguf"]
