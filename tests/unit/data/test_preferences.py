"""Preference pairs from JSONL: the three row shapes give the same tokens, only the response
is scored, a batch of B pairs is 2B rows (chosen then rejected), and bad rows are one error
naming the file and line."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from gradtune.data.preferences import load_preferences  # noqa: E402
from gradtune.data.sequences import IGNORE  # noqa: E402
from gradtune.data.text_tasks import DataError  # noqa: E402
from tests import tiny_hf  # noqa: E402

TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def write(tmp_path, rows, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def words(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def test_strings_score_only_the_response_and_batch_as_2b_rows(tmp_path):
    tok = tiny_hf.tokenizer("llama")
    data = load_preferences(
        write(
            tmp_path,
            [
                {"prompt": "what time", "chosen": "now", "rejected": "no bad"},
                {"prompt": "hello", "chosen": "yes good ok", "rejected": "no"},
            ],
        ),
        tok,
    )
    assert len(data) == 2
    ids, labels = data.chosen[0]
    assert words(tok, ids) == ["<s>", "what", "time", "now", "</s>"]
    assert labels == [IGNORE, IGNORE, IGNORE] + ids[3:]  # the response and its end token
    assert data.rejected[0][0][:3] == ids[:3]  # the same prompt
    batch = data.get(torch.tensor([1, 0]))
    assert batch["input_ids"].shape == (4, 6) and batch["sample_id"].tolist() == [1, 0]
    assert batch["input_ids"][0].tolist() == data.chosen[1][0]  # rows: chosen 1, chosen 0, rejected 1, rejected 0
    assert batch["input_ids"][3].tolist() == data.rejected[0][0]
    assert batch["labels"][2].tolist() == data.rejected[1][1] + [IGNORE, IGNORE]  # padding not scored
    assert data.lengths.tolist() == [6, 6]


def test_message_shapes_match_and_earlier_assistant_turns_are_not_scored(tmp_path):
    tok = tiny_hf.tokenizer("llama")
    tok.chat_template = TEMPLATE
    user = {"role": "user", "content": "what time"}
    turns = [user, {"role": "assistant", "content": "the time"}, {"role": "user", "content": "answer"}]
    rows = [
        {
            "prompt": turns,
            "chosen": [{"role": "assistant", "content": "now"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        },
        {
            "chosen": turns + [{"role": "assistant", "content": "now"}],
            "rejected": turns + [{"role": "assistant", "content": "no"}],
        },
        {"prompt": turns, "chosen": "now", "rejected": "no"},
    ]
    data = load_preferences(write(tmp_path, rows), tok)
    assert data.chosen[0] == data.chosen[1] == data.chosen[2] and data.rejected[0] == data.rejected[2]
    ids, labels = data.chosen[0]
    scored = [w for w, lab in zip(words(tok, ids), labels) if lab != IGNORE]
    assert scored == ["now", "</s>"]  # not "the time" of the earlier assistant turn


def test_truncation_and_identical_responses_drop_pairs(tmp_path, capsys):
    tok = tiny_hf.tokenizer("llama")
    rows = [
        {"prompt": "a b", "chosen": "yes", "rejected": "no"},
        {"prompt": "hello world the answer is", "chosen": "yes", "rejected": "no"},  # response beyond 4
        {"prompt": "ok", "chosen": "good", "rejected": "good"},
    ]
    data = load_preferences(write(tmp_path, rows), tok, max_length=4)
    assert len(data) == 1 and data.dropped == 2
    assert all(len(s[0]) <= 4 for s in data.chosen + data.rejected)
    assert "p.jsonl: line 3: 'chosen' equals 'rejected'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "hello", "chosen": "yes"}, "p.jsonl:2: missing 'rejected'"),
        ({"prompt": "hello", "chosen": "  ", "rejected": "no"}, "p.jsonl:2: 'chosen' is empty"),
        ({"prompt": "hello", "chosen": "yes", "rejected": ""}, "p.jsonl:2: 'rejected' is empty"),
        ('{"prompt": "hello", "chosen": ', "p.jsonl:2: not valid JSON"),
        ({"chosen": "yes", "rejected": "no"}, "p.jsonl:2: missing 'prompt'"),
        (
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
            },
            "share every turn",
        ),
        ({"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "no"}, "one assistant message"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "p.jsonl:2: 'prompt' must be"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    good = {"prompt": "hello", "chosen": "yes", "rejected": "no"}
    with pytest.raises(DataError, match=message):
        load_preferences(write(tmp_path, [good, row]), tiny_hf.tokenizer("llama"))
