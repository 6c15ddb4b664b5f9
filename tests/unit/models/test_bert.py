"""gradtune's own BERT encoder (models/bert.py) against its oracle, transformers' BertModel: the
same last hidden states bit for bit (float32 and bf16 autocast, padded and unpadded batches), the
same parameter names, BERT and the RoBERTa family; configs and files it does not compute the
same way are left to transformers (None), a weight of the wrong shape is one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gradtune.models import hf
from gradtune.models.bert import BertModel, load_bert

pytest.importorskip("transformers")
from tests import tiny_hf  # noqa: E402
from tests.unit.finetune.test_lora import _minilm  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(6, 24) ids and a mask with two padded rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (6, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    mask[3, 5:] = 0
    return ids, mask


def _hidden(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, amp: bool) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=amp):
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_minilm_equals_transformers_bit_for_bit(amp):
    source = _minilm()
    ref, ours = hf.load_model(source, "encoder").eval(), load_bert(source).eval()
    assert isinstance(ours, BertModel)
    assert list(dict(ours.named_parameters())) == list(dict(ref.named_parameters()))
    ids, mask = _batch(ours.config.vocab_size)
    for m in (mask, torch.ones_like(mask)):  # padding: a boolean mask; none: no mask at all
        assert torch.equal(_hidden(ours, ids, m, amp), _hidden(ref, ids, m, amp))


def _tiny(tmp_path, **config) -> tuple[object, object]:
    """A tiny random BERT saved with ``config`` overrides: (folder, transformers' model)."""
    model = tiny_hf.bert()
    for k, v in config.items():
        setattr(model.config, k, v)
    model.save_pretrained(str(tmp_path))
    return tmp_path, model


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_tiny_encoder_equals_transformers(tmp_path, act):
    folder, _ = _tiny(tmp_path, hidden_act=act)
    ref, ours = hf.load_model(folder, "encoder").eval(), load_bert(folder).eval()
    ids, mask = _batch(64)
    assert torch.equal(_hidden(ours, ids, mask, False), _hidden(ref, ids, mask, False))


def test_a_task_models_checkpoint_loads_its_body(tmp_path):
    """BertForSequenceClassification saves the body under 'bert.' beside its classifier: the body
    loads, as transformers' AutoModel loads it."""
    from transformers import BertForSequenceClassification

    body = tiny_hf.bert()
    task = BertForSequenceClassification(body.config)
    task.bert.load_state_dict(body.state_dict())
    task.save_pretrained(str(tmp_path))
    assert any(k.startswith("classifier.") for k in load_file(str(tmp_path / "model.safetensors")))
    ref, ours = hf.load_model(tmp_path, "encoder").eval(), load_bert(tmp_path).eval()
    ids, mask = _batch(64)
    assert torch.equal(_hidden(ours, ids, mask, False), _hidden(ref, ids, mask, False))


def test_legacy_layer_norm_names_and_pretraining_heads_load(tmp_path):
    """An original BERT checkpoint's names: the body under 'bert.', LayerNorm gamma / beta, the
    pretraining heads under 'cls.' (not part of the body)."""
    folder, model = _tiny(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    renamed = {}
    for k, v in state.items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        renamed["bert." + k] = v
    renamed["cls.predictions.bias"] = torch.zeros(64)
    save_file(renamed, str(folder / "model.safetensors"))
    ours = load_bert(folder).eval()
    ids, mask = _batch(64)
    assert torch.equal(_hidden(ours, ids, mask, False), _hidden(model.eval(), ids, mask, False))


def _padded(ids: torch.Tensor, mask: torch.Tensor, pad: int) -> torch.Tensor:
    return torch.where(mask.bool(), ids, torch.full_like(ids, pad))


@pytest.mark.parametrize("kind,task", [("roberta", False), ("roberta", True), ("xlm-roberta", False)])
def test_roberta_family_equals_transformers(tmp_path, kind, task):
    """RoBERTa numbers positions from its pad id + 1 over real tokens: the padded rows' real
    tokens keep their positions, bitwise transformers' outputs."""
    body = tiny_hf.roberta(tmp_path, kind, task=task)
    ours = load_bert(tmp_path).eval()
    ids, mask = _batch(64)
    ids = _padded(ids, mask, 1)
    for amp in (False, True):
        assert torch.equal(_hidden(ours, ids, mask, amp), _hidden(body, ids, mask, amp))
        full = torch.ones_like(mask)
        assert torch.equal(_hidden(ours, ids, full, amp), _hidden(body, ids, full, amp))


@pytest.mark.parametrize(
    "config",
    [
        {"hidden_act": "gelu_new"},  # a tanh approximation written as its own formula
        {"is_decoder": True},
        {"position_embedding_type": "relative_key"},
        {"chunk_size_feed_forward": 4},
        {"model_type": "distilbert"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_what_it_does_not_compute_is_left_to_transformers(tmp_path, config):
    folder, _ = _tiny(tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, **config}))
    assert load_bert(folder) is None


def test_weights_it_cannot_name_are_left_to_transformers(tmp_path):
    folder, _ = _tiny(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    state.pop("encoder.layer.1.output.dense.weight")
    save_file(state, str(folder / "model.safetensors"))
    assert load_bert(folder) is None


def test_a_weight_of_the_wrong_shape_is_one_line(tmp_path):
    folder, _ = _tiny(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    state["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(65, 32)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(hf.ModelSourceError, match=r"encoder.layer.0.intermediate.dense.weight is \[65, 32\]") as e:
        load_bert(folder)
    assert "\n" not in str(e.value)


def test_the_pooler_may_be_absent(tmp_path):
    """BertModel(add_pooling_layer=False) saves no pooler: the body still loads (the pooler is
    never computed)."""
    folder, model = _tiny(tmp_path)
    state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if not k.startswith("pooler.")}
    save_file(state, str(folder / "model.safetensors"))
    ours = load_bert(folder).eval()
    ids, mask = _batch(64)
    assert torch.equal(_hidden(ours, ids, mask, False), _hidden(model.eval(), ids, mask, False))
