"""The strict config: types, ranges, suggestions, precedence."""

import pytest

from gradtune.config import Config, field_docs, load_config
from gradtune.runtime.errors import GradtuneError


def test_precedence_defaults_file_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.5\nbatch_size: full\nguard:\n  policy: stop\nhidden: [8, 4]\n")
    cfg = load_config(str(f), ["lr=0.25", "guard.max_rollbacks=1", "progress=off"])
    assert cfg.lr == 0.25 and cfg.batch_size == "full" and cfg.guard.policy == "stop"
    assert cfg.guard.max_rollbacks == 1 and cfg.hidden == [8, 4] and cfg.progress == "off"


def test_types_coerce_sensibly():
    cfg = load_config(None, ["lr=1", "tol=1e-9", "batch_size=16", "hidden=5", "micro_batch_size=null"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.tol == 1e-9
    assert cfg.batch_size == 16 and cfg.hidden == [5] and cfg.micro_batch_size is None


@pytest.mark.parametrize(
    "override,needle",
    [
        ("lrr=0.1", "did you mean 'lr'"),
        ("momentum=1.5", "'momentum' must be in [0, 1)"),
        ("nesterov=true", "nesterov=true needs momentum > 0"),
        ("schedule=cosin", "'schedule'"),
        ("betas=[0.9]", "'betas' must be"),
        ("standardize=maybe", "expected bool"),
    ],
)
def test_rejections_name_the_key(override, needle):
    with pytest.raises(GradtuneError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_hash_changes_with_settings():
    assert Config().hash() == Config().hash()
    assert Config().hash() != load_config(None, ["lr=0.02"]).hash()


def test_every_setting_is_documented():
    missing = [k for k, _, doc in field_docs() if not doc and k not in ("guard", "gpt", "text", "lora", "freeze")]
    assert not missing, missing


def test_readme_settings_table_is_current():
    """The README's table is generated from Config: regenerate with `python -m gradtune.config`."""
    from pathlib import Path

    from gradtune.config import markdown_table

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    start = readme.index("<!-- settings-table")
    table = readme[readme.index("\n", start) + 1 : readme.index("<!-- /settings-table -->")].strip()
    assert table == markdown_table()


def test_renamed_settings_still_work_with_a_warning(capsys):
    cfg = load_config(None, ["model=gpt", "gpt.checkpointing=true", "finetune.checkpointing=true"])
    assert cfg.gpt.activation_checkpointing and cfg.finetune.activation_checkpointing
    err = capsys.readouterr().err
    assert "'gpt.checkpointing' is now 'gpt.activation_checkpointing'" in err
    assert "'finetune.checkpointing' is now 'finetune.activation_checkpointing'" in err


def test_built_in_model_names_win_over_a_folder_of_the_same_name(tmp_path, monkeypatch):
    from gradtune.config import is_pretrained
    from gradtune.jobs.registry import kind

    monkeypatch.chdir(tmp_path)
    (tmp_path / "linear").mkdir()
    assert not is_pretrained("linear") and kind("linear") == "linear"
    assert is_pretrained("./linear") and kind("./linear") == "pretrained"
    assert load_config(None, ["model=linear"]).optimizer == "sgd"  # the family's defaults, not fine-tuning's


def test_method_is_validated_once_in_the_config():
    import pytest

    from gradtune.runtime.errors import GradtuneError

    for bad, why in [
        ("method=prefix", "choose from"),
        ("method=lora+full", "combines lora and full"),
        ("finetune.export=adapter", "has no LoRA"),
    ]:
        with pytest.raises(GradtuneError, match=why):
            load_config(None, [bad])
