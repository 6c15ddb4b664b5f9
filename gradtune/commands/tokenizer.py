"""``gradtune tokenizer train DATA --vocab-size N --out tok.json``: your own byte-level BPE.

DATA is what ``data:`` takes for pretraining (an embedded corpus name, a file, a folder, a glob;
.txt, .txt.gz, .jsonl(.gz) with ``--field``, Parquet, a datasets folder), streamed through the
``tokenizers`` package's BPE trainer (data/bpe.py). The result is a Hugging Face tokenizer.json
with ``<|endoftext|>`` and the chosen chat template's markers as special tokens; use it as
``text.tokenizer=tok.json`` for pretraining, ``generate`` and ``export --gguf``. The output must
be a new file (never one that exists, never an input): written atomically.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gradtune.data import bpe, corpus
from gradtune.data import tokenizer as tokenizers
from gradtune.runtime.errors import GradtuneError

HELP = "train your own byte-level BPE tokenizer on a corpus (tokenizer train DATA --vocab-size N --out tok.json)"


def setup(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION", help="train: a byte-level BPE on DATA")
    t = sub.add_parser("train", help="train a byte-level BPE on DATA and write it as a tokenizer.json")
    t.add_argument("data", help="an embedded corpus (shakespeare), a file, folder or glob of .txt/.jsonl/Parquet")
    t.add_argument("--vocab-size", type=int, default=4096, help="tokens, special ones included (default 4096)")
    t.add_argument("--out", required=True, help="the new tokenizer.json to write")
    t.add_argument("--field", default="text", help="the text field of .jsonl / Parquet / Arrow records (default text)")
    t.add_argument(
        "--chat-template",
        default="chatml",
        choices=sorted(bpe.CHAT_TOKENS),
        help="chat markers as special tokens (default chatml)",
    )


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = Path(args.out)
    if out.suffix != ".json":
        raise GradtuneError(f"--out {args.out}: give a file name ending in .json")
    if out.exists():
        raise GradtuneError(f"--out {args.out}: exists; tokenizer train never overwrites a file, choose a new path")
    label, shards = corpus.shards_of(args.data)
    if any(s.path.resolve() == out.resolve() for s in shards):
        raise GradtuneError(f"--out {args.out}: is one of the inputs")
    text = bpe.train([shards], args.vocab_size, args.field, args.chat_template)
    bpe.save(text, out)
    tok = tokenizers.load(str(out))
    print(
        f"{out}: byte-level BPE, {tok.vocab_size:,} tokens (end of text: id {tok.eos_id}), trained on {label} "
        f"({len(shards)} shard{'s' * (len(shards) != 1)}) in {time.perf_counter() - t0:.1f} s"
    )
    return 0
