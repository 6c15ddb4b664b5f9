"""Which parameters train under each method: full, freeze, head, bitfit; summary counts."""

from __future__ import annotations

import pytest
import torch

from gradtune.config import FinetuneSection, load_config
from gradtune.finetune import freeze, methods
from gradtune.finetune.bitfit import bitfit
from gradtune.finetune.summary import count, summary
from gradtune.runtime.errors import GradtuneError, InputError

pytest.importorskip("transformers")
from tests import tiny_hf  # noqa: E402


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=3, n_head=2, n_positions=16))


@pytest.mark.parametrize(
    "build,blocks", [(tiny_hf.bert, "encoder.layer"), (tiny_hf.llama, "model.layers"), (gpt2, "transformer.h")]
)
def test_find_blocks(build, blocks):
    assert freeze.find_blocks(build()) == blocks


def test_last_block_and_what_follows_bert():
    model = freeze.freeze(tiny_hf.bert(), train_last_blocks=1)
    names = trainable(model)
    assert names and all(n.startswith(("encoder.layer.1.", "pooler.")) for n in names)
    assert any(n.startswith("pooler.") for n in names)


def test_last_block_llama_trains_final_norm_not_tied_embedding():
    model = freeze.freeze(tiny_hf.llama(), train_last_blocks=1)
    names = trainable(model)
    assert "model.norm.weight" in names and "model.embed_tokens.weight" not in names
    assert all(n.startswith("model.layers.1.") or n == "model.norm.weight" for n in names)


def test_patterns_and_embeddings():
    model = freeze.freeze(tiny_hf.bert(), patterns=["*.attention.self.query.*"], embeddings=False)
    names = trainable(model)
    assert {n for n in names if "embeddings" not in n} == {
        f"encoder.layer.{i}.attention.self.query.{w}" for i in (0, 1) for w in ("weight", "bias")
    }
    assert "embeddings.word_embeddings.weight" in names
    assert "embeddings.LayerNorm.weight" not in names  # a norm, not an nn.Embedding


def test_regex_pattern():
    model = freeze.freeze(tiny_hf.llama(), patterns=[r"re:model\.layers\.0\..*norm.*"])
    assert trainable(model) == {
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
    }


def test_freeze_nothing_to_train_and_bad_n_are_errors():
    with pytest.raises(InputError, match="no parameter to train"):
        freeze.freeze(tiny_hf.bert(), patterns=["nothing.*"])
    with pytest.raises(InputError, match="has 2 blocks"):
        freeze.freeze(tiny_hf.bert(), train_last_blocks=3)


def test_full_and_bitfit():
    model = freeze.full(tiny_hf.bert().requires_grad_(False))
    assert trainable(model) == {n for n, _ in model.named_parameters()}
    model = bitfit(tiny_hf.bert())
    assert trainable(model) and all(n.endswith(".bias") for n in trainable(model))
    with pytest.raises(InputError, match="no bias"):
        bitfit(tiny_hf.llama())


def test_head_method_trains_only_the_head_and_summary_counts():
    body = tiny_hf.bert()
    n_body = sum(p.numel() for p in body.parameters())
    model, names = methods.apply(body, "head", num_outputs=3)
    assert names == {"head.weight", "head.bias"} == trainable(model)
    assert count(model) == (32 * 3 + 3, n_body + 32 * 3 + 3)
    assert summary(model).startswith(f"trainable 99 / {n_body + 99:,} parameters")


def test_head_forward_mean_and_cls_pooling():
    body = tiny_hf.bert().eval()
    ids = torch.tensor([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0]])
    mask = (ids != 0).long()
    for pooling in ("mean", "cls"):
        model, _ = methods.apply(body, "full", num_outputs=2, finetune=FinetuneSection(pooling=pooling))
        model.eval()
        h = body(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = h[:, 0] if pooling == "cls" else (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(model(ids, mask), model.head(pooled))


def test_method_setting_errors():
    with pytest.raises(InputError, match="unknown fine-tuning method 'prefix'"):
        methods.apply(tiny_hf.bert(), "prefix")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="needs a classification or regression task"):
        methods.apply(tiny_hf.bert(), "head")
    with pytest.raises(GradtuneError, match="apply to method 'freeze', not 'lora'"):
        load_config(None, ["method=lora", "freeze.train_last_blocks=1"])


def test_lora_with_head_trains_lora_and_head():
    model, names = methods.apply(tiny_hf.bert(), "lora", num_outputs=2)
    assert {"head.weight", "head.bias"} <= names
    assert all(n.startswith("head.") or ".lora_" in n for n in names)


def test_head_freezes_the_unused_bert_pooler():
    """The head pools last_hidden_state; BERT's pooler would get no gradient (audit failure)."""
    model, names = methods.apply(tiny_hf.bert(), "full", num_outputs=2)
    assert not any(n.startswith("body.pooler.") for n in names)
    assert "body.encoder.layer.0.attention.self.query.weight" in names
