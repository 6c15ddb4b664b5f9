"""Reading a large table to the first training step, against pyarrow reading it to a numpy array.

Generates a ``--rows`` x 20-column table (19 float features and a float target, 4 decimals; CSV
and Parquet) in a temporary folder, then per format and per round runs, each in a fresh process:

    peer   pyarrow.csv.read_csv (pyarrow.parquet.read_table) + to_numpy of every column
    ours   gradtune train model=linear data=FILE max_steps=1: seconds until the first step ends
           (a callback stamps it), i.e. read, validate, split, standardise, build the model

Both clocks start after the process's imports. The sides alternate (order swapped each round);
medians over ``--rounds``. Peak RSS is what loading adds to the process: its high-water mark
(VmHWM) less its RSS just before the clock starts, after the same imports on both sides
(numpy, torch, pyarrow.csv and pyarrow.parquet; ours also gradtune's cli), so that neither side
is charged for the interpreter and its libraries (~300 MB of Python and torch alone). It is
set against the float32 array of the table (rows x 20 x 4 bytes). Prints the ratios, the CPU
capability and the load average; the generated files are deleted at the end.

    python bench/tables.py                   # 2,000,000 rows, 3 rounds (a few minutes)
    python bench/tables.py --rows 200000 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradtune.loop.callbacks import Callback  # noqa: E402

COLUMNS = 20


def _status(key: str) -> float:
    """A line of /proc/self/status in MiB (NaN where there is none)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float:
    return _status("VmRSS")


def peak_mib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork and exec,
    so a child's ru_maxrss starts at its parent's RSS (this script's parent holds the generated
    table: hundreds of MiB that neither side used)."""
    hwm = _status("VmHWM")
    return hwm if hwm == hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class FirstStep(Callback):
    """A gradtune callback: prints the monotonic clock when the first step ends."""

    def __init__(self) -> None:
        super().__init__()
        self.done = False

    def on_step_end(self, step: int, loss: float, lr: float) -> None:
        if not self.done:
            self.done = True
            print(f"FIRST_STEP {time.monotonic()}", flush=True)


def _peer(path: str) -> dict:
    import numpy as np
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    base, t0 = rss_mib(), time.monotonic()
    table = pq.read_table(path) if path.endswith(".parquet") else pacsv.read_csv(path)
    x = np.column_stack([c.to_numpy() for c in table.columns])
    seconds = time.monotonic() - t0
    assert x.shape[1] == COLUMNS
    return {"seconds": seconds, "peak": peak_mib() - base}


def _ours(path: str, out: str) -> dict:
    import pyarrow.csv  # noqa: F401  the peer's imports, so that neither side's peak counts them
    import pyarrow.parquet  # noqa: F401

    from gradtune import cli

    sys.path.insert(0, str(ROOT / "bench"))
    cb = "[{class: tables:FirstStep}]"
    base, t0 = rss_mib(), time.monotonic()
    argv = ["train", "model=linear", f"data={path}", "max_steps=1", "progress=off", "plot=false", f"callbacks={cb}"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main([*argv, f"out_dir={out}"])
    assert code == 0, buf.getvalue()
    stamp = next(float(line.split()[1]) for line in buf.getvalue().splitlines() if line.startswith("FIRST_STEP"))
    return {"seconds": stamp - t0, "peak": peak_mib() - base}


def _run(side: str, path: Path, tmp: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "GRADTUNE_CACHE": str(tmp / "cache")}
    cmd = [sys.executable, __file__, "--side", side, str(path), str(tmp / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{side} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _generate(folder: Path, rows: int) -> tuple[Path, Path]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    cols = {}
    for j in range(COLUMNS - 1):
        cols[f"x{j}"] = np.round(rng.normal(size=rows), 4)
    cols["y"] = np.round(sum(cols[f"x{j}"] * (j % 5 - 2) for j in range(COLUMNS - 1)) + rng.normal(size=rows), 4)
    table = pa.table(cols)
    folder.mkdir(exist_ok=True)
    csv_path, parquet_path = folder / "table.csv", folder / "table.parquet"
    pacsv.write_csv(table, csv_path)
    pq.write_table(table, parquet_path)
    return csv_path, parquet_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:  # a measuring child process
        print(json.dumps(_peer(a.args[0]) if a.side == "peer" else _ours(*a.args)))
        return
    import torch

    print(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}, cores: {os.cpu_count()}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="gradtune-bench-tables-") as tmp:
        folder = Path(tmp)
        files = _generate(folder, a.rows)
        array_mib = a.rows * COLUMNS * 4 / 2**20
        tiny = _generate(folder / "tiny", 1000)[0]
        fixed = statistics.median(_run("ours", tiny, folder)["seconds"] for _ in range(a.rounds))
        print(f"gradtune's fixed cost (a 1,000-row table to its first step): {fixed:.2f} s")
        for path in files:
            size = path.stat().st_size / 2**20
            got: dict[str, list[dict]] = {"peer": [], "ours": []}
            for r in range(a.rounds):
                for side in ("peer", "ours") if r % 2 == 0 else ("ours", "peer"):
                    got[side].append(_run(side, path, folder))
            med = {s: {k: statistics.median(m[k] for m in got[s]) for k in ("seconds", "peak")} for s in got}
            shape = f"{a.rows:,} rows x {COLUMNS} columns"
            print(f"\n{path.suffix[1:]}: {shape}, {size:.0f} MiB; float32 array {array_mib:.0f} MiB")
            print(
                f"  pyarrow read + to_numpy  {med['peer']['seconds']:7.2f} s   peak RSS +{med['peer']['peak']:6.0f} MiB"
            )
            print(
                f"  gradtune to first step   {med['ours']['seconds']:7.2f} s   peak RSS +{med['ours']['peak']:6.0f} MiB"
            )
            print(
                f"  time ratio (ours / pyarrow): {med['ours']['seconds'] / med['peer']['seconds']:.2f}x (target <= 2)"
            )
            print(f"  peak RSS over the process's own / float32 array: {med['ours']['peak'] / array_mib:.2f}x", end="")
            print(" (target <= 2)", end="")
            print(f"; pyarrow's own: {med['peer']['peak'] / array_mib:.2f}x")
        print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("generated files deleted")


if __name__ == "__main__":
    main()
