"""A disk that really fills up: a size-limited tmpfs (root can mount one; elsewhere skipped with the
reason). The run stops with one line and exit 74, the newest checkpoint verifies, nothing
half-written is left, and after space is freed the same command resumes to the uninterrupted
run's weights."""

from __future__ import annotations

import subprocess

import pytest
import torch
from safetensors.torch import load_file

from gradtune.cli import main
from gradtune.state import checkpoint

ARGS = [
    "model=mlp",
    "hidden=[4]",
    "standardize_target=true",
    "batch_size=16",
    "max_steps=400",
    "checkpoint_every=1",
    "keep_checkpoints=100000",
    "progress=off",
    "plot=false",
    "eval_every=50",
]


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True, capture_output=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root in a mount namespace): {e}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_real_disk_full_exits_74_keeps_a_good_checkpoint_and_resumes_exactly(small_disk, tmp_path, capsys):
    assert main(["train", *ARGS, f"out_dir={tmp_path / 'ref'}", "checkpoint_every=0"]) == 0
    out = small_disk / "run"
    code = main(["train", *ARGS, f"out_dir={out}"])
    err = capsys.readouterr().err.strip()
    assert code == 74, err
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "Traceback" not in err
    ckpts = checkpoint.listing(out / "checkpoints")
    assert ckpts and checkpoint.verify(ckpts[-1][1]) is None  # the newest one is whole
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert not (out / "model.safetensors").exists()

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True, timeout=30)
    assert main(["train", *ARGS, f"out_dir={out}"]) == 0
    ours, ref = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_a_log_that_fills_the_disk_is_one_line_and_exit_74(small_disk, capsys):
    """metrics.jsonl (one row per step here) is what hits the full disk, not a checkpoint."""
    code = main(
        [
            "train",
            "model=mlp",
            "hidden=[4]",
            "batch_size=16",
            "epochs=1000",
            "log_every=1",
            "progress=off",
            "plot=false",
            f"out_dir={small_disk / 'run'}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 74 and len(err.splitlines()) == 1 and "No space left on device" in err, err
