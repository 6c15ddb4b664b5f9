"""GGUF weight types: every --type reloads in our GGUF loader and in transformers (the oracle,
its own model code) with the same logits, within a per-type bound of the f32 export's; each
tensor is written in the type llama.cpp's rules give it."""

from __future__ import annotations

import pytest
import torch

from gradtune.finetune import gguf_export
from gradtune.finetune.gguf_types import KQUANT, TYPES, check_type, tensor_type
from gradtune.models.gpt import GPT, GPTConfig
from gradtune.models.gpt_gguf import load_gguf

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
from tests.unit.finetune.test_gguf_export import IDS, bpe_folder  # noqa: E402

# max |logit - f32 export's logit| on IDS for the model below (logits span about -2.9..3.1): about
# twice the value measured (f16 0.0030, bf16 0.0195, q8_0 0.070, q5_1 0.39, q5_0 0.78, q4_1 1.14,
# q4_0 1.48; README's table). Deterministic: the quantizers round, no randomness.
BOUND = {"f16": 0.006, "bf16": 0.04, "q8_0": 0.14, "q5_1": 0.8, "q5_0": 1.6, "q4_1": 2.3, "q4_0": 3.0}
BITS = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q5_1": "Q5_1", "q5_0": "Q5_0", "q4_1": "Q4_1", "q4_0": "Q4_0"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An untied 2-layer llama GPT (hidden 64: rows are whole 32-value blocks), its vocab and
    the folder its f32 export is in, with that export's logits on IDS."""
    tmp = tmp_path_factory.mktemp("gguf_types")
    tok = bpe_folder(tmp / "tok")
    torch.manual_seed(0)
    cfg = GPTConfig(
        family="llama",
        vocab_size=len(tok),
        block_size=32,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        intermediate_size=128,
        norm_eps=1e-5,
        rope_theta=500.0,
        tie_embeddings=False,
    )
    model = GPT(cfg).eval()
    for p in model.parameters():  # logits spread over a few units, norms away from 1
        torch.nn.init.normal_(p, 1.0 if p.ndim == 1 else 0.0, 0.2 if p.ndim == 1 else 0.1)
    vocab = gguf_export.vocab_from_hf_folder(tmp / "tok")
    (tmp / "out").mkdir()
    with torch.no_grad():
        f32 = load_gguf(gguf_export.export_gguf(model, vocab, tmp / "out" / "f32.gguf", "f32"))(IDS)
        torch.testing.assert_close(f32, model(IDS), atol=1e-5, rtol=0)
    return model, vocab, tmp / "out", f32


@pytest.mark.parametrize("qtype", [t for t in TYPES if t != "f32" and t not in KQUANT])
def test_every_type_reloads_in_ours_and_transformers_within_its_bound(exported, qtype):
    from transformers import AutoModelForCausalLM

    model, vocab, out, f32 = exported
    path = gguf_export.export_gguf(model, vocab, out / f"{qtype}.gguf", qtype)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == types["token_embd.weight"] == BITS[qtype]
    assert types["output.weight"] == ("Q8_0" if qtype in ("q5_1", "q5_0", "q4_1", "q4_0") else BITS[qtype])
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType[f"MOSTLY_{BITS[qtype]}"])
    with torch.no_grad():
        ours = load_gguf(path).eval()(IDS)
        theirs = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name).eval()(IDS).logits
    err = (ours - f32).abs().max().item()
    print(f"{qtype}: max |logit - f32 export's| {err:.4g} (bound {BOUND[qtype]}), {path.stat().st_size} bytes")
    assert 0 < err < BOUND[qtype]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def make_model(vocab_size: int, **kw) -> GPT:
    torch.manual_seed(0)
    base = dict(family="llama", block_size=32, n_head=4, n_kv_head=2, norm_eps=1e-5, rope_theta=500.0)
    model = GPT(GPTConfig(vocab_size=vocab_size, **base, **kw)).eval()
    for p in model.parameters():  # logits spread over a few units, norms away from 1
        torch.nn.init.normal_(p, 1.0 if p.ndim == 1 else 0.0, 0.2 if p.ndim == 1 else 0.05)
    return model


# the K-quant mixes on an untied 2-layer model of hidden 256 / ffn 512 (rows are whole 256-value
# super-blocks; use_more_bits(i, 2) picks layer 1): max |logit - f32 export's| on IDS measured (logits
# span -2.3..2.5) q6_k 0.21, q5_k_m 0.38, q5_k_s 0.41, q4_k_m 1.09, q4_k_s 0.93 (q8_0 0.072, q5_1 0.42,
# q4_0 0.90 on the same model; README's table); bound about 2x
K_BOUND = {"q6_k": 0.42, "q5_k_m": 0.76, "q5_k_s": 0.82, "q4_k_m": 2.2, "q4_k_s": 1.9}
K_MIX = {  # (attn_q, attn_v of layer 0, attn_v of layer 1, ffn_down of layer 1) as llama-quantize writes them
    "q6_k": ("Q6_K", "Q6_K", "Q6_K", "Q6_K"),
    "q5_k_m": ("Q5_K", "Q5_K", "Q6_K", "Q6_K"),
    "q5_k_s": ("Q5_K", "Q5_K", "Q5_K", "Q5_K"),
    "q4_k_m": ("Q4_K", "Q4_K", "Q6_K", "Q6_K"),
    "q4_k_s": ("Q4_K", "Q5_K", "Q5_K", "Q4_K"),
}


@pytest.fixture(scope="module")
def exported_256(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf_ktypes")
    tok = bpe_folder(tmp / "tok")
    model = make_model(len(tok), n_layer=2, n_embd=256, intermediate_size=512, tie_embeddings=False)
    vocab = gguf_export.vocab_from_hf_folder(tmp / "tok")
    (tmp / "out").mkdir()
    with torch.no_grad():
        f32 = load_gguf(gguf_export.export_gguf(model, vocab, tmp / "out" / "f32.gguf", "f32"))(IDS)
    return model, vocab, tmp / "out", f32


@pytest.mark.parametrize("qtype", list(KQUANT))
def test_k_quant_mixes_reload_in_ours_and_transformers_within_their_bound(exported_256, qtype):
    from transformers import AutoModelForCausalLM

    model, vocab, out, f32 = exported_256
    path = gguf_export.export_gguf(model, vocab, out / f"{qtype}.gguf", qtype)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    mix = tuple(types[f"blk.{n}.weight"] for n in ("0.attn_q", "0.attn_v", "1.attn_v", "1.ffn_down"))
    assert mix == K_MIX[qtype]
    assert types["output.weight"] == "Q6_K" and types["output_norm.weight"] == "F32"
    assert types["token_embd.weight"] == types["blk.0.ffn_gate.weight"] == types["blk.0.ffn_down.weight"] == mix[0]
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType[f"MOSTLY_{qtype.upper()}"])
    with torch.no_grad():
        ours = load_gguf(path).eval()(IDS)
        theirs = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name).eval()(IDS).logits
    err = (ours - f32).abs().max().item()
    print(f"{qtype}: max |logit - f32 export's| {err:.4g} (bound {K_BOUND[qtype]}), {path.stat().st_size} bytes")
    assert 0 < err < K_BOUND[qtype]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_k_quant_mix_follows_llama_quantize():
    assert check_type("Q4_K") == "q4_k_m" and check_type("q5_k") == "q5_k_m" and check_type("Q6_K") == "q6_k"
    more = [i for i in range(32) if tensor_type(f"blk.{i}.attn_v.weight", (256, 256), "q4_k_m", True, 32) == "q6_k"]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]  # first/last 8th, every 3rd between
    down = [tensor_type(f"blk.{i}.ffn_down.weight", (256, 512), "q5_k_m", True, 32) for i in range(32)]
    assert [i for i, k in enumerate(down) if k == "q6_k"] == more and set(down) == {"q5_k", "q6_k"}
    s = [tensor_type(f"blk.{i}.ffn_down.weight", (256, 512), "q4_k_s", True, 32) for i in range(6)]
    assert s == ["q5_k"] * 4 + ["q4_k"] * 2  # the first eighth
    assert tensor_type("blk.5.attn_v.weight", (256, 256), "q4_k_s", True, 32) == "q4_k"
    assert tensor_type("blk.3.attn_v.weight", (256, 256), "q4_k_s", True, 32) == "q5_k"
    assert tensor_type("blk.0.attn_k.weight", (64, 256), "q6_k", True, 32) == "q6_k"
    assert tensor_type("token_embd.weight", (300, 256), "q4_k_m", True, 32) == "q4_k"
    assert tensor_type("token_embd.weight", (300, 256), "q4_k_m", False, 32) == "q6_k"  # tied: the output
    # rows not whole 256-value super-blocks: llama-quantize's fallbacks, then f16 below whole 32-blocks
    assert tensor_type("blk.5.attn_q.weight", (576, 576), "q4_k_m", True, 32) == "q5_0"
    assert tensor_type("blk.5.attn_q.weight", (576, 576), "q5_k_s", True, 32) == "q5_1"
    assert tensor_type("blk.0.attn_v.weight", (192, 576), "q4_k_m", True, 32) == "q8_0"
    assert tensor_type("output.weight", (300, 576), "q4_k_m", True, 32) == "q8_0"
    assert tensor_type("blk.0.attn_q.weight", (48, 48), "q4_k_m", True, 32) == "f16"
    assert tensor_type("blk.0.attn_norm.weight", (256,), "q4_k_m", True, 32) == "f32"
    assert tensor_type("output.weight", (300, 256), "q4_0", True) == "q6_k"  # llama-quantize's output type


def test_which_type_each_tensor_gets():
    assert tensor_type("blk.0.attn_norm.weight", (64,), "q4_0", True) == "f32"  # 1-D: always f32
    assert tensor_type("blk.0.attn_q.weight", (64, 64), "bf16", True) == "bf16"
    assert tensor_type("blk.0.attn_q.weight", (64, 48), "bf16", True) == "bf16"  # no blocks in bf16
    for qtype in ("q8_0", "q5_1", "q4_0"):  # rows not whole 32-value blocks: f16
        assert tensor_type("blk.0.attn_q.weight", (64, 48), qtype, True) == "f16"
    assert tensor_type("output.weight", (300, 64), "q4_0", True) == "q8_0"  # the output projection
    assert tensor_type("token_embd.weight", (300, 64), "q4_0", True) == "q4_0"
    assert tensor_type("token_embd.weight", (300, 64), "q4_1", False) == "q8_0"  # tied: it is the output too
    assert tensor_type("token_embd.weight", (300, 64), "q8_0", False) == "q8_0"
    assert tensor_type("output.weight", (300, 64), "f16", True) == "f16"
