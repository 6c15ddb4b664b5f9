"""FSDP2 under SIGKILL: ``torchrun --nproc_per_node 2 -m gradtune train distributed=fsdp``, killed at
random moments and rerun each time (resume=auto), ends on the uninterrupted 2-process run bitwise.

Each launch is killed once, at a point drawn at random: a fault on one rank (GRADTUNE_TEST_FAULTS
``/rankR``) after an optimizer step, inside an accumulation window, once that rank's shards are
written, after rank 0 wrote the loop state / before the rename / after it; or SIGKILL from
outside, once the probe shows a few more steps, of torchrun and both workers at once (torchrun
starts each worker in a session of its own, so killing torchrun's process group alone would
leave them running: a scheduler kills the whole job). The next launch resumes. After every
kill each folder under a final name must verify. The chain must end with the uninterrupted run's
weights, loss rows and per-step sample ids.

World size change: a checkpoint of the chain, resumed by one process and by three, ends within a
stated bound of the 2-process run (same batches; float32 sums in another order).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gradtune.state import checkpoint, sharded
from tests import hooks

ROOT = Path(__file__).resolve().parents[2]
TAG = "GRADTUNE_TEST_LAUNCH"  # marks every process of one launch
EVERY = 3  # checkpoint_every: any 4 consecutive steps of a launch pass a committed checkpoint
POINTS = ["step", "micro", "ckpt.model", "ckpt.files", "ckpt.rename", "ckpt.after", "external"]
KILLS = 14 if hooks.LONG else len(POINTS)  # each point once in make test; GRADTUNE_LONG_TESTS=1: more
# More than the launches can reach, so a kill always comes before the end: a launch resumes at a
# checkpoint and is killed within 2 EVERY steps of it, after the SIGTERM launch's EVERY + 2.
STEPS = 90 if hooks.LONG else 60
assert STEPS > EVERY + 2 + 2 * EVERY * KILLS
SETTINGS = [
    "model=gpt",
    "optimizer=adamw",  # the recipe's Muon orthogonalises whole matrices: FSDP refuses it
    "gpt.n_layer=2",
    "gpt.n_embd=32",
    "gpt.n_head=2",
    "gpt.block_size=32",
    "batch_size=8",
    "micro_batch_size=4",
    f"max_steps={STEPS}",
    "eval_every=15",
    "val_fraction=0.002",
    f"checkpoint_every={EVERY}",
    "keep_checkpoints=2",
    "distributed=fsdp",
    "device=cpu",
    "plot=false",
    "progress=off",
    "dist_timeout=30",
    "resume=auto",
]
MICRO = 2  # micro-batches per step, on every rank
SMALL = [*SETTINGS, "max_steps=12"]  # later settings win
# Worst relative difference per tensor, 1 or 3 processes vs 2, after up to ~75 AdamW steps (~45 in make test) in
# float32 from a rounding-level start (summation order); a state not restored is off by ~1e-2.
OTHER_WORLD_BOUND = 3e-4


from tests.e2e.test_distributed import _env, _port  # noqa: E402  (one launch environment)


def launch(
    out: Path, probe: Path, faults: str = "", nproc: int = 2, settings: list[str] = SETTINGS
) -> subprocess.Popen:
    """``gradtune train`` under torchrun (``nproc`` 2) or alone (1), in a session of its own."""
    head = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_port()),
        ]
        if nproc > 1
        else [sys.executable]
    )
    probe.mkdir(exist_ok=True)  # each rank appends there; rank 0 alone would create it
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    env = _env(**{hooks.FAULTS: faults, hooks.PROBE: str(probe), TAG: tag})
    p = subprocess.Popen(
        [*head, "-m", "gradtune", "train", *settings, f"out_dir={out}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    p.tag = tag  # type: ignore[attr-defined]
    return p


def _tagged(tag: str) -> list[int]:
    """Every live process of one launch, by the tag its environment inherited (Linux /proc): torchrun
    starts each worker in a session of its own, and a worker outliving torchrun is no longer its child."""
    mark = f"{TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and mark in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_job(p: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers, together (what a scheduler does to a job)."""
    for pid in [*_tagged(p.tag), p.pid]:  # type: ignore[attr-defined]
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def finish(p: subprocess.Popen, timeout: float = 240) -> str:
    """The launch's output once it ends; a launch that hangs fails the test (and is killed)."""
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(p)
        out, _ = p.communicate()
        raise AssertionError(f"launch hung for {timeout}s:\n{out[-3000:]}") from None
    finally:
        deadline = time.monotonic() + 10  # a SIGKILLed process takes a moment to go
        while (left := _tagged(p.tag)) and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.1)
        kill_job(p)  # never leave a worker behind
    assert not left, f"processes outlived their launch: {left}\n{out[-3000:]}"
    assert "terminate called" not in out, out[-3000:]  # no gloo thread outlived an interpreter
    return out


def probed(probe: Path) -> int:
    try:
        return hooks.steps_file(probe).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_after(p: subprocess.Popen, probe: Path, more: int) -> None:
    """SIGKILL the job from outside once ``more`` further steps are probed (wherever it is)."""
    target, t0 = probed(probe) + more, time.monotonic()
    while p.poll() is None and probed(probe) < target and time.monotonic() - t0 < 180:
        time.sleep(0.005)
    if p.poll() is None:
        kill_job(p)


def schedule(rng: random.Random) -> list[tuple[str, int]]:
    """(point, rank) of each kill: every point at least once, the rest drawn; the kills that may
    hit either rank alternate between them, starting with rank 1."""
    points = [*POINTS, *rng.choices(POINTS, k=KILLS - len(POINTS))]
    rng.shuffle(points)
    either = [i for i, point in enumerate(points) if point in ("step", "micro", "ckpt.model")]
    return [(point, (either.index(i) + 1) % 2 if i in either else 0) for i, point in enumerate(points)]


def fault_plan(rng: random.Random, point: str, rank: int) -> str:
    """GRADTUNE_TEST_FAULTS (or the external step count) for a kill at ``point`` on ``rank``; every
    plan lets the launch commit a checkpoint first (counts are per launch, and a launch starts on
    a multiple of EVERY)."""
    if point == "step":
        return f"step@{rng.randint(EVERY + 1, 2 * EVERY)}=KILL/rank{rank}"
    if point == "micro":  # the first micro-batch of a step: inside the accumulation window
        return f"micro@{MICRO * rng.randint(EVERY, 2 * EVERY - 1) + 1}=KILL/rank{rank}"
    if point == "ckpt.model":  # after this rank's shards are written (every rank passes it)
        return f"ckpt.model@2=KILL/rank{rank}"
    if point == "external":
        return str(rng.randint(EVERY + 1, 2 * EVERY))
    return f"{point}@2=KILL/rank0"  # rank 0 alone writes the state, manifest, rename


def all_verify(out: Path) -> bool:
    return all(
        (sharded.verify(p) if sharded.is_sharded(p) else checkpoint.verify(p)) is None
        for _, p in checkpoint.listing(checkpoint.root(out))
    )


def eval_rows(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r.get("val_loss")) for r in rows if r["kind"] == "eval"]


def worst_rel(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    return max(((got[k] - ref[k]).norm() / ref[k].norm().clamp(min=1e-30)).item() for k in got)


def one_rank_term(out: Path, probe: Path) -> dict:
    """SIGTERM on rank 1 only: both ranks agree to stop after the same step, checkpoint it, exit 75."""
    text = finish(launch(out, probe, f"step@{EVERY + 2}=TERM/rank1"))
    stops = sorted(
        re.search(r" at step (\d+);", line).group(1)
        for line in text.splitlines()
        if line.startswith("gradtune: preempted on rank")
    )
    return {"stops": stops, "newest": checkpoint.newest_step(checkpoint.root(out)), "text": text[-2000:]}


@pytest.mark.slow
def test_fsdp_sigkill_at_random_moments_resumes_bitwise(tmp_path):
    ref, out, one, three = tmp_path / "ref", tmp_path / "chain", tmp_path / "one", tmp_path / "three"
    text = finish(launch(ref, tmp_path / "ref.probe"))
    assert f"done: {STEPS} steps" in text, text[-3000:]
    term = one_rank_term(out, tmp_path / "chain.probe")
    assert len(term["stops"]) == 2 and term["stops"][0] == term["stops"][1], term
    assert int(term["stops"][0]) == term["newest"], term
    rng, log, t0 = random.Random(int(os.environ.get("GRADTUNE_TEST_SEED", "7"))), [], time.monotonic()
    for point, rank in schedule(rng):
        plan = fault_plan(rng, point, rank)
        p = launch(out, tmp_path / "chain.probe", plan if point != "external" else "")
        if point == "external":
            kill_after(p, tmp_path / "chain.probe", int(plan))
        text = finish(p)
        log.append((point, plan, p.returncode, all_verify(out), checkpoint.newest_step(checkpoint.root(out))))
        assert p.returncode != 0, f"finished before its kill ({point} {plan}): raise STEPS\n{text[-2000:]}"
        assert log[-1][3], f"a checkpoint under its final name does not verify after {log[-1]}"
        if len(log) == KILLS // 2:  # a mid-run checkpoint, for the 1-process resume below
            newest = checkpoint.newest_step(checkpoint.root(out))
            for other in (one, three):
                shutil.copytree(
                    checkpoint.root(out) / checkpoint.folder_name(newest),
                    checkpoint.root(other) / checkpoint.folder_name(newest),
                )
    text = finish(launch(out, tmp_path / "chain.probe"))
    assert f"done: {STEPS} steps" in text, text[-3000:]
    print(
        f"\nFSDP kill trials ({time.monotonic() - t0:.0f}s): "
        + "; ".join(f"{e[0]} {e[1]} -> rc {e[2]}, newest {e[4]}" for e in log)
    )
    leftovers = [q.name for q in checkpoint.root(out).iterdir() if not sharded.is_sharded(q)]
    assert leftovers == [], f"not swept (or not sharded): {leftovers}"
    got, want = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), "final weights differ"
    assert eval_rows(out) == eval_rows(ref), "loss trajectory differs"
    steps = hooks.probe_steps(tmp_path / "chain.probe")
    assert steps == hooks.probe_steps(tmp_path / "ref.probe") and sorted(steps) == list(range(1, STEPS + 1))
    # World size 2 -> 1 and 2 -> 3: the same sharded checkpoint (DCP reshards; 3 shards are uneven).
    start = checkpoint.newest_step(checkpoint.root(one))
    for where, nproc in ((one, 1), (three, 3)):
        text = finish(launch(where, tmp_path / f"{nproc}.probe", nproc=nproc))
        first = json.loads((where / "metrics.jsonl").read_text().splitlines()[0])
        assert f"done: {STEPS} steps" in text and first == {**first, "kind": "resume", "step": start}, text[-3000:]
        rel = worst_rel(load_file(str(where / "model.safetensors")), want)
        print(f"{nproc} process(es) from step {start}: worst relative difference {rel:.2e} (bound {OTHER_WORLD_BOUND})")
        assert rel < OTHER_WORLD_BOUND


@pytest.mark.slow
def test_one_process_checkpoint_resumes_under_fsdp(tmp_path):
    """World size 1 -> 2: a one-file checkpoint (one process wrote it) resumed by FSDP2, each rank
    keeping its shard of the weights and of the optimizer state; tied embeddings stored once."""
    out, probe = tmp_path / "run", tmp_path / "probe"
    text = finish(launch(out, probe, nproc=1, settings=SMALL))
    assert "done: 12 steps" in text, text[-3000:]
    alone = load_file(str(out / "model.safetensors"))
    shutil.rmtree(checkpoint.root(out) / checkpoint.folder_name(12))
    assert not sharded.is_sharded(checkpoint.root(out) / checkpoint.folder_name(9))
    text = finish(launch(out, probe, settings=SMALL))
    assert "done: 12 steps" in text, text[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "resume"] == [9]
    assert sharded.is_sharded(checkpoint.root(out) / checkpoint.folder_name(12))  # FSDP2 wrote the new one
    assert worst_rel(alone, load_file(str(out / "model.safetensors"))) < 1e-5  # 3 steps, float32 sums


@pytest.mark.slow
def test_guard_rollback_under_fsdp(tmp_path):
    """guard.policy=rollback under FSDP2: a loss spike reloads the newest sharded checkpoint
    (resume.latest + Loop.restore) on every rank, with a lower lr, until max_rollbacks."""
    out = tmp_path / "run"
    spiky = [
        *SMALL,
        "lr=30",
        "max_steps=40",
        "checkpoint_every=5",
        "guard.policy=rollback",
        "guard.spike_zscore=3",
        "guard.spike_window=5",
    ]
    text = finish(launch(out, tmp_path / "probe", settings=spiky))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    back = [r for r in rows if r["kind"] == "guard" and "rollback_to" in r]
    assert len(back) == 3 and all(r["rollback_to"].startswith("step-") for r in back), rows
    assert all(sharded.is_sharded(p) for _, p in checkpoint.listing(checkpoint.root(out)))
    assert [r["lr_scale"] for r in back] == [0.5, 0.25, 0.125]
    assert "after 3 rollbacks" in text, text[-3000:]


@pytest.mark.slow
def test_disk_full_under_fsdp_exits_74_on_every_rank_and_resumes_bitwise(tmp_path):
    """A size-limited tmpfs fills up during a sharded checkpoint: every rank stops with the one-line
    WriteError (exit 74), the newest checkpoint verifies, no temporary folder is left; with space
    freed the same command resumes to the uninterrupted run's weights. (Root only: skipped elsewhere.)"""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True, capture_output=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root in a mount namespace): {e}")
    try:
        every = [*SMALL, "max_steps=30", "checkpoint_every=1", "keep_checkpoints=100000"]
        text = finish(launch(tmp_path / "ref", tmp_path / "probe", settings=[*every, "checkpoint_every=0"]))
        assert "done: 30 steps" in text, text[-3000:]
        out = disk / "run"
        p = launch(out, tmp_path / "probe", settings=every)
        text = finish(p)
        full = [line for line in text.splitlines() if line.startswith("gradtune: ")]
        assert p.returncode != 0 and "exitcode  : 74" in text, text[-3000:]
        assert len(full) == 2 and all(
            "cannot write checkpoint" in line and "No space left on device" in line for line in full
        ), text[-4000:]
        ckpts = checkpoint.listing(checkpoint.root(out))
        assert ckpts and sharded.verify(ckpts[-1][1]) is None  # the newest one is whole
        assert not [q for q in checkpoint.root(out).iterdir() if q.name.startswith(".tmp-")]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True, timeout=30)
        text = finish(launch(out, tmp_path / "probe", settings=every))
        assert "done: 30 steps" in text, text[-3000:]
        got, want = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)
