"""One resolved run (loop/run_setup.py): during one ``gradtune train`` the device, the precision,
the process group and the out_dir are each resolved once; every refusal comes before anything
is written; run.json lists the components; a raising callback is one line, exit 1."""

from __future__ import annotations

import json

import pytest

from gradtune.cli import main
from gradtune.jobs import precision
from gradtune.runtime import device, distributed, outdir
from gradtune.state import checkpoint

QUIET = ["progress=off", "plot=false"]


def counting(monkeypatch, module, name, calls):
    real = getattr(module, name)

    def wrapper(*a, **kw):
        calls[name] = calls.get(name, 0) + 1
        return real(*a, **kw)

    monkeypatch.setattr(module, name, wrapper)


def test_one_train_resolves_device_precision_group_and_out_dir_once(tmp_path, monkeypatch):
    calls: dict[str, int] = {}
    monkeypatch.setattr(device, "_RESOLVED", {})
    counting(monkeypatch, device, "_resolve", calls)
    counting(monkeypatch, precision, "resolve", calls)
    counting(monkeypatch, distributed, "init", calls)
    counting(monkeypatch, outdir, "check", calls)
    args = ["model=mlp", "epochs=2", "precision=auto", "checkpoint_every=1", *QUIET, f"out_dir={tmp_path / 'r'}"]
    assert main(["train", *args]) == 0
    assert calls == {"_resolve": 1, "resolve": 1, "init": 1, "check": 1}, calls
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["device"] == "cpu" and run["precision"] in ("fp32", "bf16") and "UpdateRatios" in run["components"]


def test_dry_run_prints_the_components_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--dry-run", "model=mlp", "schedule=plateau", "max_time=1m", f"out_dir={out}"]) == 0
    said = capsys.readouterr().out
    assert "nothing written" in said and "TimeBudget(max_time=1m)" in said and "PlateauSchedule" in said
    assert not out.exists()


def test_a_disabled_section_given_settings_is_one_warning(tmp_path, capsys):
    assert main(["train", "--dry-run", "model=mlp", "early_stopping.patience=5", f"out_dir={tmp_path / 'r'}"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert err == [
        "gradtune: warning: early_stopping.patience given but early_stopping.enabled is false: ignored "
        "(add early_stopping.enabled=true to use it)"
    ]


def test_a_raising_callback_is_one_line_exit_1_and_the_last_checkpoint_stays(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    spec = "callbacks=[{class: 'tests.unit.loop.callback_fixtures:RaiseAtStep', args: {step: 3}}]"
    assert main(["train", "model=mlp", "batch_size=32", "checkpoint_every=2", spec, *QUIET, f"out_dir={out}"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["gradtune: error: callback RaiseAtStep.on_step_end raised ValueError: step 3 is cursed"], err
    assert checkpoint.newest_step(checkpoint.root(out)) == 2
    monkeypatch.setenv("GRADTUNE_DEBUG", "1")
    assert main(["train", "model=mlp", "batch_size=32", "checkpoint_every=2", spec, *QUIET, f"out_dir={out}"]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("monitor", ["nonexistent", "val_accuracy"])
def test_a_refused_monitor_leaves_no_folder(tmp_path, capsys, monitor):
    out = tmp_path / "r"
    args = ["model=mlp", "early_stopping.enabled=true", f"early_stopping.monitor={monitor}", f"out_dir={out}"]
    assert main(["train", *args]) == 2
    assert not out.exists()
