"""Checkpoint folders: round trip, atomicity, retention, tamper detection, disk full."""

import errno
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from gradtune.cli import main
from gradtune.config import load_config
from gradtune.jobs.registry import build
from gradtune.loop.fit import fit
from gradtune.runtime.errors import GradtuneError
from gradtune.state import checkpoint


def tree():
    return {
        "step": 7,
        "opt": {
            "state": {0: {"momentum_buffer": torch.randn(3, 2), "step": torch.tensor(4.0)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0], "foreach": None}],
        },
        "window": [1.5, float("inf")],
        "rng": (3, (1, 2, 3), None),
    }


def save(root: Path, step: int, keep: int = 2) -> Path:
    return checkpoint.save(root, step, {"w": torch.randn(4, 3), "b": torch.zeros(3)}, tree(), {"lr": 0.1}, "h", keep)


def test_round_trip_restores_every_type(tmp_path):
    t = tree()
    folder = checkpoint.save(tmp_path, 7, {"w": torch.ones(2)}, t, {"lr": 0.1}, "abc", 2)
    model, state, config = checkpoint.load(folder)
    assert torch.equal(model["w"], torch.ones(2)) and config == {"hash": "abc", "config": {"lr": 0.1}}
    assert torch.equal(state["opt"]["state"][0]["momentum_buffer"], t["opt"]["state"][0]["momentum_buffer"])
    assert state["opt"]["param_groups"][0]["betas"] == (0.9, 0.999) and state["rng"] == (3, (1, 2, 3), None)
    assert state["window"] == [1.5, float("inf")] and list(state["opt"]["state"]) == [0]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*checkpoint.FILES, "manifest.json"])


def test_retention_keeps_the_newest_and_sweeps_leftovers(tmp_path):
    (tmp_path / ".tmp-step-00000009-123").mkdir()  # a killed writer's leftover
    for step in (3, 6, 9, 12):
        save(tmp_path, step, keep=2)
    assert [s for s, _ in checkpoint.listing(tmp_path)] == [9, 12]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000009", "step-00000012"]


def test_a_kill_while_pruning_leaves_no_broken_checkpoint(tmp_path, monkeypatch):
    """Death inside the deletion of an old checkpoint (after its first file): every folder under a
    checkpoint name still verifies, and the next save sweeps the half-deleted one."""
    save(tmp_path, 3)
    save(tmp_path, 6)

    def dies_midway(path, ignore_errors=False):
        if not Path(path).exists():
            return
        next(p for p in Path(path).iterdir() if p.is_file()).unlink()
        raise SystemExit("killed")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", dies_midway)
    with pytest.raises(SystemExit):
        save(tmp_path, 9)
    monkeypatch.undo()
    assert [s for s, _ in checkpoint.listing(tmp_path)] == [6, 9]
    assert all(checkpoint.verify(p) is None for _, p in checkpoint.listing(tmp_path))
    save(tmp_path, 12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000009", "step-00000012"]


def test_removing_a_folder_again_takes_what_a_killed_removal_left(tmp_path):
    """resume: never removes the whole checkpoints folder the same way; a removal killed midway
    left it renamed beside it: the next removal of that name takes it too."""
    root = tmp_path / "checkpoints"
    save(root, 3)
    left = tmp_path / ".old-checkpoints-99999"
    (left / "step-00000001").mkdir(parents=True)
    checkpoint.remove(root)
    assert list(tmp_path.iterdir()) == []


def test_saving_the_same_step_again_replaces_it_whole(tmp_path):
    save(tmp_path, 5)
    save(tmp_path, 5)
    assert checkpoint.verify(tmp_path / "step-00000005") is None and len(list(tmp_path.iterdir())) == 1


class Payload:
    """Would create a file if it were ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def tamper(folder: Path, how: str, marker: Path) -> None:
    target = folder / "model.safetensors"
    if how == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif how == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif how == "missing":
        target.unlink()
    elif how == "no_manifest":
        (folder / "manifest.json").unlink()
    elif how in ("pickle", "pickle_resigned"):
        target.write_bytes(pickle.dumps(Payload(marker)))
        if how == "pickle_resigned":  # an attacker who also rewrote the manifest
            m = json.loads((folder / "manifest.json").read_text())
            m["files"]["model.safetensors"] = {"sha256": checkpoint._sha256(target), "bytes": target.stat().st_size}
            (folder / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("how", ["flip", "truncate", "missing", "no_manifest", "pickle", "pickle_resigned"])
def test_tampered_folder_is_detected_never_executed(how, tmp_path):
    marker = tmp_path / "pwned"
    folder = save(tmp_path / "ck", 4)
    tamper(folder, how, marker)
    with pytest.raises(GradtuneError) as e:
        checkpoint.load(folder)
    assert str(folder) in str(e.value)
    assert not marker.exists()


def cfg_for(out: Path, *extra: str):
    return load_config(
        None,
        [
            "model=mlp",
            "hidden=[4]",
            "standardize_target=true",
            "batch_size=16",
            "max_steps=30",
            "checkpoint_every=10",
            "progress=off",
            "plot=false",
            f"out_dir={out}",
            *extra,
        ],
    )


def test_disk_full_keeps_the_previous_checkpoint_and_resume_is_exact(tmp_path, monkeypatch, capsys):
    ref = tmp_path / "ref"
    cfg = cfg_for(ref)
    job = build(cfg)
    fit(job, cfg, ref)
    ref_w = job.model.state_dict()

    out = tmp_path / "run"
    real = checkpoint._write_tensors
    calls = {"n": 0}

    def full_disk(path, tensors):
        calls["n"] += 1
        if calls["n"] == 3:  # the second checkpoint's model.safetensors (step 20)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, tensors)

    monkeypatch.setattr(checkpoint, "_write_tensors", full_disk)
    code = main(
        [
            "train",
            "model=mlp",
            "hidden=[4]",
            "standardize_target=true",
            "batch_size=16",
            "max_steps=30",
            "checkpoint_every=10",
            "progress=off",
            "plot=false",
            f"out_dir={out}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 74 and len(err.splitlines()) == 1
    assert "cannot write checkpoint" in err and "step-00000020" in err and "No space left on device" in err
    assert "last good checkpoint: step 10" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000010"]
    assert checkpoint.verify(out / "checkpoints" / "step-00000010") is None
    assert not (out / "model.safetensors").exists()  # no final outputs from a failed run

    monkeypatch.setattr(checkpoint, "_write_tensors", real)
    cfg = cfg_for(out)
    job = build(cfg)
    fit(job, cfg, out)
    assert all(torch.equal(v, ref_w[k]) for k, v in job.model.state_dict().items())


def test_unwritable_checkpoint_folder_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("a file where the folder should be")
    cfg = cfg_for(out, "resume=never")
    with pytest.raises(GradtuneError) as e:
        fit(build(cfg), cfg, out)
    assert "checkpoints" in str(e.value)
    shutil.rmtree(out)
