"""The recipe's own BPE against bytes: configs/gpt-shakespeare.yaml pretrained for the same
wall-time budget as it is (``text.tokenizer: train``: a byte-level BPE of ``text.vocab_size``
tokens learnt from the training plays) and with ``text.tokenizer=byte``, compared by validation
loss **per byte** of text.

A loss per token is not comparable across tokenizers (a BPE token carries ~3 bytes), so each run's
final (full) validation is read per byte: the BPE run's ``val_nats_per_byte`` (its loss summed
over the validation tokens over the UTF-8 bytes they stand for), the byte run's ``val_loss`` (one
token a byte). Both runs hold the same validation text (the corpus tail, two whole plays) up to
the split's rounding. The two runs go one after the other in alternating order across
repetitions; medians.

  python bench/bpe_vs_byte.py                          # 5 minutes each, 1 repetition
  python bench/bpe_vs_byte.py --budget 30s precision=fp32 eval_tokens=4096   # smoke run
  python bench/bpe_vs_byte.py text.vocab_size=2048     # another vocabulary for the BPE side
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

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(tmp: Path, name: str, tokenizer: str, budget: str, extra: list[str]) -> dict:
    out = tmp / name
    cmd = [sys.executable, "-m", "gradtune", "train", "configs/gpt-shakespeare.yaml", f"text.tokenizer={tokenizer}"]
    cmd += [f"max_time={budget}", f"out_dir={out}", "progress=off", "plot=false", "resume=never", *extra]
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    per_byte = m.get("val_nats_per_byte", m["val_loss"])  # the byte run: one token a byte
    return {"per_byte": per_byte, "per_token": m["val_loss"], "steps": summary["steps"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="5m", help="max_time of each run")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("settings", nargs="*", help="more key=value settings for both runs (e.g. precision=fp32)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gradtune-bpe-bench-"))
    got: dict[str, list[dict]] = {"byte": [], "bpe": []}
    for r in range(args.repeats):
        sides = [("byte", "byte"), ("bpe", "train")]
        for name, spec in sides if r % 2 == 0 else sides[::-1]:
            got[name].append(run(tmp, f"{name}-{r}", spec, args.budget, args.settings))
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, budget {args.budget}")
    for name, rs in got.items():
        pb, pt = (statistics.median(x[k] for x in rs) for k in ("per_byte", "per_token"))
        print(
            f"{name:5s} val loss {pb:.4f} nats/byte ({pb / math.log(2):.3f} bits/byte); per token {pt:.4f} at "
            f"{pt / pb:.2f} bytes/token; steps {statistics.median(x['steps'] for x in rs):.0f}"
        )
    b, t = (statistics.median(x["per_byte"] for x in got[k]) for k in ("byte", "bpe"))
    print(f"bpe / byte loss per byte: {t / b:.3f} (< 1: the BPE is better) | load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
