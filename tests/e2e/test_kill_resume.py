"""Kill -9 at random moments, resume, and get bitwise the uninterrupted run (the oracle).

One chain of real processes per batch mode (full, 1, k; with gradient accumulation), each
running the ``gradtune train`` command. Each process is killed at a point drawn at random: inside an
accumulation window, after an optimizer step, during each phase of a checkpoint write
(weights written / all files written / before the rename / after the rename), or from outside
once the probe shows a random number of further steps (an asynchronous kill that lands wherever
the process happens to be); the next process resumes. The chain's final weights, its evaluation losses
and the sample ids of every step (probe) must equal an uninterrupted run's. The minibatch
chain also gets SIGTERM (exit 75, checkpoint written) and SIGTERM twice (the second one during
the preemption checkpoint: the previous checkpoint survives).

Why a fork server: importing torch costs seconds per process on a loaded 2-core machine, and
this test needs ~30 processes. A multiprocessing fork server imports torch and gradtune once,
then forks a fresh process per trial that runs ``gradtune.cli.main``; each is a real process,
killed by a real SIGKILL. The two preemption runs use ``python -m gradtune`` itself, so the exit
code of the actual command is checked too.
"""

import faulthandler
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gradtune.config import load_config
from gradtune.state import checkpoint
from gradtune.state.preempt import EXIT_PREEMPTED
from gradtune.train import train
from tests import hooks

ROOT = Path(__file__).resolve().parents[2]
MODES = {  # name -> (settings, micro-batches per step)
    "full": (["batch_size=full", "micro_batch_size=12"], 3),
    # Early stopping (best/ kept, never stopping: patience beyond the budget) and the plateau
    # schedule carry state across kills: the lr cuts and the best must be the uninterrupted run's.
    "sgd": (
        [
            "batch_size=1",
            "momentum=0.5",
            "lr=0.02",
            "schedule=plateau",
            "plateau_patience=1",
            "gamma=0.7",
            "early_stopping.enabled=true",
            "early_stopping.patience=1000",
        ],
        1,
    ),
    "minibatch": (["batch_size=8", "micro_batch_size=3", "optimizer=adamw"], 3),
    # a batch ramp 1 -> 8 over half the run: 1 to 3 micro-batches a step, the sizes from the step
    "ramp": (["batch_size=8", "micro_batch_size=3", "batch_ramp_steps=60", "batch_ramp_start=1"], 3),
}
KILLS_PER_MODE = 8
STEPS = 120
POINTS = ["micro", "step", "ckpt.model", "ckpt.files", "ckpt.rename", "ckpt.after", "external"]


def settings(data: Path, out: Path, mode: str) -> list[str]:
    return [
        f"data={data}",
        "model=mlp",
        "hidden=[5]",
        "lr=0.05",
        f"max_steps={STEPS}",
        "epochs=1000",
        "eval_every=5",
        "checkpoint_every=4",
        "keep_checkpoints=2",
        "progress=off",
        "plot=false",
        f"out_dir={out}",
        *MODES[mode][0],
    ]


def make_data(tmp: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(40, generator=g)
    path = tmp / "d.csv"
    path.write_text(
        "a,b,c,y\n" + "".join(",".join(f"{v:.6f}" for v in [*r, t]) + "\n" for r, t in zip(x.tolist(), y.tolist()))
    )
    return path


def spawn(args: list[str], env_extra: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.Popen(
        [sys.executable, "-m", "gradtune", "train", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _child(args: list[str], env: dict[str, str], err_path: str) -> None:
    """Body of a forked trial process: the ``gradtune train`` command with its own faults."""
    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    faulthandler.enable()  # a crash of this forked child leaves its stack in the trial's stderr
    from gradtune.cli import main
    from gradtune.runtime import testhooks

    testhooks.configure(env.get(hooks.FAULTS, ""))
    code = main(["train", *args])
    sys.stdout.flush()
    sys.stderr.flush()
    Path(err_path + ".code").write_text(str(code))  # the exit code, whatever the fork server reports
    os._exit(code)


class Forked:
    """A Popen look-alike for a fork-server process."""

    _ctx = None

    def __init__(self, args: list[str], env: dict[str, str], err_path: Path) -> None:
        if Forked._ctx is None:
            Forked._ctx = multiprocessing.get_context("forkserver")
            Forked._ctx.set_forkserver_preload(
                ["torch", "safetensors.torch", "gradtune.train", "gradtune.cli", __name__]
            )
        self.err_path = err_path
        self.code_path = Path(f"{err_path}.code")
        self.code_path.unlink(missing_ok=True)
        self.proc = Forked._ctx.Process(target=_child, args=(args, env, str(err_path)))
        self.proc.start()

    def poll(self):
        return self.proc.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def communicate(self) -> tuple[str, str]:
        self.proc.join()
        # The fork server reports the status through a pipe; when that read fails multiprocessing
        # says 255 ("perhaps the forkserver process itself got killed"; seen once in ~30 kills).
        # The child writes its own code before it exits: no code file means it never returned
        # from main, i.e. it was killed (by us, or by a crash: a kill as far as resuming goes).
        if self.code_path.exists():
            self.returncode = int(self.code_path.read_text())
        else:
            code = self.proc.exitcode
            self.returncode = code if code is not None and code < 0 else -signal.SIGKILL
        return "", self.err_path.read_text()


def fault_plan(rng: random.Random, micro: int) -> tuple[str, str]:
    """(point, GRADTUNE_TEST_FAULTS) with counts that guarantee progress (>= 1 checkpoint written)."""
    point = rng.choice(POINTS)
    if point == "micro":
        return point, f"micro@{micro * rng.randint(5, 11) + rng.randint(1, micro)}"
    if point == "step":
        return point, f"step@{rng.randint(5, 12)}"
    if point == "external":
        return point, str(rng.randint(5, 15))
    return point, f"{point}@{rng.choice([2, 3])}"


def all_checkpoints_verify(out: Path) -> bool:
    return all(checkpoint.verify(p) is None for _, p in checkpoint.listing(out / "checkpoints"))


def run_chain(mode: str, data: Path, out: Path, probe: Path, seed: int, log: list) -> None:
    rng = random.Random(seed)
    args, env = settings(data, out, mode), {hooks.PROBE: str(probe)}
    micro = MODES[mode][1]
    if mode == "minibatch":  # preemption: SIGTERM twice (dies in the write), then once (exit 75)
        p = spawn(args, {**env, hooks.FAULTS: "step@6=TERM,ckpt.model@2=TERM"})
        p.communicate()
        log.append(
            ("double-term", p.returncode, checkpoint.newest_step(out / "checkpoints"), all_checkpoints_verify(out))
        )
        p = spawn(args, {**env, hooks.FAULTS: "step@7=TERM"})
        _, err = p.communicate()
        # the process killed by the second SIGTERM left its out_dir lock: taken over, said in a line
        took, err = err.partition("no longer running\n")[::2] if "taking over the lock" in err else ("", err)
        assert "taking over the lock" in took, err
        log.append(("term", p.returncode, err.strip(), checkpoint.newest_step(out / "checkpoints")))
    kills = 0
    env[hooks.FAULTS] = ""
    err = out.parent / f"{mode}.stderr"
    while kills < KILLS_PER_MODE:
        point, plan = fault_plan(rng, micro)
        p = Forked(args, {**env, hooks.FAULTS: plan if point != "external" else ""}, err)
        if point == "external":
            kill_external(p, probe, int(plan))
        _, text = p.communicate()
        log.append((point, plan, p.returncode, all_checkpoints_verify(out), text[-1500:]))
        if p.returncode is None or p.returncode >= 0:
            break  # finished early (0) or failed: the test reports it
        kills += 1
    p = Forked(args, env, err)
    _, text = p.communicate()
    log.append(("final", p.returncode, text[-500:]))


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_external(p: Forked, probe: Path, more: int) -> None:
    """SIGKILL from outside once ``more`` steps have been probed: wherever the process is."""
    target = lines(hooks.steps_file(probe)) + more
    while p.poll() is None and lines(hooks.steps_file(probe)) < target:
        time.sleep(0.002)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)


def eval_rows(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r.get("val_loss")) for r in rows if r["kind"] == "eval"]


probe_steps = hooks.probe_steps


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_bitwise(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the fork server must import this module
    data = make_data(tmp_path)
    for mode in MODES:  # the oracle: uninterrupted, in this process
        monkeypatch.setenv(hooks.PROBE, str(tmp_path / f"ref-{mode}.probe"))
        # Without checkpoints: writing them must not change a bit of the run (and it is faster).
        train(load_config(None, [*settings(data, tmp_path / f"ref-{mode}", mode), "checkpoint_every=0"]))
    monkeypatch.delenv(hooks.PROBE)
    logs = {mode: [] for mode in MODES}
    t0 = time.time()
    threads = [
        threading.Thread(
            target=run_chain, args=(mode, data, tmp_path / mode, tmp_path / f"{mode}.probe", i, logs[mode])
        )
        for i, mode in enumerate(MODES)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total_kills = 0
    for mode, log in logs.items():
        assert log[-1][0] == "final" and log[-1][1] == 0, log
        trials = [e for e in log if e[0] in POINTS]
        # A trial ends by our SIGKILL or finishes (0). Death by another signal (a crash of the forked
        # child: faulthandler writes its stack to the trial's stderr) is a kill as far as resuming
        # goes, so the chain goes on and the final weights still decide; an exit code >= 1 fails.
        bad = [e for e in trials if e[2] is None or e[2] > 0]
        assert not bad, f"{mode}: a trial failed (point, plan, exit, verified, stderr):\n" + "\n".join(map(str, bad))
        assert all(e[3] for e in trials), f"a checkpoint folder under its final name did not verify: {trials}"
        kills = sum(e[2] == -signal.SIGKILL for e in trials)
        total_kills += kills
        ref, out = tmp_path / f"ref-{mode}", tmp_path / mode
        got, want = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
        assert all(torch.equal(got[k], want[k]) for k in want), f"{mode}: final weights differ"
        assert eval_rows(out) == eval_rows(ref), f"{mode}: loss trajectory differs"
        steps = probe_steps(tmp_path / f"{mode}.probe")
        assert steps == probe_steps(tmp_path / f"ref-{mode}.probe"), f"{mode}: a step saw other samples"
        assert sorted(steps) == list(range(1, STEPS + 1))
    assert total_kills >= 20
    double, term = logs["minibatch"][0], logs["minibatch"][1]
    assert double[1] == -signal.SIGTERM and double[2] == 4 and double[3]  # step 6's write abandoned
    assert term[1] == EXIT_PREEMPTED and term[3] == 11
    assert term[2].startswith("gradtune: preempted: preempted by SIGTERM at step 11; checkpoint ")
    print(f"\nkill trials: {total_kills} SIGKILLs, all resumed bitwise, in {time.time() - t0:.0f}s")
