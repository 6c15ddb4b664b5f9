"""Alpaca, ShareGPT and messages files give SmolLM2-135M-Instruct exactly the same token batches
(input ids, labels, attention mask) as the same conversations written as ``messages``; a
Parquet shard and a ``datasets.save_to_disk`` folder give the batches of the JSONL they were
made from; a LoRA run trains on each format (a few steps, short sequences)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradtune.cli import main
from gradtune.config import load_config
from gradtune.jobs import pretrained
from gradtune.models import hf
from tests.e2e.conftest import smollm2_gguf

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def tok():
    return hf.load_tokenizer(smollm2_gguf())


def batch(tok, path, *overrides: str) -> dict[str, torch.Tensor]:
    cfg = load_config(overrides=[f"model={smollm2_gguf()}", "task=instruction", "text.max_length=64", *overrides])
    data, _ = pretrained.load_data(cfg, "instruction", str(path), tok)
    return {k: v for k, v in data.get(torch.arange(len(data))).items() if k != "sample_id"}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
def test_formats_give_the_tokens_and_labels_of_messages(tok, tmp_path):
    messages = DATA / "chat_messages.jsonl"
    first4 = tmp_path / "m4.jsonl"
    first4.write_text("".join(messages.read_text().splitlines(keepends=True)[:4]))
    ref, ref4 = batch(tok, messages), batch(tok, first4)
    assert (ref["labels"] != -100).sum() > 0 and (ref["labels"] == -100).sum() > 0  # prompts masked, answers trained
    assert same(batch(tok, DATA / "chat_sharegpt.jsonl"), ref)
    assert same(batch(tok, DATA / "chat_sharegpt.jsonl", "text.format=sharegpt"), ref)
    assert same(batch(tok, DATA / "chat_alpaca.jsonl"), ref4)
    assert same(batch(tok, DATA / "chat_alpaca.jsonl", "text.format=alpaca"), ref4)


@pytest.mark.slow
def test_parquet_and_datasets_folder_give_the_jsonl_batches(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    for name in ("chat_alpaca.jsonl", "chat_sharegpt.jsonl", "chat_messages.jsonl"):
        rows = [json.loads(line) for line in (DATA / name).read_text().splitlines()]
        parquet, folder = tmp_path / f"{name}.parquet", tmp_path / f"{name}.saved"
        pq.write_table(pa.Table.from_pylist(rows), parquet)
        datasets.Dataset.from_list(rows).save_to_disk(str(folder))
        ref = batch(tok, DATA / name)
        assert same(batch(tok, parquet), ref), name
        assert same(batch(tok, folder), ref), name


@pytest.mark.slow
def test_lora_trains_on_sharegpt(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", f"model={smollm2_gguf()}", f"data={DATA / 'chat_sharegpt.jsonl'}", "task=instruction"]
    argv += ["method=lora"]
    argv += ["precision=fp32", "batch_size=2", "max_steps=2", "val_fraction=0", "text.max_length=64"]
    assert main([*argv, "progress=off", "plot=false", f"out_dir={out}"]) == 0, capsys.readouterr().err
    assert "sharegpt format (auto-detected" in capsys.readouterr().out
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses and all(v == v and v > 0 for v in losses)
