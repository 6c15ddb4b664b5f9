"""Every bad input: one clear line on stderr naming file/line/column or key, exit 2, nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest

from gradtune.cli import main

GOOD = "a,b,y\n1,2,3\n4,5,6\n7,8,9\n1,1,1\n"


def run(tmp_path: Path, capsys, *args: str) -> str:
    out = tmp_path / "out"
    code = main(["train", *args, f"out_dir={out}", "epochs=1", "progress=off"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("gradtune: error: "), err
    assert "Traceback" not in err
    assert not out.exists(), "nothing may be written for bad input"
    return err


def csv(tmp_path: Path, text: str, name: str = "d.csv") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def data(tmp_path: Path, text: str, name: str = "d.csv") -> str:
    return "data=" + csv(tmp_path, text, name)


CASES = {
    "missing file": (lambda t: ["data=/nonexistent/x.csv"], ["not found", "/nonexistent/x.csv"]),
    "missing target column": (lambda t: [data(t, GOOD), "target=yy"], ["'yy' not found", "did you mean 'y'"]),
    "missing feature column": (lambda t: [data(t, GOOD), "target=y", "features=[a,c]"], ["'c' not found"]),
    "non-numeric cell": (lambda t: [data(t, "a,b,y\n1,2,3\n4,x5,6\n")], ["d.csv:3", "column 'b'", "x5"]),
    "nan cell": (lambda t: [data(t, "a,b,y\n1,2,3\n4,nan,6\n")], ["d.csv:3", "column 'b'", "NaN"]),
    "inf target": (lambda t: [data(t, "a,b,y\n1,2,inf\n4,5,6\n")], ["d.csv:2", "column 'y'", "not finite"]),
    "empty file": (lambda t: [data(t, "")], ["no data rows"]),
    "header only": (lambda t: [data(t, "a,b,y\n")], ["no data rows"]),
    "ragged row": (lambda t: [data(t, "a,b,y\n1,2,3\n4,5\n")], ["d.csv:3", "expected 3 cells"]),
    "label out of range": (
        lambda t: [data(t, "a,y\n1,0\n2,1\n3,5\n"), "task=classification", "num_classes=2"],
        ["d.csv:4", "label 5 out of range"],
    ),
    "negative label": (lambda t: [data(t, "a,y\n1,0\n2,-1\n"), "task=classification"], ["d.csv:3", "out of range"]),
    "bad jsonl": (lambda t: [data(t, '{"a": 1, "y": 2}\n{oops\n', "d.jsonl")], ["d.jsonl:2", "not valid JSON"]),
    "unknown setting": (lambda t: ["learning_rate=0.1"], ["unknown config key 'learning_rate'"]),
    "unknown setting suggestion": (lambda t: ["batchsize=4"], ["did you mean 'batch_size'"]),
    "ill-typed setting": (lambda t: ["lr=fast"], ["'lr'", "expected float"]),
    "ill-typed int": (lambda t: ["epochs=2.5"], ["'epochs'", "expected int"]),
    "negative lr": (lambda t: ["lr=-0.1"], ["'lr' must be > 0"]),
    "bad choice": (lambda t: ["optimizer=adam"], ["'optimizer'", "'sgd' | 'adamw'"]),
    "bad batch size": (lambda t: ["batch_size=0"], ["'batch_size' must be"]),
    "unknown model": (lambda t: ["model=lineer"], ["unknown model 'lineer'", "did you mean 'linear'"]),
    "micro larger than batch": (lambda t: ["batch_size=4", "micro_batch_size=8"], ["micro_batch_size"]),
    "loss does not fit task": (lambda t: ["loss=cross_entropy", "task=regression"], ["does not fit"]),
    "init file missing": (lambda t: ["init=/nope/w.safetensors"], ["weights file not found"]),
    "init file not safetensors": (
        lambda t: ["init=" + csv(t, "garbage", "w.safetensors")],
        ["w.safetensors", "safetensors"],
    ),
    "nested unknown key": (lambda t: ["guard.polcy=skip"], ["unknown config key 'guard.polcy'", "guard.policy"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, capsys):
    make_args, needles = CASES[name]
    err = run(tmp_path, capsys, *make_args(tmp_path))
    for needle in needles:
        assert needle in err, err


def test_config_file_errors(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("model: linear\nlerning_rate: 0.1\n")
    err = run(tmp_path, capsys, str(bad))
    assert "c.yaml" in err and "'lerning_rate'" in err
    broken = tmp_path / "b.yaml"
    broken.write_text("model: [linear\n")
    assert "b.yaml:" in run(tmp_path, capsys, str(broken))
    assert "config file not found" in run(tmp_path, capsys, str(tmp_path / "missing.yaml"))


def test_real_process_exit_code_and_no_traceback(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, "-m", "gradtune", "train", "lr=-1", f"out_dir={out}"], capture_output=True, text=True
    )
    assert p.returncode == 2
    assert p.stderr.strip() == "gradtune: error: config key 'lr' must be > 0 or 'auto', got -1"
    assert not out.exists()
