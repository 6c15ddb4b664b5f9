"""DPO on our own GPT (``model: gpt``, ``task: preference``): a GPT pretrained here for a few
steps, then tuned on toy pairs from its saved weights and tokenizer; the reward margin over the
pairs rises from 0, and ``gradtune eval`` on the DPO run prints the final evaluation's rewards."""

from __future__ import annotations

import json
import re

import pytest

from gradtune.cli import main

PAIRS = [
    ("what is the answer", "yes good", "no bad"),
    ("hello world", "hello", "bad bad no"),
    ("call me now", "ok call me at home", "no"),
    ("free prize", "no", "yes win prize now"),
    ("the question", "the answer is good", "what"),
    ("meet me", "ok", "no no no"),
    ("what time", "now", "the time is bad"),
    ("is it good", "yes it is good", "no it is bad"),
]
SHAPE = ["gpt.n_layer=1", "gpt.n_embd=32", "gpt.n_head=2", "gpt.block_size=64"]
QUIET = ["progress=off", "plot=false"]


def _evals(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "eval"]


def test_dpo_on_a_gpt_raises_the_margin_and_evals(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRADTUNE_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    text = ["model=gpt", "data=shakespeare", "text.tokenizer=byte", "max_steps=30", "batch_size=8", *SHAPE]
    assert main(["train", *text, "lr=3e-3", "optimizer=adamw", *QUIET, f"out_dir={base}"]) == 0
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    out = tmp_path / "dpo"
    dpo = ["model=gpt", "task=preference", f"data={pairs}", f"init={base / 'model.safetensors'}", *SHAPE]
    dpo += [
        f"text.tokenizer={base / 'tokenizer.json'}",
        "optimizer=adamw",
        "lr=1e-3",
        "batch_size=8",
        "max_steps=10",
        "epochs=20",
    ]
    dpo += ["eval_every=5", "val_fraction=0", "finetune.eval_data=" + str(pairs), "dpo.beta=0.5"]
    assert main(["train", *dpo, *QUIET, f"out_dir={out}"]) == 0
    evals = _evals(out)
    margins = [r["val_reward_margin"] for r in evals]
    assert margins[-1] > 0.05 and margins == sorted(margins) and margins[-1] > 10 * margins[0], margins
    assert evals[-1]["val_reward_accuracy"] >= 0.75
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(pairs)]) == 0
    got = {k: float(v) for k, v in re.findall(r"(\w+)=(\S+)", capsys.readouterr().out.strip().splitlines()[-1])}
    assert got["reward_margin"] == pytest.approx(evals[-1]["val_reward_margin"], rel=1e-5, abs=1e-6)
