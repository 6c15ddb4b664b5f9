"""Tokenising a corpus larger than memory: peak RSS and throughput of gradtune's streaming,
parallel token-cache build (data/corpus.py) against the ``tokenizers`` package's own
``encode_batch`` over the same text on the same cores.

For each size (GiB of text) a folder of shards is generated from the embedded Shakespeare
(alternating .txt.gz and .jsonl, ~64 MiB of text each) and deleted afterwards. Per repetition,
in alternating order:
  gradtune  a fresh process tokenising the folder into an empty cache (text.tokenize: reading,
            gunzip, JSON, encoding, writing the token file), timed end to end; its peak RSS is
            the largest of the process and its workers (RUSAGE_CHILDREN of a fresh parent)
  peer      a fresh process that reads the same documents and calls ``Tokenizer.encode_batch``
            on ~4 MiB batches (Rust threads on every core); only the encode_batch calls are
            timed, so the peer pays nothing for reading: the ratio is conservative for gradtune
The tokenizer is a 4096-token byte-level BPE trained on Shakespeare (``gradtune tokenizer
train``), or --tokenizer. Prints medians, the ratio, CPU capability and load average.

  python bench/corpus.py                        # 0.5, 2 and 4 GiB (~15 GiB disk; long on 2 cores)
  python bench/corpus.py --sizes 0.05 --repeats 1   # smoke run
  python bench/corpus.py --sizes 2,4 --repeats 1 --ours-only   # peak RSS only (load-independent)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

from gradtune import datasets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARD = 64 << 20  # bytes of text per shard

OURS = """
import sys, time
from gradtune.data import text
t0 = time.perf_counter()
tf = text.tokenize(sys.argv[1], sys.argv[2], cache=sys.argv[3], workers=int(sys.argv[4]))
print(time.perf_counter() - t0, tf.n_tokens)
"""

PEER = """
import gzip, json, sys, time
from pathlib import Path
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[2])
spent = n = 0

def docs(p):
    if p.name.endswith(".txt.gz"):
        yield gzip.open(p, "rt", encoding="utf-8").read()
    else:
        for line in open(p, encoding="utf-8"):
            yield json.loads(line)["text"]

batch, size = [], 0
for p in sorted(Path(sys.argv[1]).iterdir()):
    for d in docs(p):
        batch.append(d)
        size += len(d)
        if size >= 1 << 22:
            t0 = time.perf_counter()
            n += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
            spent += time.perf_counter() - t0
            batch, size = [], 0
if batch:
    t0 = time.perf_counter()
    n += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
    spent += time.perf_counter() - t0
print(spent, n)
"""

PEAK = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
)


def make_corpus(folder: Path, gib: float) -> int:
    """Shards of ~SHARD bytes of Shakespeare until ``gib`` GiB; returns the text bytes."""
    text = datasets.text("shakespeare")
    piece = text * max(1, int(min(SHARD, gib * (1 << 30))) // len(text.encode()))
    folder.mkdir(parents=True)
    total, i = 0, 0
    while total < gib * (1 << 30):
        if i % 2 == 0:
            with gzip.open(folder / f"s{i:04d}.txt.gz", "wt", encoding="utf-8", compresslevel=1) as f:
                f.write(piece)
        else:
            with open(folder / f"s{i:04d}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": piece[j : j + 20_000]}) + "\n" for j in range(0, len(piece), 20_000))
        total += len(piece.encode())
        i += 1
    return total


def measure(script: str, *args: str) -> tuple[float, int, float]:
    """(seconds, tokens, peak RSS GiB) of ``python -c script args`` in a fresh parent."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", PEAK, sys.executable, "-c", script, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    lines = out.stdout.split()
    return float(lines[0]), int(lines[1]), int(lines[-1]) / (1 << 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5,2,4", help="GiB of text, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="repetitions per size (medians)")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: a 4096 BPE of Shakespeare)")
    ap.add_argument("--workers", type=int, default=0, help="text.workers (0: one per core)")
    ap.add_argument(
        "--ours-only",
        action="store_true",
        help="skip the peer: gradtune's peak RSS at large sizes (load-independent) without the ratio",
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gradtune-corpus-bench-"))
    try:
        tok = args.tokenizer
        if tok is None:
            tok = str(tmp / "tok.json")
            cmd = ["tokenizer", "train", "shakespeare", "--vocab-size", "4096", "--out", tok]
            subprocess.run([sys.executable, "-m", "gradtune", *cmd], check=True, cwd=ROOT)
        print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, tokenizer {tok}")
        for gib in (float(s) for s in args.sizes.split(",")):
            folder = tmp / f"corpus-{gib}"
            size = make_corpus(folder, gib)
            ours, peer, rss = [], [], []
            for r in range(args.repeats):
                order = ("ours", "peer") if r % 2 == 0 else ("peer", "ours")
                for side in ("ours",) if args.ours_only else order:
                    if side == "ours":
                        cache = tmp / "cache"
                        shutil.rmtree(cache, ignore_errors=True)
                        s, n_ours, peak = measure(OURS, str(folder), tok, str(cache), str(args.workers))
                        ours.append(s)
                        rss.append(peak)
                    else:
                        s, n_peer, _ = measure(PEER, str(folder), tok)
                        peer.append(s)
            mo = statistics.median(ours)
            if args.ours_only:
                print(
                    f"{size / (1 << 30):.2f} GiB: gradtune {mo:7.1f} s ({size / mo / 1e6:6.1f} MB/s, peak RSS "
                    f"{max(rss):.2f} GiB, {n_ours:,} tokens) | peer not run | load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
                shutil.rmtree(folder)
                continue
            mp = statistics.median(peer)
            print(
                f"{size / (1 << 30):.2f} GiB: gradtune {mo:7.1f} s ({size / mo / 1e6:6.1f} MB/s, peak RSS "
                f"{max(rss):.2f} GiB, {n_ours:,} tokens incl. one eos per document) | encode_batch {mp:7.1f} s "
                f"({size / mp / 1e6:6.1f} MB/s, {n_peer:,} tokens) | ratio {mo / mp:.2f}x | "
                f"load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
            shutil.rmtree(folder)
            shutil.rmtree(tmp / "cache", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
