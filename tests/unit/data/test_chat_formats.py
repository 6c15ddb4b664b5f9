"""Instruction and chat formats: Alpaca, ShareGPT and prompt/response rows (and mapped keys)
become exactly the messages the same conversations give written as ``messages``; Parquet shards
and ``datasets.save_to_disk`` folders read like the JSONL they were made from; bad rows are one
error naming the file, the line and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradtune.data import chat_formats
from gradtune.data.text_tasks import DataError

DATA = Path(__file__).resolve().parents[2] / "data"


def rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def messages_of(path, fmt="auto", fields=None) -> list[list[dict]]:
    keys = chat_formats.Fields(fields)
    found = list(chat_formats.rows(path))
    shape = chat_formats.resolve(path, fmt, keys, found[0])
    return [chat_formats.to_messages(row, shape, keys, where) for where, row in found]


def write(path: Path, items: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


def test_alpaca_sharegpt_and_messages_give_the_same_conversations(capsys):
    expected = [r["messages"] for r in rows(DATA / "chat_messages.jsonl")]
    assert messages_of(DATA / "chat_sharegpt.jsonl") == expected
    assert messages_of(DATA / "chat_alpaca.jsonl") == expected[:4]  # Alpaca is single-turn
    assert messages_of(DATA / "chat_messages.jsonl") == expected
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[2].split(" format")[0] for line in out] == ["sharegpt", "alpaca", "messages"]
    assert all("auto-detected" in line for line in out)


def test_explicit_format_says_nothing_and_field_mapping_renames(tmp_path, capsys):
    plain = write(tmp_path / "p.jsonl", [{"prompt": "2+2?", "response": "4", "system": "terse"}])
    mapped = write(tmp_path / "q.jsonl", [{"question": "2+2?", "answer": "4", "sys": "terse"}])
    fields = {"prompt": "question", "response": "answer", "system": "sys"}
    assert messages_of(mapped, "prompt_response", fields) == messages_of(plain, "prompt_response")
    assert capsys.readouterr().out == ""
    assert messages_of(mapped, "auto", fields) == messages_of(plain)  # auto sees the mapped keys


def test_sharegpt_and_messages_keys_map_inside_turns(tmp_path):
    custom = write(
        tmp_path / "c.jsonl", [{"dialog": [{"who": "human", "text": "hi"}, {"who": "gpt", "text": "hello"}]}]
    )
    fields = {"conversations": "dialog", "from": "who", "value": "text"}
    assert messages_of(custom, "sharegpt", fields) == [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ]


@pytest.mark.parametrize(
    "row, fmt, needle",
    [
        ({"instruction": "x"}, "alpaca", "b.jsonl:2: missing 'output' (alpaca format"),
        (
            {"conversations": [{"from": "robot", "value": "x"}]},
            "sharegpt",
            "b.jsonl:2: conversations[0]: unknown role 'robot'",
        ),
        ({"conversations": [{"from": "human"}]}, "sharegpt", "b.jsonl:2: conversations[0] has no 'value'"),
        (
            {"messages": [{"role": "user", "content": "x"}]},
            "messages",
            "b.jsonl:2: the conversation has no assistant turn",
        ),
        ({"prompt": "x", "response": 3}, "prompt_response", "b.jsonl:2: 'response' is not a string"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, row, fmt, needle):
    good = {
        "alpaca": {"instruction": "a", "output": "b"},
        "sharegpt": {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
    }
    first = good.get(fmt, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    if fmt == "prompt_response":
        first = {"prompt": "a", "response": "b"}
    path = write(tmp_path / "b.jsonl", [first, row])
    with pytest.raises(DataError) as e:
        messages_of(path, fmt)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_undetectable_keys_say_how_to_map_them(tmp_path):
    path = write(tmp_path / "u.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"u\.jsonl:1: cannot tell the format from the keys \('question', 'answer'\)"):
        messages_of(path)


def _shards(tmp_path, source: Path) -> tuple[Path, Path]:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    items = rows(source)
    parquet = tmp_path / "shard.parquet"
    pq.write_table(pa.Table.from_pylist(items), parquet)
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(items).save_to_disk(str(folder))
    return parquet, folder


@pytest.mark.parametrize("name", ["chat_alpaca.jsonl", "chat_sharegpt.jsonl", "chat_messages.jsonl"])
def test_parquet_and_datasets_folder_read_like_their_jsonl(tmp_path, name, capsys):
    parquet, folder = _shards(tmp_path, DATA / name)
    expected = messages_of(DATA / name)
    assert messages_of(parquet) == expected
    assert messages_of(folder) == expected
    wheres = [w for w, _ in chat_formats.rows(parquet)]
    assert wheres == [f"{parquet}:{i}" for i in range(1, len(expected) + 1)]  # rows numbered for messages


def test_preference_rows_take_the_same_mapping(tmp_path):
    pytest.importorskip("transformers")
    from gradtune.data.preferences import load_preferences
    from tests import tiny_hf

    tok = tiny_hf.tokenizer("llama")
    tok.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}"
    )
    plain = [
        {"prompt": "what time", "chosen": "now", "rejected": "no bad"},
        {"prompt": "hello", "chosen": "yes good ok", "rejected": "no"},
    ]
    mapped = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in plain]
    turns = [
        {
            "chosen": [{"from": "human", "value": r["prompt"]}, {"from": "gpt", "value": r["chosen"]}],
            "rejected": [{"from": "human", "value": r["prompt"]}, {"from": "gpt", "value": r["rejected"]}],
        }
        for r in plain
    ]
    a = load_preferences(write(tmp_path / "a.jsonl", plain), tok)
    b = load_preferences(
        write(tmp_path / "b.jsonl", mapped), tok, fields={"prompt": "q", "chosen": "good", "rejected": "bad"}
    )
    c = load_preferences(write(tmp_path / "c.jsonl", turns), tok)
    assert a.chosen == b.chosen == c.chosen and a.rejected == b.rejected == c.rejected
    with pytest.raises(DataError, match=r"b\.jsonl:1: missing 'chosen'"):
        load_preferences(tmp_path / "b.jsonl", tok)  # unmapped keys: the standard name is missing
