"""``gradtune export RUN``: a fine-tuning run as a PEFT adapter and/or a merged HF folder.

    gradtune export runs/lora --adapter out/adapter     # PEFT: PeftModel.from_pretrained(base, dir)
    gradtune export runs/lora --merged out/merged       # plain transformers folder (+ head files)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gradtune.finetune import export
from gradtune.jobs.reload import load_run
from gradtune.runtime.errors import GradtuneError

HELP = "write a fine-tuning run as a PEFT adapter and/or a merged HF folder"


def setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a fine-tuning run's out_dir")
    p.add_argument("--adapter", metavar="OUT", help="write the LoRA factors as a PEFT adapter folder")
    p.add_argument("--merged", metavar="OUT", help="write the model with updates folded in, as a HF folder")


def run(args: argparse.Namespace) -> int:
    if not args.adapter and not args.merged:
        raise GradtuneError("export: give --adapter OUT and/or --merged OUT")
    r = load_run(args.run)
    if r.kind != "pretrained":
        raise GradtuneError(f"{args.run}: export writes fine-tuned pretrained models; this run trained "
                            f"model={r.cfg.model} (its weights are {r.folder / 'model.safetensors'})")
    if args.adapter:
        export.save_adapter(r.model, args.adapter, str(Path(r.cfg.model).resolve()))
        print(f"adapter: {args.adapter} (peft.PeftModel.from_pretrained(base, '{args.adapter}'))")
    if args.merged:
        export.save_merged(r.model, args.merged, r.tokenizer)
        print(f"merged: {args.merged} (transformers.AutoModel*.from_pretrained('{args.merged}'))")
    return 0
