"""Every refusal of the bad-input suite, against an out_dir that already holds a finished run:
the run's every file stays byte-identical (a refused run writes nothing, not even metrics.jsonl
or a marker), whatever the check that refuses it (config, data, model, memory, monitor,
callbacks). The cases are the suite's own tables (tests/e2e/test_bad_input_suite.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gradtune.cli import main
from tests.e2e import test_bad_input_suite as suite
from tests.e2e.test_bad_input_suite import _cache, hf_models  # noqa: F401  (fixtures)

TABLES = {
    "config": suite.CONFIG,
    "values": suite.VALUES,
    "data": suite.DATA,
    "pretrained": suite.DATA_PRETRAINED,
    "models": suite.MODELS,
    "memory": suite.MEMORY,
}


def refusals() -> list:
    out = []
    for table, cases in TABLES.items():
        for name, case in cases.items():
            if case.code == 0 or case.warning:  # runs that go on write, as they should
                continue
            out.append(pytest.param(table, name, case, id=f"{table}: {name}", marks=case.marks))
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run with checkpoints, metrics rows, best/ and every output file."""
    run = tmp_path_factory.mktemp("finished") / "run"
    argv = ["train", "model=mlp", "epochs=3", "checkpoint_every=2", "early_stopping.enabled=true"]
    assert main([*argv, *suite.QUIET, f"out_dir={run}"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) >= 3
    return run


@pytest.mark.parametrize("table,name,case", refusals())
def test_a_refused_run_leaves_a_finished_run_byte_identical(table, name, case, tmp_path, capsys, finished, request):
    ctx = suite.Ctx(tmp_path / "in", tmp_path / "out")
    ctx.inp.mkdir()
    if table in ("pretrained", "models"):
        ctx.hf = request.getfixturevalue("hf_models")
    argv = case.argv(ctx)
    if table == "memory" and "mlp" not in name:
        suite.too_big(argv[1:])
    if argv[0] not in ("train", "lr-find"):
        pytest.skip("not a command with an out_dir")
    if table == "models":
        txt = ctx.file("t.txt", suite.TEXT)
        argv = [a.replace("{txt}", txt) for a in argv]
    shutil.copytree(finished, ctx.out, symlinks=True)
    before = suite.snapshot(ctx.out)
    argv = [*argv, f"out_dir={ctx.out}", *suite.QUIET] + (["max_steps=1"] if argv[0] == "train" else [])
    capsys.readouterr()
    with suite.alarm():
        got = main(argv)
    err = capsys.readouterr().err
    assert got == case.code and "Traceback" not in err, err
    assert suite.snapshot(ctx.out) == before, f"{name}: the finished run changed"
