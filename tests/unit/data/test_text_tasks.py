"""Text tasks: tables to padded batches, label maps, instruction masking, LM windows, objectives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradtune.data.causal_text import load_causal_text
from gradtune.data.instructions import load_instructions
from gradtune.data.sequences import IGNORE
from gradtune.data.split import split_indices
from gradtune.data.text_tasks import DataError, LabelMap, load_text_task
from gradtune.runtime.errors import InputError

pytest.importorskip("transformers")
from tests import tiny_hf  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny_hf.tokenizer("bert")


@pytest.fixture(scope="module")
def ltok():
    return tiny_hf.tokenizer("llama")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_classification_padded_per_batch(tmp_path, tok):
    f = write(tmp_path / "train.csv", "text,label\nwin a prize now,spam\nmeet me at home,ham\nok,ham\n")
    data, labels = load_text_task(f, tok)
    assert labels.names == ["ham", "spam"] and len(data) == 3
    batch = data.get(torch.tensor([1, 2]))
    assert batch["input_ids"].shape == (2, 6)  # [CLS] meet me at home [SEP]; padded to the longest
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [0, 0] and batch["sample_id"].tolist() == [1, 2]
    labels.save(tmp_path / "labels.json")
    assert LabelMap.load(tmp_path / "labels.json") == labels


def test_headerless_tsv_with_columns_and_truncation(tmp_path, tok):
    f = write(tmp_path / "sms.csv", "ham\tmeet me at home\nspam\twin a prize now call now\n")
    data, labels = load_text_task(f, tok, columns=["label", "text"], max_length=4)
    assert labels.names == ["ham", "spam"]
    assert max(len(s) for s in data.input_ids) == 4


def test_jsonl_integer_labels_and_regression(tmp_path, tok):
    f = write(tmp_path / "t.jsonl", '{"text": "good", "label": 2}\n{"text": "bad", "label": 0}\n')
    data, labels = load_text_task(f, tok)
    assert labels.names == ["0", "1", "2"] and data.labels.tolist() == [2, 0]
    f = write(tmp_path / "r.jsonl", '{"text": "good", "score": 4.5}\n{"text": "bad", "score": -1}\n')
    data, labels = load_text_task(f, tok, task="regression", label_column="score")
    assert labels is None and data.labels.tolist() == [4.5, -1.0] and data.labels.dtype == torch.float32


def test_label_column_missing(tmp_path, tok):
    f = write(tmp_path / "t.csv", "text,class\ngood,a\n")
    with pytest.raises(DataError, match=r"t\.csv: no column 'label' \(columns: text, class\)"):
        load_text_task(f, tok)


def test_label_unseen_in_training_at_evaluation(tmp_path, tok):
    _, labels = load_text_task(write(tmp_path / "train.csv", "text,label\ngood,pos\nbad,neg\n"), tok)
    f = write(tmp_path / "eval.csv", "text,label\ngood,pos\nok,neutral\n")
    with pytest.raises(DataError, match=r"eval\.csv:3: label 'neutral' was not seen in training"):
        load_text_task(f, tok, label_map=labels)


def test_empty_text_row(tmp_path, tok):
    f = write(tmp_path / "t.csv", "text,label\ngood,pos\n  ,neg\n")
    with pytest.raises(DataError, match=r"t\.csv:3: column 'text' is empty"):
        load_text_task(f, tok)


def test_regression_label_not_a_number(tmp_path, tok):
    f = write(tmp_path / "t.csv", "text,label\ngood,1.0\nbad,high\n")
    with pytest.raises(DataError, match=r"t\.csv:3: regression label 'high' is not a number"):
        load_text_task(f, tok, task="regression")


def test_errors_are_one_line_input_errors(tmp_path, tok):
    with pytest.raises(InputError) as e:
        load_text_task(tmp_path / "missing.csv", tok)
    assert "\n" not in str(e.value) and "does not exist" in str(e.value)


def test_instructions_without_template_mask_prompt_and_train_eos(tmp_path, ltok):
    f = write(tmp_path / "i.jsonl", json.dumps({"prompt": "what time", "response": "good"}) + "\n")
    data = load_instructions(f, ltok)
    ids, labels = data.input_ids[0], data.labels[0]
    vocab = ltok.get_vocab()
    assert ids == [vocab["<s>"], vocab["what"], vocab["time"], vocab["good"], vocab["</s>"]]
    assert labels == [IGNORE, IGNORE, IGNORE, vocab["good"], vocab["</s>"]]
    batch = data.get(torch.tensor([0]))
    assert batch["labels"].shape == batch["input_ids"].shape


CHAT = (
    "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }} </s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant {% endif %}"
)


def test_instructions_messages_with_chat_template(tmp_path):
    tok = tiny_hf.tokenizer("llama")
    tok.chat_template = CHAT
    msgs = [
        {"role": "user", "content": "what time"},
        {"role": "assistant", "content": "good"},
        {"role": "user", "content": "yes"},
        {"role": "assistant", "content": "no ok"},
    ]
    f = write(tmp_path / "i.jsonl", json.dumps({"messages": msgs}) + "\n")
    data = load_instructions(f, tok)
    ids, labels = data.input_ids[0], data.labels[0]
    whole = tok.apply_chat_template(msgs, tokenize=False)
    assert ids == tok(whole, add_special_tokens=False)["input_ids"]  # same tokens as one render
    trained = [t for t in labels if t != IGNORE]
    vocab = tok.get_vocab()
    # each answer and the </s> closing it, nothing of the user turns or role names
    assert trained == [vocab["good"], vocab["</s>"], vocab["no"], vocab["ok"], vocab["</s>"]]


def test_instruction_line_without_response_names_file_and_line(tmp_path, ltok):
    f = write(tmp_path / "bad.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "what"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing 'response'"):
        load_instructions(f, ltok)


def test_instruction_truncated_before_answer_is_dropped(tmp_path, ltok):
    f = write(
        tmp_path / "i.jsonl", '{"prompt": "what time is it", "response": "good"}\n{"prompt": "a", "response": "b"}\n'
    )
    data = load_instructions(f, ltok, max_length=4)
    assert len(data) == 1 and data.dropped == 1


def test_causal_text_windows_train_every_pair_once(tmp_path, ltok):
    words = " ".join(tiny_hf.WORDS)
    data = load_causal_text(write(tmp_path / "t.txt", words), ltok, max_length=8)
    stream = ltok(words)["input_ids"] + [ltok.eos_token_id]
    pairs = [(w[i], w[i + 1]) for w in data.input_ids for i in range(len(w) - 1)]
    assert pairs == list(zip(stream[:-1], stream[1:]))
    assert all(len(w) <= 8 for w in data.input_ids)


def test_split_is_fixed_and_disjoint():
    train, test = (t.tolist() for t in split_indices(10, 0.2, seed=0, ordered=True))
    assert [train, test] == [t.tolist() for t in split_indices(10, 0.2, seed=0, ordered=True)]
    assert len(test) == 2 and sorted(train + test) == list(range(10)) and train == sorted(train)


def test_objectives_sum_and_count_against_transformers_loss():
    from gradtune.data.sequences import SequenceDataset
    from gradtune.objectives.causal_lm import CausalLM

    model = tiny_hf.llama().eval()
    seqs = [[2, 5, 6, 7, 3], [2, 8, 3]]
    labels = [[IGNORE, IGNORE, 6, 7, 3], [IGNORE, 8, 3]]
    batch = SequenceDataset(seqs, labels, 0).get(torch.tensor([0, 1]))
    out = CausalLM(shift=True, token_accuracy=True)(model, batch)
    assert out.count.item() == 5
    oracle = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss  # transformers' mean over the same tokens
    torch.testing.assert_close(out.loss_sum / out.count, oracle)


def test_classification_and_regression_objectives():
    from gradtune.objectives.classification import Classification
    from gradtune.objectives.regression import Regression

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    batch = {
        "input_ids": torch.zeros(3, 1, dtype=torch.long),
        "attention_mask": torch.ones(3, 1),
        "labels": torch.tensor([0, 1, 1]),
    }
    out = Classification()(lambda **_: logits, batch)
    torch.testing.assert_close(out.loss_sum, torch.nn.functional.cross_entropy(logits, batch["labels"]) * 3)
    assert int(out.count) == 3 and out.metrics["correct"].item() == 2
    batch["labels"] = torch.tensor([1.0, 2.0, 0.0])
    out = Regression()(lambda **_: torch.tensor([[1.5], [2.0], [1.0]]), batch)
    assert out.loss_sum.item() == pytest.approx(1.25) and int(out.count) == 3
