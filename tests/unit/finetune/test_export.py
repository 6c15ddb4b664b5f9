"""Export: the PEFT adapter loads in peft, the merged folder loads in transformers (oracles)."""

from __future__ import annotations

import json

import pytest
import torch

from gradtune.config import LoraSection
from gradtune.data.sequences import SequenceDataset
from gradtune.finetune import export, lora, methods
from gradtune.objectives.causal_lm import CausalLM
from gradtune.objectives.classification import Classification
from gradtune.runtime.errors import InputError

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from tests import tiny_hf  # noqa: E402
from tests.unit.finetune.test_audit import fit  # noqa: E402
from tests.unit.finetune.test_lora import IDS, MASK, _minilm, out  # noqa: E402

# Four tiny sequences, token labels for the causal LM and a class per sequence.
SEQS = [[2, 5, 6, 7, 8, 3], [2, 9, 10, 3], [2, 11, 12, 13, 14, 15, 3], [2, 16, 3]]


def _train_lora(model, kind: str, steps: int = 3):
    model, trainable = methods.apply(model, "lora", lora=LoraSection(rank=4, alpha=8))
    if kind == "causal_lm":
        data, objective = SequenceDataset(SEQS, [list(s) for s in SEQS], 0), CausalLM(shift=True, token_accuracy=True)
    else:  # the bare encoder's hidden states: train them toward a sequence label with a fixed probe
        data, objective = SequenceDataset(SEQS, torch.tensor([0, 1, 0, 1]), 0), _ProbeObjective()
    fit(model, objective, data, steps, trainable, batch_size=4)
    return model.eval()


class _ProbeObjective:
    """CE of the first hidden unit pair of the mean-pooled output (a head-free encoder loss)."""

    def __call__(self, model, batch):
        h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return Classification()(lambda **_: h.mean(1)[:, :2], batch)


@pytest.mark.parametrize("kind,build", [("encoder", tiny_hf.bert), ("causal_lm", tiny_hf.llama)])
def test_peft_adapter_and_merged_folder_match_ours(tmp_path, kind, build):
    from transformers import AutoModel, AutoModelForCausalLM

    build(tmp_path / "base")
    cls = AutoModel if kind == "encoder" else AutoModelForCausalLM
    model = _train_lora(cls.from_pretrained(str(tmp_path / "base")), kind)
    assert all(layer.lora_b.weight.any() for layer in lora.lora_layers(model).values())  # B != 0
    ours = out(model)

    export.save_adapter(model, tmp_path / "adapter", str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    theirs = peft.PeftModel.from_pretrained(
        cls.from_pretrained(str(tmp_path / "base")), str(tmp_path / "adapter")
    ).eval()
    torch.testing.assert_close(out(theirs), ours, atol=1e-4, rtol=0)

    export.save_merged(model, tmp_path / "merged")
    merged = cls.from_pretrained(str(tmp_path / "merged")).eval()
    torch.testing.assert_close(out(merged), ours, atol=1e-4, rtol=0)
    torch.testing.assert_close(out(model), ours, atol=0, rtol=0)  # export did not touch the model


def test_bert_target_modules_are_readable_suffixes(tmp_path):
    model = lora.apply_lora(tiny_hf.bert(), rank=2)
    export.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["attention.output.dense", "key", "query", "value"]


def test_head_is_saved_beside_and_reloads(tmp_path):
    model, _ = methods.apply(tiny_hf.bert(), "lora", num_outputs=3)
    torch.nn.init.normal_(model.head.weight)
    model.eval()
    export.save_merged(model, tmp_path / "merged")
    from transformers import AutoModel

    again = export.load_head(AutoModel.from_pretrained(str(tmp_path / "merged")), tmp_path / "merged").eval()
    torch.testing.assert_close(again(IDS, MASK), model(IDS, MASK), atol=1e-5, rtol=0)


def test_adapter_without_lora_is_an_error(tmp_path):
    with pytest.raises(InputError, match="has none"):
        export.save_adapter(tiny_hf.bert(), tmp_path)


@pytest.mark.slow
def test_minilm_adapter_and_merged_match_ours(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    from gradtune.models import hf

    model, tok = hf.load(_minilm(), "encoder")
    model, _ = methods.apply(model, "lora", lora=LoraSection(rank=4))
    torch.manual_seed(0)
    for layer in lora.lora_layers(model).values():  # stands in for training: B != 0
        torch.nn.init.normal_(layer.lora_b.weight, std=0.02)
    model.eval()
    enc = tok(["free prize call now", "see you at home"], padding=True, return_tensors="pt")

    def hidden(m):
        return m(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state

    ours = hidden(model)
    export.save_adapter(model, tmp_path / "adapter", str(_minilm()))
    theirs = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(str(_minilm())), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(hidden(theirs), ours, atol=1e-4, rtol=0)
    export.save_merged(model, tmp_path / "merged", tok)
    merged = AutoModel.from_pretrained(str(tmp_path / "merged")).eval()
    torch.testing.assert_close(hidden(merged), ours, atol=1e-4, rtol=0)
    assert (tmp_path / "merged" / "tokenizer.json").exists()
