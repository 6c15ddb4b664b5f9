"""Exact resume, in process: interrupt a run at random steps, resume, compare with the
uninterrupted run bit for bit (the oracle). Negative controls prove the comparison has teeth:
leaving one random state or the data position unrestored makes it fail."""

import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from gradtune.config import load_config
from gradtune.data.batch_ramp import BatchRamp
from gradtune.data.sampler import Sampler
from gradtune.jobs.registry import build
from gradtune.loop.fit import fit
from gradtune.runtime import testhooks as faults
from gradtune.runtime.errors import GradtuneError
from gradtune.state import checkpoint
from tests import hooks

MODES = {
    "full": ["batch_size=full", "micro_batch_size=100", "max_steps=12"],  # 4 micro-batches a step
    "sgd": ["batch_size=1", "max_steps=40", "eval_every=7"],
    "minibatch": ["batch_size=32", "micro_batch_size=12", "max_steps=30", "optimizer=adamw"],
    # a batch ramp 3 -> 32 over 20 steps: kills land inside the ramp, the sizes come from the step
    "ramp": ["batch_size=32", "micro_batch_size=12", "batch_ramp_steps=20", "batch_ramp_start=3", "max_steps=30"],
}


class Interrupt(BaseException):
    """Stands for a kill: not an Exception, so nothing in the loop can swallow it."""


def job_and_cfg(out: Path, mode: str, extra: list[str] = ()):
    momentum = [] if "optimizer=adamw" in MODES[mode] else ["momentum=0.5"]
    cfg = load_config(
        None,
        [
            "model=mlp",
            "hidden=[6]",
            "standardize_target=true",
            "lr=0.05",
            *momentum,
            "checkpoint_every=5",
            "progress=off",
            "plot=false",
            f"out_dir={out}",
            "seed=3",
            *MODES[mode],
            *extra,
        ],
    )
    job = build(cfg)
    # Input dropout draws from torch's generator every step: the run depends on the RNG state.
    job.model = nn.Sequential(nn.Dropout(0.1), job.model)
    return job, cfg


def weights(job) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in job.model.state_dict().items()}


def eval_rows(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r.get("val_loss")) for r in rows if r["kind"] == "eval"]


probe_steps = hooks.probe_steps


def run_interrupted(tmp: Path, mode: str, monkeypatch, kills: list[int]) -> tuple[dict, Path, int]:
    """Run, 'killing' at the given step counts (per process), resuming each time."""
    out = tmp / f"{mode}-resumed"
    monkeypatch.setenv(hooks.PROBE, str(tmp / f"{mode}-resumed.probe"))
    done = 0
    for k in kills + [None]:
        seen = {"n": 0}

        def hit(point: str, k=k, seen=seen) -> None:
            if point == "step" and k is not None:
                seen["n"] += 1
                if seen["n"] == k:
                    raise Interrupt()

        monkeypatch.setattr(faults, "hit", hit)
        job, cfg = job_and_cfg(out, mode)
        try:
            fit(job, cfg, out)
        except Interrupt:
            done += 1
            continue
        return weights(job), out, done
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    refs = {}
    mp = pytest.MonkeyPatch()
    for mode in MODES:
        mp.setenv(hooks.PROBE, str(tmp / f"{mode}.probe"))
        out = tmp / mode
        job, cfg = job_and_cfg(out, mode)
        fit(job, cfg, out)
        refs[mode] = (weights(job), eval_rows(out), probe_steps(tmp / f"{mode}.probe"))
    mp.undo()
    return refs


@pytest.mark.parametrize("mode", list(MODES))
def test_interrupted_runs_resume_bitwise(mode, references, tmp_path, monkeypatch):
    ref_w, ref_rows, ref_probe = references[mode]
    rng = random.Random(mode)
    kills = [rng.randint(2, 9) for _ in range(3)]
    w, out, n = run_interrupted(tmp_path, mode, monkeypatch, kills)
    assert n == 3
    assert all(torch.equal(w[k], ref_w[k]) for k in ref_w)
    assert eval_rows(out) == ref_rows
    got = probe_steps(tmp_path / f"{mode}-resumed.probe")
    assert sorted(got) == list(range(1, len(ref_probe) + 1))
    assert got == ref_probe  # every step trained on exactly the reference's samples


def test_the_ramp_mode_takes_the_ramps_sizes(references):
    """The resumed ramp run above matched this probe step for step: so did its sizes."""
    _, _, probe = references["ramp"]
    sampler = Sampler(len(build(load_config(None, ["model=mlp"])).train), 32)
    sampler.ramp = BatchRamp.create(3, 20, 32)
    sizes = [sum(len(m) for m in sampler.draw(t).micro) for t in range(30)]  # an epoch's end cuts one short
    assert [len(probe[s]) for s in sorted(probe)] == sizes and sizes[:8] == [3, 4, 5, 7, 8, 10, 11, 13]


def test_each_epoch_sees_every_sample_once(references):
    """The probe itself: within each epoch the steps' samples form a permutation."""
    _, _, probe = references["minibatch"]
    n = len(build(load_config(None, ["model=mlp"])).train)
    per_epoch = -(-n // 32)
    for e in range(2):
        ids = [i for s in range(e * per_epoch + 1, (e + 1) * per_epoch + 1) for i in probe[s]]
        assert sorted(ids) == list(range(n))


@pytest.mark.parametrize("broken", ["torch_rng", "data_position"])
def test_negative_controls_detect_missing_restore(broken, references, tmp_path, monkeypatch):
    """The exactness test fails when one piece of state is not restored."""
    mode = "sgd"
    ref_w, _, ref_probe = references[mode]
    if broken == "torch_rng":
        real = checkpoint.set_rng_state
        monkeypatch.setattr(checkpoint, "set_rng_state", lambda s: real({**s, "torch": torch.get_rng_state()}))
    else:
        monkeypatch.setattr(Sampler, "load_state", lambda self, state: None)
    w, _, _ = run_interrupted(tmp_path, mode, monkeypatch, [7])
    same_w = all(torch.equal(w[k], ref_w[k]) for k in ref_w)
    same_data = probe_steps(tmp_path / f"{mode}-resumed.probe") == ref_probe
    assert not same_w
    if broken == "data_position":
        assert not same_data


def test_random_states_round_trip_through_json_and_safetensors(tmp_path):
    import numpy as np

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = checkpoint.rng_state()
    tensors: dict = {}
    tree = json.loads(json.dumps(checkpoint.split_tensors(saved, "rng", tensors)))
    expect = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(checkpoint.join_tensors(tree, tensors))
    assert (random.random(), np.random.rand()) == expect[:2] and torch.equal(torch.rand(1), expect[2])


def test_config_change_is_refused_with_the_differences_unless_forced(tmp_path):
    out = tmp_path / "run"
    job, cfg = job_and_cfg(out, "minibatch")
    fit(job, cfg, out)
    job, cfg = job_and_cfg(out, "minibatch", ["lr=0.1", "batch_size=16", "progress=lines", "log_every=3"])
    with pytest.raises(GradtuneError) as e:
        fit(job, cfg, out)
    msg = str(e.value)
    assert "lr: 0.05 -> 0.1" in msg and "batch_size: 32 -> 16" in msg
    assert "progress" not in msg and "log_every" not in msg  # run-neutral settings never block
    job, cfg = job_and_cfg(out, "minibatch", ["lr=0.1", "resume=force", "max_steps=33"])
    assert fit(job, cfg, out).steps == 33


def test_extending_a_constant_schedule_run_resumes_it(tmp_path):
    out = tmp_path / "run"
    job, cfg = job_and_cfg(out, "minibatch")
    fit(job, cfg, out)
    job, cfg = job_and_cfg(out, "minibatch", ["max_steps=35"])
    r = fit(job, cfg, out)
    assert r.steps == 35
    assert [
        x
        for x in json.loads("[" + ",".join((out / "metrics.jsonl").read_text().splitlines()) + "]")
        if x["kind"] == "resume"
    ][0]["step"] == 30


def test_corrupt_newest_checkpoint_is_reported_and_the_previous_used(tmp_path, capsys):
    out = tmp_path / "run"
    job, cfg = job_and_cfg(out, "minibatch", ["keep_checkpoints=3", "max_steps=20"])
    fit(job, cfg, out)
    newest = out / "checkpoints" / "step-00000020" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0xFF
    newest.write_bytes(bytes(data))
    job, cfg = job_and_cfg(out, "minibatch", ["keep_checkpoints=3", "max_steps=20"])
    r = fit(job, cfg, out)
    err = capsys.readouterr().err
    assert "skipped checkpoint" in err and "step-00000020" in err and "checksum mismatch" in err
    assert r.steps == 20
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["checkpoint"] for x in rows if x["kind"] == "resume"] == ["step-00000015"]
    assert checkpoint.verify(out / "checkpoints" / "step-00000020") is None  # rewritten whole
