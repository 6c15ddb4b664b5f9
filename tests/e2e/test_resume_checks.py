"""Resume checks beyond the manifest: the training data's fingerprint and every field of
state.json (gradtune/data/fingerprint.py, gradtune/state/resume.py ``check_state``).

A data file edited in place (same number of rows) is refused on resume unless ``resume: force``;
a state.json crafted with a re-signed manifest (so that verification passes) is refused with one
line naming the checkpoint folder and the field, never a ZeroDivisionError deep in the loop."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest

from gradtune.cli import main
from gradtune.data import fingerprint
from gradtune.state import checkpoint

ROWS = "".join(f"{i % 7},{(i * 3) % 5},{i % 4 + 0.5}\n" for i in range(30))
CK = "checkpoints/step-00000006"


def args(tmp: Path, *extra: str) -> list[str]:
    return [
        "train",
        f"data={tmp / 'd.csv'}",
        "model=mlp",
        "hidden=[4]",
        "batch_size=8",
        "max_steps=6",
        "checkpoint_every=3",
        "keep_checkpoints=1",
        "progress=off",
        "plot=false",
        f"out_dir={tmp / 'run'}",
        *extra,
    ]


@pytest.fixture
def run(tmp_path) -> Path:
    """A finished run with one checkpoint (step 6) on tmp/d.csv; returns tmp."""
    (tmp_path / "d.csv").write_text("a,b,y\n" + ROWS)
    assert main(args(tmp_path)) == 0
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def refused(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("gradtune: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# --- the data fingerprint ---------------------------------------------------------------------


def test_checkpoint_records_the_data_fingerprint(run):
    state = json.loads((run / "run" / CK / "state.json").read_text())
    fp = state["data_fingerprint"]
    assert fp["file"].endswith("d.csv") and fp["bytes"] == (run / "d.csv").stat().st_size and fp["whole"]


def test_data_edited_in_place_is_refused_then_forced(run, capsys):
    data = run / "d.csv"
    data.write_text("a,b,y\n" + ROWS.replace("0,0,0.5", "0,0,9.5", 1))  # same rows, one value changed
    before = snapshot(run / "run")
    refused(
        capsys,
        args(run, "max_steps=9"),
        "step-00000006",
        f"training data {data}",
        "changed since this checkpoint",
        "content differs",
        "resume=force",
    )
    assert snapshot(run / "run") == before
    assert main(args(run, "max_steps=9", "resume=force")) == 0
    assert json.loads((run / "run" / "summary.json").read_text())["steps"] == 9


def test_unchanged_data_resumes_and_a_touch_of_a_small_file_is_no_change(run):
    os.utime(run / "d.csv", ns=(1, 1))  # content fully hashed: the mtime alone does not matter
    assert main(args(run, "max_steps=9")) == 0
    rows = [json.loads(x) for x in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "resume" for r in rows)


def test_embedded_data_is_fingerprinted_by_its_packaged_file(tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "data=diabetes",
                "model=linear",
                "max_steps=2",
                "checkpoint_every=2",
                "progress=off",
                "plot=false",
                f"out_dir={out}",
            ]
        )
        == 0
    )
    state = json.loads((out / "checkpoints/step-00000002/state.json").read_text())
    assert Path(state["data_fingerprint"]["file"]).name == "diabetes.csv"


def test_large_files_are_sampled_and_their_mtime_compared(tmp_path):
    big = tmp_path / "big.txt"
    blob = bytearray(os.urandom(3 << 20))
    big.write_bytes(bytes(blob))
    saved = fingerprint.fingerprint(str(big))
    assert not saved["whole"] and fingerprint.changes(saved, fingerprint.fingerprint(str(big))) == []
    blob[0] ^= 1  # inside the first sampled block
    big.write_bytes(bytes(blob))
    assert "content differs" in fingerprint.changes(saved, fingerprint.fingerprint(str(big)))
    blob[0] ^= 1
    blob[100_000] ^= 1  # between sampled blocks: only the modification time tells
    big.write_bytes(bytes(blob))
    os.utime(big, ns=(saved["mtime_ns"] + 10**9, saved["mtime_ns"] + 10**9))
    assert any("modified since" in c for c in fingerprint.changes(saved, fingerprint.fingerprint(str(big))))
    assert fingerprint.changes(None, fingerprint.fingerprint(str(big))) == []  # an older checkpoint


# --- crafted state.json, manifest re-signed --------------------------------------------------------


def resign(folder: Path) -> None:
    """Re-hash state.json into the manifest with checkpoint's own helper, as an attacker would."""
    m = json.loads((folder / "manifest.json").read_text())
    p = folder / "state.json"
    m["files"]["state.json"] = {"sha256": checkpoint._sha256(p), "bytes": p.stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(m))
    assert checkpoint.verify(folder) is None


def put(path: str, value):
    def change(s: dict) -> dict:
        *parents, last = path.split(".")
        node = s
        for k in parents:
            node = node[k]
        if value is DROP:
            del node[last]
        else:
            node[last] = value
        return s

    return change


DROP = object()
# name -> (change to state.json, needle naming the field)
STATE_CASES = {
    "data index past the data (was ZeroDivisionError)": (put("data.index", 24), "'data.index'"),
    "negative step": (put("step", -1), "'step'"),
    "step not an integer": (put("step", 2.5), "'step'"),
    "huge step": (put("step", 10**30), "'step'"),
    "schedule step disagrees": (put("schedule.step", 5), "'schedule.step'"),
    "zero lr scale": (put("schedule.lr_scale", 0), "'schedule.lr_scale'"),
    "nan lr scale": (put("schedule.lr_scale", math.nan), "'schedule.lr_scale'"),
    "infinite lr": (put("schedule.lr", math.inf), "'schedule.lr'"),
    "negative epoch": (put("data.epoch", -2), "'data.epoch'"),
    "micro index inside a step": (put("data.micro_index", 1), "'data.micro_index'"),
    "skipped is a boolean": (put("skipped", True), "'skipped'"),
    "finished is a number": (put("finished", 5), "'finished'"),
    "guard window holds text": (put("guard.window", ["x"]), "'guard.window'"),
    "guard window holds nan": (put("guard.window", [1.0, math.nan]), "'guard.window'"),
    "negative rollbacks": (put("guard.rollbacks", -1), "'guard.rollbacks'"),
    "stopper best is -inf": (put("stopper.best", -math.inf), "'stopper.best'"),
    "stopper bad is a float": (put("stopper.bad", 1.5), "'stopper.bad'"),
    "negative count": (put("sums.count", -1), "'sums.count'"),
    "infinite loss sum": (put("sums.loss", math.inf), "'sums.loss'"),
    "metrics sums not tensors": (put("sums.metrics", {"acc": 3}), "'sums.metrics'"),
    "grad norm is text": (put("last_gnorm", "big"), "'last_gnorm'"),
    "metrics rows is text": (put("metrics_rows", "3"), "'metrics_rows'"),
    "schedule missing": (put("schedule", DROP), "has no 'schedule.step'"),
    "rng is a list": (put("rng", []), "'rng'"),
}


@pytest.mark.parametrize("name", list(STATE_CASES))
def test_crafted_state_json_is_refused_naming_the_field(name, run, capsys):
    change, needle = STATE_CASES[name]
    folder = run / "run" / CK
    p = folder / "state.json"
    p.write_text(json.dumps(change(json.loads(p.read_text()))))
    resign(folder)
    before = snapshot(run / "run")
    refused(capsys, args(run, "max_steps=9"), str(folder), needle)
    assert snapshot(run / "run") == before
