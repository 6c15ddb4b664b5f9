"""Your own BPE against bytes: the README recipe (configs/gpt-shakespeare.yaml) pretrained for the
same wall-time budget with ``text.tokenizer=byte`` and with a 4096-token byte-level BPE trained
by ``gradtune tokenizer train shakespeare``, compared by validation loss **per byte** of text.

A loss per token is not comparable across tokenizers (a BPE token carries ~3 bytes), so each run's
final (full) validation loss, in nats per token, is converted: nats/byte = val_loss x (validation
tokens / validation bytes), the bytes counted by decoding that run's own validation tokens. Both
runs hold the same validation text (the corpus tail, two whole plays) up to the split's rounding.
The two runs go one after the other in alternating order across repetitions; medians.

  python bench/bpe_vs_byte.py                          # 5 minutes each, 1 repetition
  python bench/bpe_vs_byte.py --budget 30s precision=fp32 eval_tokens=4096   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gradtune.data import tokenizer as tokenizers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(tmp: Path, name: str, tokenizer: str, budget: str, extra: list[str]) -> dict:
    out = tmp / name
    cmd = [sys.executable, "-m", "gradtune", "train", "configs/gpt-shakespeare.yaml", f"text.tokenizer={tokenizer}"]
    cmd += [f"max_time={budget}", f"out_dir={out}", "progress=off", "plot=false", "resume=never", *extra]
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    job = json.loads((out / "summary.json").read_text())["job"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "val_loss" in r][-1]
    meta = json.loads((Path(job["token_cache"]).parent / "meta.json").read_text())
    tokens = np.memmap(job["token_cache"], dtype=np.dtype(meta["dtype"]), mode="r")
    val = tokens[job["n_train_tokens"] :]
    tok = tokenizers.load(str(out / "tokenizer.json"))
    n_bytes = len(tok.decode([int(i) for i in val]).encode("utf-8"))
    per_byte = final["val_loss"] * len(val) / n_bytes
    return {
        "per_byte": per_byte,
        "per_token": final["val_loss"],
        "steps": final["step"],
        "bytes_per_token": n_bytes / len(val),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="5m", help="max_time of each run")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("settings", nargs="*", help="more key=value settings for both runs (e.g. precision=fp32)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gradtune-bpe-bench-"))
    tok = tmp / "tok.json"
    train = [sys.executable, "-m", "gradtune", "tokenizer", "train", "shakespeare", "--vocab-size", "4096"]
    subprocess.run([*train, "--out", str(tok)], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    got: dict[str, list[dict]] = {"byte": [], "bpe4096": []}
    for r in range(args.repeats):
        sides = [("byte", "byte"), ("bpe4096", str(tok))]
        for name, spec in sides if r % 2 == 0 else sides[::-1]:
            got[name].append(run(tmp, f"{name}-{r}", spec, args.budget, args.settings))
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, budget {args.budget}")
    for name, rs in got.items():
        pb = statistics.median(x["per_byte"] for x in rs)
        print(
            f"{name:8s} val loss {pb:.4f} nats/byte ({pb / math.log(2):.3f} bits/byte); per token "
            f"{statistics.median(x['per_token'] for x in rs):.4f} at "
            f"{statistics.median(x['bytes_per_token'] for x in rs):.2f} bytes/token; "
            f"steps {statistics.median(x['steps'] for x in rs):.0f}"
        )
    b, t = (statistics.median(x["per_byte"] for x in got[k]) for k in ("byte", "bpe4096"))
    print(f"bpe4096 / byte loss per byte: {t / b:.3f} (< 1: the BPE is better) | load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
