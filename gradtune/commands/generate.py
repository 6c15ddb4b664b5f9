"""``gradtune generate RUN``: sample text from a finished language-model run (a GPT trained here
or a fine-tuned causal LM), or from a checkpoint folder inside it."""

from __future__ import annotations

import argparse
import math
import sys

import torch

from gradtune.jobs.reload import Run, load_run
from gradtune.models.generate import context_length, generate
from gradtune.runtime.errors import GradtuneError

HELP = "sample text from a trained language model (prints the new text; --echo adds the prompt)"


def setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run's out_dir (or a checkpoint folder inside it)")
    p.add_argument(
        "--prompt", default="\n", help="text to continue (instruction runs: the user's message; default: a newline)"
    )
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample after the prompt (fewer at EOS)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0: greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None, help="sample within this probability mass (default: all)")
    p.add_argument("--seed", type=int, default=None, help="random seed: the same seed, the same text (default: fresh)")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples of the same prompt, one batch")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "auto"),
        default="fp32",
        help="fp32: the weights as trained; bf16: cast to bfloat16 for decoding (faster on CPUs with "
        "AVX-512 BF16/AMX and on GPUs; the text can differ from fp32's); auto: the run's training "
        "precision (bf16 where it trained in bf16, set or chosen by precision: auto's probe)",
    )
    p.add_argument(
        "--echo",
        action="store_true",
        help="print the prompt before the new text (instruction runs: the prompt as the chat template renders it)",
    )


def encode_prompt(r: Run, prompt: str) -> list[int]:
    """The prompt's ids exactly as training encoded text: the chat template for instruction
    runs (rendered as text, then tokenised, as data/instructions.py does)."""
    if r.kind == "gpt":
        return r.tokenizer.encode(prompt)
    tok = r.tokenizer
    if r.data_task == "instruction" and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(prompt)["input_ids"]


# One batch holds every sample (rows x (prompt + new tokens) ids, plus the KV cache): bounds that
# no real use reaches, so a typo'd huge number is an error instead of a MemoryError or a day's run.
MAX_SAMPLES = 4096
MAX_NEW_TOKENS = 1_000_000


def check_args(args: argparse.Namespace) -> None:
    """Each bad option is a one-line error naming it (argparse checks only the types)."""
    if args.max_new_tokens < 1:
        raise GradtuneError(f"generate: --max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 1 <= args.num_samples <= MAX_SAMPLES:
        raise GradtuneError(f"generate: --num-samples must be in [1, {MAX_SAMPLES}], got {args.num_samples}")
    if args.max_new_tokens > MAX_NEW_TOKENS:
        raise GradtuneError(f"generate: --max-new-tokens must be <= {MAX_NEW_TOKENS:,}, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:  # float('nan') passes type=float
        raise GradtuneError(f"generate: --temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise GradtuneError(f"generate: --top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:  # nan fails both comparisons
        raise GradtuneError(f"generate: --top-p must be in (0, 1], got {args.top_p}")


def decoding_precision(r: Run, asked: str) -> str:
    """fp32 | bf16. auto: bf16 where the run trained in bf16 -- set, or chosen by precision: auto's
    probe (summary.json keeps its answer): that probe found bf16 faster for this model on this
    machine's kind; fp32 elsewhere (fp16 runs too: fp16 decoding on a CPU is slow)."""
    if asked != "auto":
        return asked
    trained = r.cfg.precision
    if trained == "auto":
        trained = (r.info.get("precision") or {}).get("precision", "fp32")
    choice = "bf16" if trained == "bf16" else "fp32"
    print(f"precision auto: {choice} (the run trained in {trained})", file=sys.stderr)
    return choice


def run(args: argparse.Namespace) -> int:
    check_args(args)
    r = load_run(args.checkpoint)
    if r.task not in ("lm", "preference"):
        raise GradtuneError(f"{args.checkpoint}: a {r.data_task} run has no language-model head to generate with")
    if decoding_precision(r, getattr(args, "precision", "fp32")) == "bf16":
        r.model.to(torch.bfloat16)  # the loaded copy only; the run's files are not touched
    ids = encode_prompt(r, args.prompt)
    if not ids:
        raise GradtuneError("generate: the prompt encodes to no tokens")
    eos = r.tokenizer.eos_id if r.kind == "gpt" else r.tokenizer.eos_token_id
    # Keep the prompt's end when it outgrows the context (GPT: block_size; HF: the model
    # config's max_position_embeddings); generate slides the same window once text outgrows it.
    limit = context_length(r.model)
    if limit is not None:
        ids = ids[-limit:]
    prompt = torch.tensor([ids] * args.num_samples)  # (num_samples, T): one batch, one cache
    out = generate(
        r.model,
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_id=eos,
    )
    start = 0 if args.echo else prompt.shape[1]  # (B, T + n): only the n new tokens unless --echo
    for i, row in enumerate(out[:, start:].tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(r.tokenizer.decode(row) if r.kind == "gpt" else r.tokenizer.decode(row, skip_special_tokens=True))
    return 0
