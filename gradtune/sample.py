"""``gradtune generate``: sample text from a trained run (its folder or a checkpoint inside it).

The run folder holds everything needed: config.yaml (the model's shape), tokenizer.json (the
exact tokenizer training used) and model.safetensors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from gradtune.errors import GradtuneError


def load_run(folder: Path):
    """(model, tokenizer, config) of a finished GPT run or one of its checkpoints."""
    from gradtune.config import load_config
    from gradtune.data import tokenizer as tok
    from gradtune.job_text import _gpt
    from gradtune.weights import load_weights

    run = folder if (folder / "config.yaml").is_file() else folder.parent
    for need in ("config.yaml", "tokenizer.json"):
        if not (run / need).is_file():
            raise GradtuneError(f"{folder}: not a gradtune language-model run (no {need})")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise GradtuneError(f"{folder}: no model.safetensors")
    cfg = load_config(str(run / "config.yaml"))
    if cfg.model != "gpt":
        raise GradtuneError(f"{run}: model '{cfg.model}' is not a language model (model=gpt)")
    tokenizer = tok.load(str(run / "tokenizer.json"))
    model = _gpt(tokenizer.vocab_size, cfg.gpt)
    load_weights(model, weights)
    return model.eval(), tokenizer, cfg


def setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run's out_dir (or a checkpoint folder inside it)")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    from gradtune.generate import generate

    if args.max_new_tokens < 1 or args.temperature < 0 or (args.top_k is not None and args.top_k < 1):
        raise GradtuneError("generate: need --max-new-tokens >= 1, --temperature >= 0, --top-k >= 1")
    from gradtune.job_finetune import is_run

    if is_run(Path(args.checkpoint)):  # a fine-tuned HF causal LM
        from gradtune.finetune_cli import generate_run

        return generate_run(args)
    model, tokenizer, cfg = load_run(Path(args.checkpoint))
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise GradtuneError("generate: the prompt encodes to no tokens")
    prompt = torch.tensor([ids[-cfg.gpt.block_size:]] * args.num_samples)
    out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, eos_id=tokenizer.eos_id)
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(tokenizer.decode(row))
    return 0
