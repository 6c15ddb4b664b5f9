"""The bad-input wall, continued: checkpoints, resume, guard settings, Parquet/JSONL/TSV data.

Each case: exit code 2, one line on stderr naming the file/key/value, no traceback, and nothing
written or half-written (a fresh out_dir is not created; an existing one is byte-for-byte
unchanged). 40 cases here; with the 29 of tests/e2e/test_bad_input.py, 69 bad inputs."""

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest

from gradtune.cli import main
from gradtune.state import checkpoint

ROWS = "".join(f"{i % 7},{(i * 3) % 5},{i % 4 + 0.5}\n" for i in range(30))


def base_args(tmp: Path) -> list[str]:
    return [
        f"data={tmp / 'd.csv'}",
        "model=mlp",
        "hidden=[4]",
        "batch_size=8",
        "max_steps=6",
        "checkpoint_every=3",
        "keep_checkpoints=1",
        "progress=off",
        "plot=false",
    ]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A finished run with one checkpoint (step 6), copied by each case."""
    tmp = tmp_path_factory.mktemp("base")
    (tmp / "d.csv").write_text("a,b,y\n" + ROWS)
    assert main(["train", *base_args(tmp), f"out_dir={tmp / 'run'}"]) == 0
    return tmp


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def resign(folder: Path, name: str) -> None:
    """Update the manifest as an attacker would, so only deeper checks can catch the change."""
    m = json.loads((folder / "manifest.json").read_text())
    p = folder / name
    m["files"][name] = {"sha256": checkpoint._sha256(p), "bytes": p.stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(m))


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def flip(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x10
    p.write_bytes(bytes(b))


def plant_pickle(folder: Path, signed: bool) -> None:
    (folder / "model.safetensors").write_bytes(pickle.dumps(Payload(folder.parent.parent / "pwned")))
    if signed:
        resign(folder, "model.safetensors")


def edit_json(folder: Path, name: str, change) -> None:
    p = folder / name
    p.write_text(json.dumps(change(json.loads(p.read_text()))))
    resign(folder, name)


CK = "checkpoints/step-00000006"
# name -> (mutate(run folder, tmp), extra args, needles). Mutations run on a copy of the base run.
CHECKPOINT_CASES = {
    "lr changed": (None, ["lr=0.5"], ["config changed since this checkpoint", "lr: 0.01 -> 0.5", "resume=force"]),
    "batch size changed": (None, ["batch_size=4"], ["batch_size: 8 -> 4"]),
    "model width changed": (None, ["hidden=[7]"], ["hidden: [4] -> [7]"]),
    "seed changed": (None, ["seed=1"], ["seed: 0 -> 1"]),
    "optimizer changed": (None, ["optimizer=adamw"], ["optimizer: 'sgd' -> 'adamw'"]),
    "guard policy changed": (None, ["guard.policy=stop"], ["guard.policy: 'skip' -> 'stop'"]),
    "schedule changed": (None, ["schedule=cosine"], ["schedule: 'constant' -> 'cosine'"]),
    "data file changed": (
        lambda r, t: (t / "e.csv").write_text("a,b,y\n" + ROWS),
        ["data={t}/e.csv"],
        ["data: ", "e.csv"],
    ),
    "forced onto another width": (None, ["hidden=[7]", "resume=force"], ["step-00000006", "the model has (7,"]),
    "forced onto more rows": (
        lambda r, t: (t / "e.csv").write_text("a,b,y\n" + ROWS + ROWS),
        ["data={t}/e.csv", "resume=force"],
        ["made with 24 training samples", "now has 48"],
    ),
    "flipped weights byte": (
        lambda r, t: flip(r / CK / "model.safetensors"),
        [],
        ["no checkpoint verifies", "model.safetensors checksum mismatch"],
    ),
    "truncated state": (
        lambda r, t: (r / CK / "state.safetensors").write_bytes((r / CK / "state.safetensors").read_bytes()[:-7]),
        [],
        ["state.safetensors has", "truncated"],
    ),
    "missing state.json": (lambda r, t: (r / CK / "state.json").unlink(), [], ["state.json missing"]),
    "pickle planted": (lambda r, t: plant_pickle(r / CK, False), [], ["model.safetensors has", "manifest says"]),
    "pickle planted, manifest forged": (
        lambda r, t: plant_pickle(r / CK, True),
        [],
        ["model.safetensors: not a readable safetensors file"],
    ),
    "manifest missing": (
        lambda r, t: (r / CK / "manifest.json").unlink(),
        [],
        ["manifest.json missing (half-written?)"],
    ),
    "manifest garbage": (
        lambda r, t: (r / CK / "manifest.json").write_text("{not json"),
        [],
        ["manifest.json is not a valid manifest"],
    ),
    "manifest lists an extra file": (
        lambda r, t: edit_json(
            r / CK, "manifest.json", lambda m: {**m, "files": {**m["files"], "extra.bin": {"sha256": "0", "bytes": 1}}}
        ),
        [],
        ["manifest lists"],
    ),
    "state without data position": (
        lambda r, t: edit_json(r / CK, "state.json", lambda s: {k: v for k, v in s.items() if k != "data"}),
        [],
        ["state.json has no data position"],
    ),
    "config.json forged to a list": (lambda r, t: edit_json(r / CK, "config.json", lambda c: [c]), [], ["wrong shape"]),
    "optimizer state forged": (
        lambda r, t: edit_json(r / CK, "state.json", lambda s: {**s, "optimizer": {"state": {}, "param_groups": []}}),
        [],
        ["state does not restore"],
    ),
}


@pytest.mark.parametrize("name", list(CHECKPOINT_CASES))
def test_bad_checkpoint_or_resume(name, base, tmp_path, capsys):
    mutate, extra, needles = CHECKPOINT_CASES[name]
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    if mutate:
        mutate(run, tmp_path)
    before = snapshot(run)
    args = [a.replace("{t}", str(tmp_path)) for a in extra]
    code = main(["train", *base_args(base), f"out_dir={run}", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("gradtune: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert snapshot(run) == before, "a refused resume must not touch out_dir"
    assert not (tmp_path / "pwned").exists()


def parquet(t: Path, cols: dict, name: str = "d.parquet") -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(cols), t / name)
    return f"data={t / name}"


def text(t: Path, body: str, name: str) -> str:
    (t / name).write_text(body)
    return f"data={t / name}"


# name -> (args(tmp), needles), run against a fresh out_dir that must not appear.
FRESH_CASES = {
    "resume forced without checkpoint": (lambda t: ["resume=force"], ["resume=force: no checkpoint in"]),
    "resume bad choice": (lambda t: ["resume=maybe"], ["'resume'", "'auto' | 'never' | 'force'"]),
    "keep no checkpoints": (lambda t: ["keep_checkpoints=0"], ["'keep_checkpoints' must be >= 1, got 0"]),
    "negative checkpoint interval": (lambda t: ["checkpoint_every=-1"], ["'checkpoint_every' must be >= 0"]),
    "guard lr factor above 1": (lambda t: ["guard.lr_factor=1.5"], ["'guard.lr_factor' must be in (0, 1)"]),
    "guard unknown policy": (lambda t: ["guard.policy=retry"], ["'guard.policy'", "'rollback'"]),
    "guard tiny window": (lambda t: ["guard.spike_window=2"], ["'guard.spike_window' must be >= 5"]),
    "guard negative rollbacks": (lambda t: ["guard.max_rollbacks=-1"], ["'guard.max_rollbacks' must be >= 0"]),
    "parquet null cell": (
        lambda t: [parquet(t, {"a": [1.0, None, 3.0], "y": [1.0, 2.0, 3.0]})],
        ["d.parquet:2", "column 'a'", "None"],
    ),
    "parquet text cell": (
        lambda t: [parquet(t, {"a": ["1", "x", "3"], "y": [1.0, 2.0, 3.0]})],
        ["d.parquet:2", "column 'a'", "'x'"],
    ),
    "parquet missing target": (
        lambda t: [parquet(t, {"a": [1.0, 2.0], "y": [1.0, 2.0]}), "target=yy"],
        ["target column 'yy' not found"],
    ),
    "parquet corrupt": (lambda t: [text(t, "PAR1 garbage", "d.parquet")], ["d.parquet", "not a readable Parquet file"]),
    "jsonl not an object": (
        lambda t: [text(t, '{"a": 1, "y": 2}\n[1, 2]\n', "d.jsonl")],
        ["d.jsonl:2", "expected a JSON object"],
    ),
    "jsonl missing column": (
        lambda t: [text(t, '{"a": 1, "y": 2}\n{"y": 3}\n', "d.jsonl")],
        ["d.jsonl:2", "column 'a' missing"],
    ),
    "jsonl boolean cell": (
        lambda t: [text(t, '{"a": 1, "y": 2}\n{"a": true, "y": 3}\n', "d.jsonl")],
        ["d.jsonl:2", "column 'a'", "True"],
    ),
    "tsv bad cell": (lambda t: [text(t, "a\ty\n1\t2\n3q\t4\n", "d.tsv")], ["d.tsv:3", "column 'a'", "'3q'"]),
    "unsupported format": (lambda t: [text(t, "a,y\n1,2\n", "d.xlsx")], ["unsupported data format '.xlsx'"]),
    "text target for regression": (
        lambda t: [text(t, "a,y\n1,2\n2,cat\n", "d.csv"), "task=regression"],
        ["d.csv:3", "column 'y'", "'cat'"],
    ),
    "data is a folder": (lambda t: [f"data={t}"], ["data file not found"]),
}


@pytest.mark.parametrize("name", list(FRESH_CASES))
def test_bad_fresh_input(name, tmp_path, capsys):
    make, needles = FRESH_CASES[name]
    out = tmp_path / "out"
    args = make(tmp_path)
    if not any(a.startswith("data=") for a in args):
        args.append("data=diabetes")
    code = main(["train", *args, f"out_dir={out}", "max_steps=2", "progress=off", "plot=false"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("gradtune: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()
