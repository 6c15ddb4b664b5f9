"""Defaults that do what they say: ``model: gpt`` is the recipe (but for its tokenizer), a convergence run is not cut by
the default epochs, an explicit budget wins, other tools' names get ours, and the README
harness's budget scale."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gradtune.config import Config, load_config
from gradtune.config.defaults import CONVERGENCE_EPOCHS
from gradtune.config.loading import scale_budget
from gradtune.config.suggestions import OTHER_NAMES, other_name
from gradtune.runtime.errors import GradtuneError

RECIPE = Path(__file__).resolve().parents[3] / "configs" / "gpt-shakespeare.yaml"


def test_model_gpt_alone_is_the_recipe_with_bytes_for_tokens():
    recipe = dataclasses.asdict(load_config(str(RECIPE)))
    alone = dataclasses.asdict(load_config(None, ["model=gpt"]))
    recipe.pop("out_dir"), alone.pop("out_dir")  # the recipe names its folder
    # The recipe learns a BPE from the plays; model=gpt on any corpus (gigabytes included) starts
    # with no tokenizer to train: bytes.
    mine, gpt = ({k: c["text"].pop(k) for k in ("tokenizer", "vocab_size")} for c in (recipe, alone))
    assert mine == {"tokenizer": "train", "vocab_size": 2048} and gpt["tokenizer"] == "byte"
    assert alone == recipe


def test_an_explicit_budget_replaces_the_recipes_time():
    assert load_config(None, ["model=gpt", "max_steps=200"]).max_time is None
    assert load_config(None, ["model=gpt", "epochs=1"]).max_time is None
    assert load_config(None, ["model=gpt", "max_time=2m"]).max_time == "2m"
    assert load_config(str(RECIPE), ["max_time=2m"]).max_time == "2m"


def test_convergence_runs_are_not_cut_by_the_default_epochs():
    assert load_config(None, ["tol=1e-9"]).epochs == CONVERGENCE_EPOCHS
    assert load_config(None, ["tol=1e-9", "epochs=7"]).epochs == 7
    assert load_config(None, ["tol=1e-9", "max_steps=50"]).epochs == Config().epochs
    assert load_config(None, []).epochs == Config().epochs


def test_fine_tuning_minimum_steps_yield_to_an_explicit_budget(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    assert load_config(None, [f"model={model}"]).finetune.min_steps == 50
    assert load_config(None, [f"model={model}", "epochs=1"]).finetune.min_steps == 0
    assert load_config(None, [f"model={model}", "epochs=1", "finetune.min_steps=9"]).finetune.min_steps == 9


@pytest.mark.parametrize(
    "theirs, ours",
    [
        ("learning_rate", "lr"),
        ("num_train_epochs", "epochs"),
        ("per_device_train_batch_size", "batch_size"),
        ("gradient_accumulation_steps", "micro_batch_size"),
        ("max_iters", "max_steps"),
        ("lora.r", "lora.rank"),
    ],
)
def test_other_tools_names_get_ours(theirs, ours):
    with pytest.raises(GradtuneError, match=rf"unknown config key '{theirs}' \(did you mean '{ours}'\?"):
        load_config(None, [f"{theirs}=1"])


def test_every_suggestion_is_a_real_key():
    for theirs, (ours, _) in OTHER_NAMES.items():
        obj = Config()
        for part in ours.split("."):
            assert hasattr(obj, part), f"{theirs} -> {ours}: no such setting"
            obj = getattr(obj, part)
        assert other_name(theirs)


def test_gradient_accumulation_hint_gives_the_arithmetic():
    assert "batch_size = per-device batch x gradient_accumulation_steps" in other_name("gradient_accumulation_steps")


def test_budget_scale():
    cfg = load_config(str(RECIPE))
    said = scale_budget(cfg, "0.01")
    assert cfg.max_time == "6s" and cfg.epochs == 1 and "GRADTUNE_BUDGET_SCALE=0.01" in said
    assert cfg.eval_final == "sample" and said.endswith(" eval_final=sample")  # the recipe sets eval_tokens
    cfg = load_config(None, ["max_steps=30"])
    said = scale_budget(cfg, "0.1")
    assert cfg.max_steps == 3 and cfg.eval_final == "full" and "eval_final" not in said  # no sample to take
    assert scale_budget(Config(), "") is None
    with pytest.raises(GradtuneError, match="GRADTUNE_BUDGET_SCALE"):
        scale_budget(Config(), "2")


def test_eval_final_sample_without_eval_tokens_warns(capsys):
    """Nothing to sample from: the setting would do nothing, so one line says so (the run goes on)."""
    cfg = load_config(None, ["model=gpt", "eval_tokens=null", "eval_final=sample"])
    assert cfg.eval_final == "sample" and "eval_final=sample given without eval_tokens" in capsys.readouterr().err
    load_config(None, ["model=gpt", "eval_final=sample"])  # the recipe's eval_tokens: nothing to say
    assert "eval_final" not in capsys.readouterr().err
