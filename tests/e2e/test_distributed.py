"""Multi-process runs (torchrun, gloo, loopback) against the oracle: the same run in one process.

Process start-up dominates on small CI machines, so each torchrun launch runs many cases
(tests/e2e/distributed_worker.py) and the tests below only compare what it wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gradtune.loop.fit import fit
from gradtune.runtime import distributed
from gradtune.state import resume, sharded
from tests import hooks

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

pytestmark = pytest.mark.slow  # torchrun launches: seconds each

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).parent / "distributed_worker.py"
DDP_CASES = [c for c in worker.CASES if c != "gpt_fsdp"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only, whatever the hostname resolves to
    return env


def torchrun(nproc: int, args: list[str], **env: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_port()),
        *args,
    ]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _errors(out: str) -> str:
    """The first error lines of every rank (a failing rank's own line scrolls out of the tail)."""
    keep = [ln for ln in out.splitlines() if "gradtune: error" in ln or "Error:" in ln]
    return "first errors:\n" + "\n".join(keep[:24]) + "\n...\n"


def _finish(p: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()  # never leave a launch behind
        out, _ = p.communicate()
        raise AssertionError(f"torchrun still running after {timeout}s:\n{out[-4000:]}") from None
    assert p.returncode == 0, _errors(out) + out[-4000:]
    assert "terminate called" not in out, out[-4000:]  # no gloo thread outlived an interpreter
    return out


# The tests that read the launches below share one xdist worker (and the session-scoped fixture
# there), so the two launches run once, not once per worker.
RUNS = pytest.mark.xdist_group("distributed-runs")


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Path:
    """One 2-process launch (DDP cases, FSDP2 + checkpoints, probe) and one 3-process launch
    (DDP cases, probe), side by side."""
    out = tmp_path_factory.mktemp("dist")
    (out / "w2").mkdir()
    (out / "w3").mkdir()
    two = torchrun(2, [str(WORKER), str(out / "w2"), "all"])
    three = torchrun(3, [str(WORKER), str(out / "w3"), "ddp+probe"])
    try:
        _finish(two)
        _finish(three)
    finally:
        for p in (two, three):
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


_REFERENCE: dict[tuple[str, tuple[str, ...]], tuple[dict[str, torch.Tensor], float]] = {}


def reference(case: str, extra: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], float]:
    """The oracle: the same case trained in this (single) process (``extra``: more settings)."""
    if (case, extra) not in _REFERENCE:
        job, cfg = worker.make(case, list(extra))
        r = fit(job, cfg)
        _REFERENCE[case, extra] = ({k: v.detach().clone() for k, v in job.model.state_dict().items()}, r.train_loss)
    return _REFERENCE[case, extra]


def worst_rel(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert got.keys() == ref.keys()  # unwrapped names: no 'module.' prefix
    return max(((got[k] - ref[k]).norm() / ref[k].norm().clamp(min=1e-30)).item() for k in ref)


@RUNS
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", DDP_CASES)
def test_ddp_update_equals_one_process(runs, case, world):
    # Muon orthogonalises in bfloat16: a gradient summed in another order rounds some entries of
    # the Newton-Schulz iterates to a neighbouring bfloat16 value (2^-8 relative), and 5 matmuls
    # spread that, so the matrices agree to ~1e-3 (each step moves them ~10%; a rank stepping on
    # its own unreduced gradient would be off by far more than the bound). So for two processes
    # the oracle sums its gradient in their order: micro-batches of one rank's share (4 of 8),
    # added as the all-reduce adds the two ranks' (the full-batch gradient summed in one product
    # agreed to 1.3e-7 on one CPU and 1.2e-3 on another). Three: 3.3e-3 (a ring adds in its own order).
    extra = ("micro_batch_size=4",) if "muon" in case and world == 2 else ()
    ref, ref_loss = reference(case, extra)
    got = load_file(str(runs / f"w{world}" / f"w{world}_{case}.safetensors"))
    tol = 1e-2 if "muon" in case and world != 2 else 1e-6
    assert worst_rel(got, ref) < tol
    loss = json.loads((runs / f"w{world}" / f"w{world}_{case}.json").read_text())["loss"]
    assert loss == pytest.approx(ref_loss, rel=tol)


@RUNS
@pytest.mark.parametrize("world", [2, 3])
def test_unwrapped_model_gradients_are_summed_across_ranks(runs, world):
    got = load_file(str(runs / f"w{world}" / f"w{world}_plain_grads.safetensors"))
    assert worst_rel(got, worker.plain_grads()) < 1e-12


@RUNS
def test_fsdp2_equals_one_process(runs):
    ref, _ = reference("gpt_fsdp")
    got = load_file(str(runs / "w2" / "w2_gpt_fsdp.safetensors"))
    assert worst_rel(got, ref) < 1e-5


@RUNS
def test_fsdp2_sharded_resume_same_world_size_is_bit_exact(runs):
    """The loop's FSDP2 checkpoints (written every 5 steps), resumed from step 5 at the same world
    size, end bitwise on the uninterrupted run (which wrote no checkpoint at all)."""
    straight = load_file(str(runs / "w2" / "w2_gpt_fsdp.safetensors"))
    resumed = load_file(str(runs / "w2" / "w2_resumed.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_fsdp2_sharded_checkpoint_reloads_into_two_processes(runs):
    saved = load_file(str(runs / "w2" / "w2_resumed.safetensors"))
    reloaded = load_file(str(runs / "w2" / "w2_reloaded.safetensors"))
    folder = runs / "w2" / "ckpt10"
    assert sharded.is_sharded(folder) and sharded.verify(folder) is None
    assert sorted(p.name for p in (folder / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert all(torch.equal(saved[k], reloaded[k]) for k in saved)


def test_every_thread_ends_with_the_process_group(runs):
    """After shutdown (FSDP2 and DDP runs in that process), each rank is down to its main thread:
    no gloo thread is left to abort the interpreter at exit."""
    for world in (2, 3):
        for r in range(world):
            got = json.loads((runs / f"w{world}" / f"threads{r}.json").read_text())["threads"]
            assert got in (1, -1), f"w{world} rank {r}: {got} threads after shutdown"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_fsdp2_sharded_checkpoint_reloads_into_one_process(runs, tmp_path):
    """Weights exact; and the 2-process step-5 checkpoint resumed by ``fit`` in 1 process continues
    the same run (the data position is global: (epoch, index) does not depend on the world size)."""
    w2 = runs / "w2"
    saved = load_file(str(w2 / "w2_resumed.safetensors"))
    loop = worker.loop_for("gpt_fsdp", 10)
    weights, state, _ = sharded.load(w2 / "ckpt10")
    assert {k: (tuple(v.shape), v.dtype) for k, v in weights.items()} == {
        k: (tuple(v.shape), v.dtype) for k, v in loop.job.model.state_dict().items()
    }
    loop.restore(resume.Plan(w2 / "ckpt10", weights, state))
    assert loop.step == 10 and all(torch.equal(saved[k], v) for k, v in loop.job.model.state_dict().items())
    shutil.copytree(w2 / "fsdp_run" / "checkpoints" / "step-00000005", tmp_path / "checkpoints" / "step-00000005")
    job, cfg = worker.make("gpt_fsdp", ["checkpoint_every=5"])
    fit(job, cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {**rows[0], "kind": "resume", "step": 5}
    assert worst_rel(job.model.state_dict(), reference("gpt_fsdp")[0]) < 1e-5


def test_incomplete_or_crafted_sharded_checkpoint_is_refused(runs, tmp_path):
    """A folder without its manifest (the commit marker) is never resumed; an index carrying a
    pickled callable, even under a re-signed manifest, is refused without running it."""
    from gradtune.runtime.errors import GradtuneError

    root = tmp_path / "checkpoints"
    half = root / "step-00000010"
    shutil.copytree(runs / "w2" / "ckpt10", half)
    (half / "manifest.json").unlink()
    assert "manifest.json missing" in sharded.verify(half)
    with pytest.raises(GradtuneError, match="no checkpoint verifies"):
        resume.latest(root)
    shutil.rmtree(half)
    shutil.copytree(runs / "w2" / "ckpt10", half)
    marker = tmp_path / "payload-ran"
    (half / "shards" / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    manifest = json.loads((half / "manifest.json").read_text())
    data = (half / "shards" / ".metadata").read_bytes()
    manifest["files"]["shards/.metadata"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (half / "manifest.json").write_text(json.dumps(manifest))
    assert sharded.verify(half) is None  # the manifest checks out: only the index is refused
    with pytest.raises(GradtuneError, match="not allowed"):
        sharded.load(half)
    assert not marker.exists()


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("world", [2, 3])
def test_uneven_data_every_sample_exactly_once(runs, world):
    """349 training rows (odd, not divisible by 2 or 3), batch 32: a short last batch, empty
    shares included; the ranks together saw each sample id exactly once in the epoch."""
    d = runs / f"w{world}"
    n = json.loads((d / f"w{world}_probe_n.json").read_text())["n"]
    lines = [(d / f"rank{r}.txt").read_text().splitlines() for r in range(world)]
    assert len({len(x) for x in lines}) == 1  # lockstep: same micro-batch count on every rank
    ids = [int(i) for x in lines for line in x for i in line.split()]
    assert n % world != 0 and sorted(ids) == list(range(n))


def test_one_process_is_a_no_op():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    idx = torch.arange(5)
    assert distributed.shard(idx) is idx
    loop = worker.loop_for("mlp_mini", 1)
    assert loop.model is loop.job.model  # not wrapped


def _cli_run(tmp_path: Path, fault: str, *settings: str, launcher: tuple[str, ...] = ()) -> tuple[int, str, float]:
    t0 = time.monotonic()
    p = torchrun(
        2,
        [
            *launcher,
            "-m",
            "gradtune",
            "train",
            "model=mlp",
            "standardize_target=true",
            "max_steps=100000",
            "progress=lines",
            f"out_dir={tmp_path}",
            "plot=false",
            "device=cpu",
            *settings,
        ],
        GRADTUNE_TEST_FAULTS=fault,
    )
    out, _ = p.communicate(timeout=240)
    return p.returncode, out, time.monotonic() - t0


def test_killed_rank_stops_the_job_and_is_named(tmp_path):
    code, out, wall = _cli_run(tmp_path, hooks.rank_fault(1, 30, "kill"), "dist_timeout=30")
    assert code != 0
    assert "rank      : 1 (local_rank: 1)" in out and "SIGKILL" in out  # torchrun's root cause
    assert wall < 60 + 30  # generous for process start-up on a loaded CI machine
    # One log, from rank 0 only.
    assert (tmp_path / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_hung_rank_times_out_naming_the_waiting_rank(tmp_path):
    code, out, wall = _cli_run(tmp_path, hooks.rank_fault(1, 30, "hang"), "dist_timeout=5")
    assert code != 0 and "gradtune: error on rank 0/2" in out and "stopped responding" in out, out[-3000:]
    # torchrun's SIGTERM reaches the hung rank, which leaves dist_timeout later (not at torchrun's 30 s SIGKILL)
    assert "SIGTERM: no step boundary reached within 5s (dist_timeout): exiting" in out, out[-3000:]
    assert wall < 60 + 30


@pytest.mark.slow
def test_torchrun_restart_after_a_failed_rank_finishes_the_same_run(tmp_path):
    """A rank raising names itself; torchrun --max-restarts restarts every rank; the restarted job
    ends with the weights of an uninterrupted run. (No checkpoint_every here: the restart begins at step 0;
    the test below covers continuing from a checkpoint.)"""
    from gradtune.config import load_config
    from gradtune.jobs.registry import build

    steps = ("max_steps=60", "resume=auto", "dtype=float64")
    code, out, _ = _cli_run(tmp_path, hooks.rank_fault(1, 30, "raise"), *steps, launcher=("--max-restarts", "1"))
    assert code == 0, out[-3000:]
    assert "gradtune: error on rank 1/2" in out and "injected fault at step.begin #31" in out
    assert out.count("done: 60 steps") == 1  # one summary: rank 0's
    # The oracle: the same 60 steps, uninterrupted, in this process (2 processes == 1, float64).
    cfg = load_config(None, ["model=mlp", "standardize_target=true", "progress=off", "device=cpu", *steps])
    job = build(cfg)
    fit(job, cfg)
    assert worst_rel(load_file(str(tmp_path / "model.safetensors")), job.model.state_dict()) < 1e-9


@pytest.mark.slow
def test_killed_rank_then_resume_auto_finishes_the_same_run(tmp_path):
    """Kill rank 1 of 2 mid-run (SIGKILL): the job stops naming it; rerunning the same command with
    resume=auto continues from rank 0's last checkpoint and ends with the uninterrupted weights."""
    from gradtune.config import load_config
    from gradtune.jobs.registry import build

    steps = ("max_steps=60", "checkpoint_every=10", "resume=auto", "dtype=float64")
    code, out, wall = _cli_run(tmp_path, hooks.rank_fault(1, 35, "kill"), *steps, "dist_timeout=30")
    assert code != 0 and "SIGKILL" in out and wall < 60 + 30
    assert (tmp_path / "checkpoints").is_dir()
    code, out, _ = _cli_run(tmp_path, "", *steps)
    assert code == 0, out[-3000:]
    assert out.count("done: 60 steps") == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("kind") == "resume" for r in rows), "the rerun must continue from a checkpoint"
    cfg = load_config(None, ["model=mlp", "standardize_target=true", "progress=off", "device=cpu", *steps])
    job = build(cfg)
    fit(job, cfg)
    assert worst_rel(load_file(str(tmp_path / "model.safetensors")), job.model.state_dict()) < 1e-9
