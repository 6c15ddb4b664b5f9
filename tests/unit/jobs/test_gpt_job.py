"""Pretraining job end to end on a tiny GPT: train, save (tied weights), generate, resume-free reload."""

import json

from gradtune.cli import main

TINY = [
    "model=gpt",
    "gpt.n_layer=1",
    "gpt.n_head=2",
    "gpt.n_embd=32",
    "gpt.block_size=32",
    "max_steps=6",
    "eval_every=3",
    "batch_size=4",
    "progress=off",
    "plot=false",
]


def test_train_then_generate(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRADTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", *TINY, f"out_dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["job"]["task"] == "lm" and summary["metrics"]["val_ppl"] > 1
    for f in ("model.safetensors", "tokenizer.json", "config.yaml"):
        assert (out / f).is_file()
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1", "--echo"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text) >= len("ROMEO:") + 5
    assert main(["generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1", "--echo"]) == 0
    assert capsys.readouterr().out == text  # seeded sampling is reproducible
    assert main(["generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1"]) == 0
    assert "ROMEO:" + capsys.readouterr().out == text  # by default only the new text


def test_generate_rejects_a_tabular_run(tmp_path, capsys):
    out = tmp_path / "lin"
    assert main(["train", "model=linear", "epochs=1", "progress=off", "plot=false", f"out_dir={out}"]) == 0
    assert main(["generate", str(out)]) == 2
    assert "regression run has no language-model head to generate with" in capsys.readouterr().err
