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

The pass's chunk is chosen in this process, which also holds the runs loaded before: give one
run per invocation for the chunk the command chooses.

  python bench/eval.py runs/gpt-shakespeare                         # medians of 3
  python bench/eval.py RUN --repeats 1 --threads 1                  # smoke run / busy cores

On 2 cores shared with other work, 2 torch threads spend much of each op at thread barriers;
--threads 1 (also given to the commands as OMP_NUM_THREADS) keeps the comparison about the work.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

from gradtune.jobs.reload import load_run, run_data  # noqa: E402
from gradtune.loop.eval_chunk import choose, probe, room_for_run  # noqa: E402
from gradtune.loop.evaluation import evaluate  # noqa: E402
from gradtune.runtime.device import autocast  # noqa: E402

BEFORE = 64  # gradtune eval's --batch-size default until the chunk was chosen from memory
CPU = torch.device("cpu")


def command(run: str, extra: list[str], threads: int | None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of ``gradtune eval RUN *extra`` in a child process."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-S", "-c", LAUNCH, sys.executable, "-m", "gradtune", "eval", run, *extra],
        env=env,
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


def bench(run: str, repeats: int, threads: int | None) -> None:
    r = load_run(run)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="finished run folders")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads here and in the commands")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"cpu {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    for run in args.runs:
        bench(run, args.repeats, args.threads)
    print(f"load {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
