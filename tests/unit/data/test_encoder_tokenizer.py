"""A run's saved BERT tokenizer read with the tokenizers library alone (data/encoder_tokenizer.py):
the ids transformers' tokenizer gives, at every truncation length; a folder it cannot stand in
for is left to transformers (None)."""

from __future__ import annotations

import json
import shutil

import pytest

from gradtune.data.encoder_tokenizer import encoder_tokenizer

pytest.importorskip("transformers")
from tests import tiny_hf  # noqa: E402
from tests.unit.finetune.test_lora import _minilm  # noqa: E402

TEXTS = [
    "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005.",
    "",
    "   ",
    "Héllo Wörld ÀÉÎ naïve café's",
    "中文字符 test",
    "emoji 😀👍 ok",
    "a " * 300,
    "x" * 1000,
    "\u00a0nbsp\tTab\r\nCRLF",
    "[CLS] [SEP] [MASK] words around special tokens",
]


@pytest.fixture
def saved(tmp_path, monkeypatch):
    """MiniLM's tokenizer as a run saves it (save_pretrained into the run's tokenizer/)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    folder = tmp_path / "tokenizer"
    AutoTokenizer.from_pretrained(str(_minilm())).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("max_length", [3, 8, 64, 512])
def test_ids_equal_transformers(saved, max_length):
    from transformers import AutoTokenizer

    ref, ours = AutoTokenizer.from_pretrained(str(saved)), encoder_tokenizer(saved)
    assert ours is not None
    want = ref(TEXTS, truncation=True, max_length=max_length)["input_ids"]
    assert ours(TEXTS, truncation=True, max_length=max_length)["input_ids"] == want
    assert (len(ours), ours.pad_token_id, ours.eos_token_id) == (len(ref), ref.pad_token_id, ref.eos_token_id)


def test_a_saved_file_that_pads_does_not_pad(saved):
    """A run's tokenizer.json can hold padding to 128 (a run's file did): batches pad themselves."""
    pipeline = json.loads((saved / "tokenizer.json").read_text())
    pipeline["padding"] = {
        "strategy": {"Fixed": 128},
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 0,
        "pad_type_id": 0,
        "pad_token": "[PAD]",
    }
    (saved / "tokenizer.json").write_text(json.dumps(pipeline))
    ids = encoder_tokenizer(saved)(["hello"], truncation=True, max_length=64)["input_ids"]
    assert len(ids[0]) == 3  # [CLS] hello [SEP]


def _edit(folder, **settings):
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))


@pytest.mark.parametrize(
    "settings",
    [{"truncation_side": "left"}, {"do_lower_case": False}, {"tokenizer_class": "RobertaTokenizer"}],
    ids=lambda s: next(iter(s)),
)
def test_settings_it_does_not_follow_are_left_to_transformers(saved, settings):
    _edit(saved, **settings)
    assert encoder_tokenizer(saved) is None


def test_other_and_broken_folders_are_left_to_transformers(saved, tmp_path):
    tiny_hf.tokenizer("bert").save_pretrained(str(tmp_path / "fast"))  # PreTrainedTokenizerFast
    assert encoder_tokenizer(tmp_path / "fast") is None
    assert encoder_tokenizer(tmp_path / "missing") is None
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    (broken / "tokenizer.json").write_text("{not json")
    assert encoder_tokenizer(broken) is None
