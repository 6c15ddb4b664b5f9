"""SIGTERM / SIGINT: checkpoint at the step boundary, exit 75, resume exactly (in process; the
real-process version, with a second signal during the write, is in test_kill_resume.py)."""

import os
import signal

import pytest
import torch

from gradtune.config import load_config
from gradtune.jobs.registry import build
from gradtune.loop.fit import fit
from gradtune.runtime import testhooks as faults
from gradtune.state import checkpoint
from gradtune.state.preempt import EXIT_PREEMPTED, Preempted


def cfg_for(out, *extra):
    return load_config(
        None,
        [
            "model=mlp",
            "hidden=[4]",
            "standardize_target=true",
            "batch_size=16",
            "micro_batch_size=5",
            "max_steps=25",
            "checkpoint_every=10",
            "progress=off",
            "plot=false",
            f"out_dir={out}",
            *extra,
        ],
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_a_checkpoint_and_the_resumed_run_is_exact(sig, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    job = build(cfg_for(ref))
    fit(job, cfg_for(ref), ref)
    want = job.model.state_dict()

    out = tmp_path / "run"
    seen = {"n": 0}

    def hit(point: str) -> None:
        if point == "step":
            seen["n"] += 1
            if seen["n"] == 13:
                os.kill(os.getpid(), sig)  # arrives mid-step; handled at the step boundary

    monkeypatch.setattr(faults, "hit", hit)
    before = signal.getsignal(sig)
    with pytest.raises(Preempted) as e:
        fit(build(cfg_for(out)), cfg_for(out), out)
    assert e.value.exit_code == EXIT_PREEMPTED == 75
    assert str(e.value).startswith(f"preempted by {sig.name} at step 13; checkpoint ")
    assert checkpoint.verify(out / "checkpoints" / "step-00000013") is None
    assert signal.getsignal(sig) is before  # the run's handlers are gone again

    monkeypatch.setattr(faults, "hit", lambda point: None)
    job = build(cfg_for(out))
    fit(job, cfg_for(out), out)
    assert all(torch.equal(v, want[k]) for k, v in job.model.state_dict().items())


GRACE_CHILD = """
import os, signal, sys, time
from gradtune.state import preempt
with preempt.catch(grace=float(sys.argv[1])) as flag:
    os.kill(os.getpid(), signal.SIGTERM)
    if sys.argv[2] == "answer":
        time.sleep(0.05)
        flag.answer()  # the loop reached its step boundary: the checkpoint may take its time
    time.sleep(1.5)  # a rank stuck in its own code (or a collective whose peer is gone)
print("ended", flag.signal)
"""


@pytest.mark.parametrize("answered", [False, True])
def test_a_rank_that_misses_the_step_boundary_exits_after_the_grace(answered):
    """Under torchrun the grace is dist_timeout: a rank that cannot reach the step boundary ends
    with one line (128 + SIGTERM) instead of holding the job until the launcher's SIGKILL."""
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-c", GRACE_CHILD, "0.3", "answer" if answered else "stuck"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if answered:
        assert p.returncode == 0 and p.stdout.strip() == "ended SIGTERM", p.stderr
    else:
        assert p.returncode == 128 + signal.SIGTERM and p.stdout == "", (p.returncode, p.stdout)
        assert p.stderr.strip().splitlines() == [
            "gradtune: SIGTERM: no step boundary reached within 0.3s (dist_timeout): exiting"
        ]
