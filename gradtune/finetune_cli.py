"""``gradtune export`` / ``gradtune eval`` on a fine-tuning run, and ``generate`` for its causal LM.

    gradtune export runs/lora --adapter out/adapter     # PEFT: PeftModel.from_pretrained(base, dir)
    gradtune export runs/lora --merged out/merged       # plain transformers folder (+ head files)
    gradtune eval runs/lora --data test.csv             # accuracy / RMSE / loss on a labelled file

Each rebuilds the run with ``job_finetune.load_run`` (base model + method + saved weights).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from gradtune.errors import GradtuneError


def setup_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a fine-tuning run's out_dir")
    p.add_argument("--adapter", metavar="OUT", help="write the LoRA factors as a PEFT adapter folder")
    p.add_argument("--merged", metavar="OUT", help="write the model with updates folded in, as a HF folder")


def run_export(args: argparse.Namespace) -> int:
    from gradtune.finetune import export
    from gradtune.job_finetune import load_run

    if not args.adapter and not args.merged:
        raise GradtuneError("export: give --adapter OUT and/or --merged OUT")
    model, tokenizer, cfg, _, _ = load_run(Path(args.run))
    if args.adapter:
        export.save_adapter(model, args.adapter, str(Path(cfg.model).resolve()))
        print(f"adapter: {args.adapter} (peft.PeftModel.from_pretrained(base, '{args.adapter}'))")
    if args.merged:
        export.save_merged(model, args.merged, tokenizer)
        print(f"merged: {args.merged} (transformers.AutoModel*.from_pretrained('{args.merged}'))")
    return 0


def setup_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a fine-tuning run's out_dir")
    p.add_argument("--data", required=True, help="a labelled file in the training data's format")
    p.add_argument("--batch-size", type=int, default=64)


def run_eval(args: argparse.Namespace) -> int:
    from gradtune.job import Job
    from gradtune.job_finetune import load_data, load_run, objective_for
    from gradtune.evaluation import evaluate, task_metrics

    model, tokenizer, cfg, labels, task = load_run(Path(args.run))
    data, _ = load_data(cfg, task, args.data, tokenizer, labels)  # unseen labels: one-line error
    objective = objective_for(task)
    loss, count, sums = evaluate(model, objective, data, max(args.batch_size, 1), torch.device("cpu"),
                                 contextlib.nullcontext())
    job = Job(model, objective, data, None, task if labels is not None or task == "regression" else "lm")
    metrics = task_metrics(job, "", loss, count, sums)
    print(f"eval {args.data}: n={len(data)} " + " ".join(f"{k}={v:.6g}" for k, v in metrics.items()))
    return 0


def generate_run(args: argparse.Namespace) -> int:
    """``gradtune generate`` on a fine-tuned causal LM (plain loop, no cache: models are small
    enough here, and any HF causal LM works)."""
    from gradtune.generate import next_token
    from gradtune.job_finetune import ENCODER_TASKS, load_run

    model, tokenizer, cfg, _, task = load_run(Path(args.checkpoint))
    if task in ENCODER_TASKS:
        raise GradtuneError(f"{args.checkpoint}: a {task} run has no language-model head to generate with")
    if task == "instruction" and getattr(tokenizer, "chat_template", None):
        # Render as text, then tokenize, exactly as training did (data/instructions.py).
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(args.prompt)["input_ids"]
    if not ids:
        raise GradtuneError("generate: the prompt encodes to no tokens")
    gen = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    eos = tokenizer.eos_token_id
    for i in range(args.num_samples):
        out = torch.tensor([ids])
        with torch.no_grad():
            for _ in range(args.max_new_tokens):
                logits = model(input_ids=out[:, -cfg.text.max_length:]).logits[:, -1, :]  # (1, V)
                tok = next_token(logits, args.temperature, args.top_k, args.top_p, gen)
                out = torch.cat([out, tok], dim=1)
                if eos is not None and int(tok) == eos:
                    break
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(tokenizer.decode(out[0].tolist(), skip_special_tokens=True))
    return 0
