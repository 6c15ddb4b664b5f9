"""eval_tokens: a fixed, seeded sample of validation windows; the loop evaluates it in between
and the full set at the end."""

import contextlib
import json

import numpy as np
import torch

from gradtune.cli import main
from gradtune.data.text import TextWindows
from gradtune.loop.evaluation import Subset, evaluate, token_sample
from gradtune.objectives.causal_lm import CausalLM


def windows(n_tokens=5000, block=16):
    return TextWindows(np.arange(n_tokens, dtype=np.uint16) % 97, block)


def test_the_sample_is_seeded_fixed_and_about_eval_tokens():
    data = windows()
    a, b, c = token_sample(data, 800, 0), token_sample(data, 800, 0), token_sample(data, 800, 1)
    assert torch.equal(a.idx, b.idx) and not torch.equal(a.idx, c.idx)
    per = data.n_tokens / len(data)
    assert 800 <= len(a) * per <= 800 + per  # whole windows, the last one crossing eval_tokens
    assert len(set(a.idx.tolist())) == len(a) and bool((a.idx[1:] > a.idx[:-1]).all())
    assert token_sample(data, 10**6, 0) is None  # no smaller than the set: evaluate it all


def test_a_subset_evaluates_as_its_windows_would():
    data = windows()
    model = torch.nn.Sequential(torch.nn.Embedding(97, 8), torch.nn.Linear(8, 97))
    s = token_sample(data, 300, 0)
    got = evaluate(model, CausalLM(), s, 4, torch.device("cpu"), contextlib.nullcontext())
    with torch.no_grad():
        sums = [CausalLM()(model, data.get(s.idx[i : i + 4])) for i in range(0, len(s), 4)]
    want = sum(float(o.loss_sum) for o in sums) / sum(float(o.count) for o in sums)
    assert abs(got[0] - want) < 1e-6 and isinstance(
        Subset(data, s.idx).get(torch.tensor([0]))["input_ids"], torch.Tensor
    )


def test_intermediate_evaluations_use_the_sample_and_the_last_is_full(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = [
        "model=gpt",
        "gpt.n_layer=1",
        "gpt.n_head=2",
        "gpt.n_embd=32",
        "gpt.block_size=32",
        "max_steps=6",
        "eval_every=2",
        "batch_size=4",
        "progress=off",
        "plot=false",
        "val_fraction=0.01",
        "eval_tokens=330",
    ]
    assert main(["train", *args, f"out_dir={out}"]) == 0
    evals = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert [r.get("val_samples") for r in evals] == [11, 11, None]  # 11 windows of 32 tokens >= 330
    assert all(r["tokens_per_s"] > 0 for r in evals)


def test_eval_final_sample_ends_on_the_same_sample(tmp_path, monkeypatch):
    """eval_final=sample: the final evaluation is the intermediate ones' sample, not the full pass
    (the same windows: the same loss as a full-pass run's last intermediate row on its sample)."""
    monkeypatch.setenv("GRADTUNE_CACHE", str(tmp_path / "cache"))
    base = [
        "model=gpt",
        "gpt.n_layer=1",
        "gpt.n_head=2",
        "gpt.n_embd=32",
        "gpt.block_size=32",
        "batch_size=4",
        "progress=off",
        "plot=false",
        "val_fraction=0.01",
        "eval_tokens=330",
        "eval_every=2",
    ]
    rows = {}
    for name, extra in (("full", ["max_steps=6"]), ("sample", ["max_steps=4", "eval_final=sample"])):
        assert main(["train", *base, *extra, f"out_dir={tmp_path / name}"]) == 0
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        rows[name] = [r for r in map(json.loads, lines) if r["kind"] == "eval"]
    assert [r.get("val_samples") for r in rows["sample"]] == [11, 11]  # the last one sampled too
    assert rows["sample"][-1]["val_loss"] == rows["full"][1]["val_loss"]  # step 4, the same 11 windows
