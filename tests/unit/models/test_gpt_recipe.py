"""The 10-minute Shakespeare recipe (configs/gpt-shakespeare.yaml) against what it promises: a wall-time
budget with automatic precision, and a validation split that holds out whole plays the model never
trains on (oracle: the plays' titles and first speech in the embedded corpus)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from gradtune import datasets
from gradtune.config import load_config
from gradtune.models.gpt import GPT, GPTConfig

RECIPE = Path(__file__).resolve().parents[3] / "configs" / "gpt-shakespeare.yaml"
HELD_OUT = [b"LOVE'S LABOUR'S LOST", b"TWELFTH NIGHT"]  # title lines of the corpus's last two plays


def test_recipe_is_a_time_budget_with_auto_precision():
    cfg = load_config(str(RECIPE))
    assert cfg.max_time == "10m" and cfg.precision == "auto" and cfg.max_steps is None
    assert not cfg.compile  # Inductor buys nothing on CPU for this model and costs minutes of compile
    assert cfg.eval_tokens and cfg.eval_every  # cheap sampled evaluations along the way, full at the end
    model = GPT(GPTConfig(**{k: v for k, v in asdict(cfg.gpt).items() if v is not None}))
    # Under 1M parameters precision=auto stays fp32 without probing: the recipe must be above it.
    assert 1_000_000 < model.num_params() < 3_000_000


def test_recipe_validation_is_whole_held_out_plays():
    cfg = load_config(str(RECIPE))
    raw = datasets.text_bytes("shakespeare")  # byte tokenizer: one token per byte
    n_val = int(len(raw) * cfg.val_fraction)
    train, val = raw[:-n_val], raw[-n_val:]
    # The split falls inside Love's Labour's Lost's list of persons: its title and first few
    # persons are trained on, every speech of it and all of Twelfth Night are validation only.
    assert len(train) - train.rfind(HELD_OUT[0]) < 250
    assert b"Let fame, that all hunt after in their lives" in val  # LLL's first speech
    assert HELD_OUT[1] not in train and HELD_OUT[1] in val
