"""``gradtune export RUN``: a fine-tuning run as a PEFT adapter and/or a merged HF folder.

    gradtune export runs/lora --adapter out/adapter     # PEFT: PeftModel.from_pretrained(base, dir)
    gradtune export runs/lora --merged out/merged       # plain transformers folder (+ head files)

Each destination must be new or empty and overlap neither the run nor its base model: both are
checked before either is written (an export over the run's model.safetensors or the pretrained
folder it came from would destroy the input).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gradtune.finetune import export
from gradtune.jobs.reload import load_run
from gradtune.runtime import outdir
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
    dests = [d for d in (args.adapter, args.merged) if d]
    if len(dests) == 2 and Path(dests[0]).resolve() == Path(dests[1]).resolve():
        raise GradtuneError(f"export: --adapter and --merged are the same folder {dests[0]}; give two")
    inputs = [r.folder, args.run, r.cfg.model]  # the run (or its checkpoint folder) and its base
    for dest in dests:
        outdir.check_dest(dest, inputs)
    if args.adapter:
        export.save_adapter(r.model, args.adapter, str(Path(r.cfg.model).resolve()))
        print(f"adapter: {args.adapter} (peft.PeftModel.from_pretrained(base, '{args.adapter}'))")
    if args.merged:
        export.save_merged(r.model, args.merged, r.tokenizer)
        print(f"merged: {args.merged} (transformers.AutoModel*.from_pretrained('{args.merged}'))")
    return 0
