"""The 10-minute Shakespeare recipe (configs/gpt-shakespeare.yaml) against what it promises: a wall-time
budget with automatic precision, and a validation split that holds out whole plays the model never
trains on and its tokenizer never learnt from (oracle: the plays' titles and first speech in the
embedded corpus)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from gradtune import datasets
from gradtune.config import load_config
from gradtune.data import bpe, text
from gradtune.jobs.text import tokenizer_spec
from gradtune.models.gpt import GPT, GPTConfig

RECIPE = Path(__file__).resolve().parents[3] / "configs" / "gpt-shakespeare.yaml"
HELD_OUT = [b"LOVE'S LABOUR'S LOST", b"TWELFTH NIGHT"]  # title lines of the corpus's last two plays


def test_recipe_is_a_time_budget_with_auto_precision():
    cfg = load_config(str(RECIPE))
    assert cfg.max_time == "10m" and cfg.precision == "auto" and cfg.max_steps is None
    assert not cfg.compile  # Inductor buys nothing on CPU for this model and costs minutes of compile
    assert cfg.eval_tokens and cfg.eval_every  # cheap sampled evaluations along the way, full at the end
    shape = {k: v for k, v in asdict(cfg.gpt).items() if v is not None}
    model = GPT(GPTConfig(vocab_size=cfg.text.vocab_size, **shape))
    # Under 1M parameters precision=auto stays fp32 without probing: the recipe must be above it.
    assert 1_000_000 < model.num_params() < 3_000_000


def test_recipe_validation_is_whole_held_out_plays_its_bpe_never_read():
    cfg = load_config(str(RECIPE))
    assert cfg.text.tokenizer == "train"  # a BPE learnt from the training plays
    tf = text.tokenize(cfg.data, tokenizer_spec(cfg))
    train_w, val_w = text.split(tf, cfg.gpt.block_size, cfg.val_fraction)
    n_train = train_w.n_tokens
    train, val = (
        tf.tokenizer.decode(t).encode().replace(b"<|endoftext|>", b"") for t in np.split(tf.tokens, [n_train])
    )
    # The split falls inside Love's Labour's Lost's list of persons: its title and first few
    # persons are trained on, every speech of it and all of Twelfth Night are validation only.
    assert len(train) - train.rfind(HELD_OUT[0]) < 250
    assert b"Let fame, that all hunt after in their lives" in val  # LLL's first speech
    assert HELD_OUT[1] not in train and HELD_OUT[1] in val
    # The split holds 5% of the bytes (not of the tokens: the BPE gives the held-out plays more
    # tokens per byte); the BPE read the first 95%: none of it after the split.
    total = len(datasets.text_bytes("shakespeare"))
    assert len(val) <= total * cfg.val_fraction < len(val) + 20
    assert int(total * bpe.train_share(cfg.val_fraction)) <= len(train)
