"""Help that answers: every option of every command has a help line that shows its default;
``train --help`` lists the settings and sections and points to ``gradtune config``; --version."""

from __future__ import annotations

import argparse

import pytest

from gradtune import cli
from gradtune.config.table import sections


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    p = cli.parser()
    (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_option_has_help_with_its_default(name):
    parser = _subparsers()[name]
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest}: no help"
        if action.option_strings and action.default is not argparse.SUPPRESS:
            shown = parser._get_formatter()._get_help_string(action)
            assert "default" in shown, f"{name} {action.option_strings}: the help does not show the default"
    assert cli.COMMANDS[name].HELP in text


def test_train_help_lists_settings_and_sections(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "gradtune config" in out and "max_time" in out and "early_stopping.*" in out
    assert all(f"{s}.*" in out for s in sections())


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("gradtune ")


def test_config_command_prints_the_schema(capsys):
    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    assert "batch_size" in out and "full: batch GD" in out and "lora.*" in out
    assert cli.main(["config", "gpt"]) == 0  # the gpt section shows model=gpt's (the recipe's) defaults
    out = capsys.readouterr().out
    assert "gpt.family" in out and "'llama'" in out and "192" in out
    assert cli.main(["config", "nope"]) == 2


def test_a_reader_that_leaves_early_gets_no_traceback():
    # `gradtune config | head -1`: the reader leaves; the command ends quietly (141), no traceback
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "gradtune", "config"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # before its first write (it is still importing torch): that write meets a closed pipe
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141 and err == "", err
