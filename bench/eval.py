"""``gradtune eval RUN``: the evaluation chunk chosen from memory (loop/eval_chunk.py) against the
fixed chunk of 64 in fp32 that ``eval`` used before, on finished runs you give.

Two measures per run, sides alternating within each repetition (the order flips every
repetition), medians:

- the pass: ``evaluate`` over the run's validation split in this process, before = 64 samples
  per forward without autocast, after = the chosen chunk under the run's own precision (a bf16
  run is evaluated as training evaluated it);
- the command: ``gradtune eval RUN --batch-size 64`` against ``gradtune eval RUN`` in child
  processes, wall seconds and each child's peak RSS (``os.wait4``), beside the run's training
  peak (summary.json ``job.memory.train_peak_bytes``). For a bf16 run both commands evaluate in
  bf16 (the command has no fp32 switch): the pass shows what precision adds.

Then what bounds the speed-up, for the chosen side: the command's start-up before its pass
(imports, loading the run, its data, choosing the chunk; timed in a fresh process, so imports
are cold as the command pays them) gives the most the command can gain with a free pass, and
the pass's share of op time in matrix products and fused attention (torch.profiler over ~8
chunks) the most removing everything else from the pass can gain at the run's precision.

The pass's chunk is chosen in this process, which also holds the runs loaded before: give one
run per invocation for the chunk the command chooses.

  python bench/eval.py runs/gpt-shakespeare                         # medians of 3
  python bench/eval.py RUN --repeats 1 --threads 1                  # smoke run / busy cores
  python bench/eval.py RUN --before-code REV                        # against the code at REV

``--before-code REV`` compares with older code itself: a git worktree of REV (in a temporary folder,
removed after) runs its own ``gradtune eval RUN`` and its own pass (64 a forward, float32), each in a
child process, against this checkout's command and pass (the chosen chunk at the run's precision),
also in children; RUN must be a run that code can read (trained by it, say).

On 2 cores shared with other work, 2 torch threads spend much of each op at thread barriers;
--threads 1 (also given to the commands as OMP_NUM_THREADS) keeps the comparison about the work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

from gradtune.jobs.reload import load_run, run_data  # noqa: E402
from gradtune.loop.eval_chunk import choose, probe, room_for_run  # noqa: E402
from gradtune.loop.evaluation import Subset, evaluate  # noqa: E402
from gradtune.runtime.device import autocast  # noqa: E402

BEFORE = 64  # gradtune eval's --batch-size default until the chunk was chosen from memory
CPU = torch.device("cpu")


HERE = Path(__file__).resolve().parents[1]  # this checkout


def command(run: str, extra: list[str], threads: int | None, root: Path = HERE) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of ``gradtune eval RUN *extra`` in a child process, with
    the gradtune of ``root`` (a checkout)."""
    env = dict(os.environ, PYTHONPATH=str(root))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-S", "-c", LAUNCH, sys.executable, "-m", "gradtune", "eval", run, *extra],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"gradtune eval {run} {' '.join(extra)} failed: {done.stderr.strip()[-300:]}")
    return time.perf_counter() - t0, int(done.stdout.split()[-1]) / 1024


# A child's ru_maxrss counts the memory of the process it was started from (Linux folds the old
# address space's high-water mark in at exec), and this one holds a model: the command is started
# from a small launcher instead, which prints its child's peak in KiB.
LAUNCH = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
    "_, s, u = os.wait4(p.pid, 0); print(u.ru_maxrss); sys.exit(1 if s else 0)"
)


# The command's work before its pass, timed in a fresh process (cold imports, as the command pays
# them): imports, loading the run, its data, choosing the chunk. Prints the four seconds.
PHASES = """
import sys, time
t = [time.perf_counter()]
import torch
import gradtune.cli
from gradtune.jobs.reload import load_run, run_data
from gradtune.loop.eval_chunk import choose, probe, room_for_run
from gradtune.runtime.device import autocast
t.append(time.perf_counter())
r = load_run(sys.argv[1], inference_only=True)  # as the command loads it
t.append(time.perf_counter())
data = run_data(r, None)
t.append(time.perf_counter())
cpu = torch.device("cpu")
found = probe(r.model, r.objective, data, cpu, autocast(r.cfg.precision, cpu))
choose(room_for_run(r.info, cpu), found, len(data), cpu)
t.append(time.perf_counter())
print(*(b - a for a, b in zip(t, t[1:])))
"""

# Ops whose time is the model's arithmetic (matrix products and attention kernels): at fp32 the
# pass cannot be faster than these take, whatever else is removed.
MATMULS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "mkldnn::_linear_pointwise",  # float32 linears on AMD CPUs (models/onednn_linear.py)
    "FusedAttention",  # the C attention kernel (models/fused_attention.py)
)


def startup(run: str, threads: int | None) -> list[float]:
    """[imports, load, data, chunk] seconds of ``gradtune eval RUN`` before its pass, in a child."""
    env = dict(os.environ, PYTHONPATH=str(HERE))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run([sys.executable, "-c", PHASES, run], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"start-up of {run} failed: {done.stderr.strip()[-300:]}")
    return [float(x) for x in done.stdout.split()[-4:]]


def matmul_share(pass_: Callable[[], object]) -> float:
    """Share of the op time of ``pass_`` (a profiled evaluation) spent in MATMULS."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        pass_()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / max(total, 1)


def bench(run: str, repeats: int, threads: int | None) -> None:
    r = load_run(run, inference_only=True)  # as the command loads it
    data = run_data(r, None)
    amp = autocast(r.cfg.precision, CPU)
    chunk = choose(room_for_run(r.info, CPU), probe(r.model, r.objective, data, CPU, amp), len(data), CPU)
    sides = {
        "before": lambda: evaluate(r.model, r.objective, data, BEFORE, CPU, contextlib.nullcontext()),
        "after": lambda: evaluate(r.model, r.objective, data, chunk, CPU, amp),
    }
    cmds = {"before": ["--batch-size", str(BEFORE)], "after": []}
    passes: dict[str, list[float]] = {"before": [], "after": []}
    walls: dict[str, list[float]] = {"before": [], "after": []}
    rss: dict[str, list[float]] = {"before": [], "after": []}
    loss = {}
    for i in range(repeats):
        for side in ("before", "after") if i % 2 == 0 else ("after", "before"):
            t0 = time.perf_counter()
            loss[side] = sides[side]()[0]
            passes[side].append(time.perf_counter() - t0)
            wall, mb = command(run, cmds[side], threads)
            walls[side].append(wall)
            rss[side].append(mb)
    phases = startup(run, threads)
    some = Subset(data, torch.arange(0, len(data), max(1, len(data) // (8 * chunk))))  # ~8 chunks, evenly spread
    share = matmul_share(lambda: evaluate(r.model, r.objective, some, chunk, CPU, amp))
    peak = (r.info.get("memory") or {}).get("train_peak_bytes")
    med = {k: statistics.median(v) for k, v in passes.items()}
    cmd = {k: statistics.median(v) for k, v in walls.items()}
    print(
        f"{run} ({len(data)} samples, precision {r.cfg.precision}, chunk {BEFORE} -> {chunk}): "
        f"pass {med['before']:.2f} s -> {med['after']:.2f} s ({med['before'] / med['after']:.2f}x), "
        f"loss {loss['before']:.6f} -> {loss['after']:.6f}; command {cmd['before']:.1f} s -> {cmd['after']:.1f} s "
        f"({cmd['before'] / cmd['after']:.2f}x), peak RSS {max(rss['before']):.0f} -> {max(rss['after']):.0f} MB "
        + (f"(training peak {peak / 2**20:.0f} MB)" if peak else "(no training peak recorded)")
    )
    before_pass = sum(phases)
    print(
        f"  after: start-up {before_pass:.1f} s of the command's {cmd['after']:.1f} s (imports {phases[0]:.1f}, "
        f"load {phases[1]:.1f}, data {phases[2]:.1f}, chunk {phases[3]:.1f}): the command is at most "
        f"{cmd['before'] / before_pass:.1f}x today's with a free pass; matmuls and attention take {share:.0%} "
        f"of the pass: at this precision the pass is at most {med['before'] / (med['after'] * share):.1f}x "
        f"today's with everything else gone, the command {cmd['before'] / (before_pass + med['after'] * share):.1f}x"
    )


# --before-code: the pass as each checkout's ``gradtune eval`` runs it, in a child process with that
# checkout's gradtune (the older code cannot be imported beside this one). "fixed": 64 samples per
# forward without autocast (the eval of before the chosen chunk); "chosen": this checkout's rule.
# Prints the chunk, the loss and the median of the passes after the first (lazy kernel loads).
PASS = """
import contextlib, inspect, statistics, sys, time, torch
from gradtune.jobs.reload import load_run, run_data
from gradtune.loop.evaluation import evaluate
own = "inference_only" in inspect.signature(load_run).parameters  # the model the checkout's command computes with
r = load_run(sys.argv[2], inference_only=True) if own else load_run(sys.argv[2])
data = run_data(r, None); cpu = torch.device("cpu")
chunk, amp = 64, contextlib.nullcontext()
if sys.argv[1] == "chosen":
    from gradtune.loop.eval_chunk import choose, probe, room_for_run
    from gradtune.runtime.device import autocast
    amp = autocast(r.cfg.precision, cpu)
    chunk = choose(room_for_run(r.info, cpu), probe(r.model, r.objective, data, cpu, amp), len(data), cpu)
times = []
for _ in range(3):
    t = time.perf_counter(); loss = evaluate(r.model, r.objective, data, chunk, cpu, amp)[0]
    times.append(time.perf_counter() - t)
print(chunk, loss, statistics.median(times[1:]))
"""


@contextlib.contextmanager
def checkout(rev: str):
    """A detached worktree of ``rev`` in a temporary folder, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="gradtune-before-")) / "code"
    made = subprocess.run(
        ["git", "-C", str(HERE), "worktree", "add", "--detach", str(folder), rev], capture_output=True, text=True
    )
    if made.returncode:
        shutil.rmtree(folder.parent, ignore_errors=True)
        raise SystemExit(
            f"--before-code {rev}: {made.stderr.strip().splitlines()[-1] if made.stderr else 'git failed'}"
        )
    try:
        yield folder
    finally:
        subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(folder)], capture_output=True)
        shutil.rmtree(folder.parent, ignore_errors=True)


def child_pass(root: Path, rule: str, run: str, threads: int | None) -> tuple[int, float, float]:
    """(chunk, loss, seconds) of one child's evaluation pass with the gradtune of ``root``."""
    env = dict(os.environ, PYTHONPATH=str(root))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run([sys.executable, "-c", PASS, rule, run], env=env, cwd=root, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the pass of {root} on {run} failed: {done.stderr.strip()[-300:]}")
    chunk, loss, seconds = done.stdout.split()[-3:]
    return int(chunk), float(loss), float(seconds)


def bench_code(run: str, rev: str, before: Path, repeats: int, threads: int | None) -> None:
    """``gradtune eval RUN`` of the code at ``before`` against this checkout's: passes and commands."""
    roots = {"before": before, "after": HERE}
    passes: dict[str, list[float]] = {"before": [], "after": []}
    walls: dict[str, list[float]] = {"before": [], "after": []}
    rss: dict[str, list[float]] = {"before": [], "after": []}
    seen = {}
    for i in range(repeats):
        for side in ("before", "after") if i % 2 == 0 else ("after", "before"):
            chunk, loss, seconds = child_pass(roots[side], "fixed" if side == "before" else "chosen", run, threads)
            seen[side] = (chunk, loss)
            passes[side].append(seconds)
            wall, mb = command(run, [], threads, roots[side])
            walls[side].append(wall)
            rss[side].append(mb)
    med = {k: statistics.median(v) for k, v in passes.items()}
    cmd = {k: statistics.median(v) for k, v in walls.items()}
    peak = (json.loads((Path(run) / "summary.json").read_text())["job"].get("memory") or {}).get("train_peak_bytes")
    print("  commands (s):", {k: [round(w, 2) for w in v] for k, v in walls.items()})
    print(
        f"{run}, the code at {rev} -> this checkout: pass {med['before']:.2f} s (chunk {seen['before'][0]}, "
        f"loss {seen['before'][1]:.6f}) -> {med['after']:.2f} s (chunk {seen['after'][0]}, loss "
        f"{seen['after'][1]:.6f}): {med['before'] / med['after']:.2f}x; command {cmd['before']:.1f} s -> "
        f"{cmd['after']:.1f} s: {cmd['before'] / cmd['after']:.2f}x; peak RSS {max(rss['before']):.0f} -> "
        f"{max(rss['after']):.0f} MB "
        + (f"(training peak {peak / 2**20:.0f} MB)" if peak else "(no training peak recorded)")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="finished run folders")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads here and in the commands")
    ap.add_argument(
        "--before-code",
        metavar="REV",
        help="compare with gradtune eval of the code at git revision REV (its own eval: 64 samples a forward, "
        "float32) instead of this code's fixed chunk; the runs must be ones that code can read",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"cpu {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    if args.before_code:
        with checkout(args.before_code) as before:
            for run in args.runs:
                bench_code(run, args.before_code, before, args.repeats, args.threads)
    else:
        for run in args.runs:
            bench(run, args.repeats, args.threads)
    print(f"load {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
