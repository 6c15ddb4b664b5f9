"""Training throughput of our GPT against the peers a user would pick, same shape, same run:
Hugging Face's GPT2LMHeadModel (or LlamaForCausalLM) and LitGPT's GPT.

--family gpt2 (the default): the GPT-2 block below. --family llama: the 10-minute recipe's model
(configs/gpt-shakespeare.yaml: 4 layers, width 192, 4 query heads sharing 2 key/value heads,
RoPE, RMSNorm, SwiGLU MLP of width 512, no biases, tied embeddings, context 256) against HF's
LlamaForCausalLM and LitGPT's GPT in the same configuration (LitGPT: LLaMAMLP, RMSNorm,
n_query_groups=2, full rotary).

Every side: 4 layers, 4 heads, width 256, context 256, batch 8, byte vocabulary (256), dropout 0,
GPT-2 block (pre-LayerNorm with bias, GELU-tanh MLP 4x, fused qkv, SDPA causal attention, tied
embeddings), the same optimizer for all (torch.optim.AdamW(lr=3e-4, fused=True) by default, so
only the model differs), same seed, the same random byte batches, the same
loss code (F.cross_entropy on float32 logits, computed outside the model). LitGPT has no learned
position table: it runs with rotary_percentage=0 (no positions at all), the cheapest it can be;
ours and HF add a (T, C) wpe row per token. Sides alternate within each repetition (the order
rotates every repetition) and we report medians of per-repetition ratios, so drift in machine load
hits all alike. MFU = tokens/s * training FLOPs per token / the matmul peak measured here.

  python bench/gpt.py            # full: fp32 and bf16 autocast, ~2-4 min of CPU on 2 cores
  python bench/gpt.py --quick    # smoke run, seconds
  python bench/gpt.py --compile  # adds torch.compile(ours) as a side (compile time excluded)
  python bench/gpt.py --threads 1 --clock cpu   # on a shared machine: ratios from CPU seconds
  python bench/gpt.py --family llama             # the recipe's Llama-family model and its peers
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gradtune.models.gpt import GPT, GPTConfig  # noqa: E402

B, T, V = 8, 256, 256


def matmul_size(dtype: torch.dtype) -> int:
    """Square size for the peak probe: doubles from 256 up to 2048 while one product takes
    < 50 ms, so an emulated dtype (bf16 without AVX512-BF16 / AMX) still finishes in time."""
    n = 256
    while n < 2048:
        a = torch.randn(n, n, dtype=dtype)
        a @ a  # first call: allocation and kernel selection
        t = time.perf_counter()
        a @ a
        if time.perf_counter() - t > 0.05:
            break
        n *= 2
    return n


def matmul_rate(dtype: torch.dtype, n: int, seconds: float) -> float:
    """Median FLOP/s of an n x n matmul loop lasting ``seconds`` (at least 3 products)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    rates, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(rates) < 3:
        t = time.perf_counter()
        a @ b
        rates.append(2 * n**3 / (time.perf_counter() - t))
    return statistics.median(rates)


def cpu_flags() -> str:
    """The /proc/cpuinfo flags that decide bf16 speed: AVX512-BF16 / AMX run bf16 matmuls natively."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return f"{model}; " + " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in wanted)


def bf16_emulated(sizes: dict[str, int]) -> bool:
    """No bf16 matmul units: decided by the CPU flags where /proc/cpuinfo has them (a timing probe
    misreads a loaded machine), else by the probe (bf16 reached a smaller size than fp32)."""
    flags = cpu_flags()
    if "avx2=yes" in flags:  # an x86 "flags" line was read (ARM lists "Features" instead)
        return "avx512_bf16=yes" not in flags and "amx_bf16=yes" not in flags
    return sizes["bf16"] < sizes["fp32"]


def load() -> str:
    return "load average %.2f %.2f %.2f (1/5/15 min)" % os.getloadavg()


def litgpt_gpt2() -> torch.nn.Module:
    """LitGPT's GPT in our GPT-2 shape (see the module docstring for the one difference: positions)."""
    from litgpt.config import Config
    from litgpt.model import GPT as LitGPT

    cfg = Config(
        name="gpt2-bench",
        block_size=T,
        vocab_size=V,
        padded_vocab_size=V,
        n_layer=4,
        n_head=4,
        n_embd=256,
        n_query_groups=4,
        rotary_percentage=0.0,
        parallel_residual=False,
        bias=True,
        lm_head_bias=False,
        norm_class_name="LayerNorm",
        mlp_class_name="GptNeoxMLP",
        gelu_approximate="tanh",
        intermediate_size=1024,
    )
    model = LitGPT(cfg)
    model.apply(model._init_weights)
    model.lm_head.weight = model.transformer.wte.weight  # tied, as ours and HF
    return model


LLAMA = GPTConfig(family="llama", n_layer=4, n_head=4, n_kv_head=2, n_embd=192, block_size=T, vocab_size=V)


def llama_sides() -> dict[str, torch.nn.Module]:
    """The recipe's Llama-family shape on every side (module docstring)."""
    from litgpt.config import Config
    from litgpt.model import GPT as LitGPT
    from transformers import LlamaConfig, LlamaForCausalLM

    c = LLAMA
    torch.manual_seed(0)
    ours = GPT(c)
    hf_cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=c.n_embd,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head,
        max_position_embeddings=T,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_cfg)
    lit_cfg = Config(
        name="llama-bench",
        block_size=T,
        vocab_size=V,
        padded_vocab_size=V,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_embd=c.n_embd,
        n_query_groups=c.n_kv_head,
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP",
        intermediate_size=c.intermediate_size,
        norm_eps=c.norm_eps,
        rope_base=int(c.rope_theta),
    )
    torch.manual_seed(0)
    lit = LitGPT(lit_cfg)
    lit.apply(lit._init_weights)
    lit.lm_head.weight = lit.transformer.wte.weight  # tied, as ours and HF
    return {"ours": ours, "hf": hf, "litgpt": lit}


def build_sides(use_compile: bool, family: str = "gpt2") -> dict[str, torch.nn.Module]:
    from transformers import GPT2Config, GPT2LMHeadModel

    if family == "llama":
        sides = llama_sides()
        if use_compile:
            torch.manual_seed(0)
            sides["ours+compile"] = torch.compile(GPT(LLAMA))
        return sides
    torch.manual_seed(0)
    ours = GPT(GPTConfig.preset("shakespeare"))  # 4 layers, 4 heads, C=256, T=256, V=256
    hf_cfg = GPT2Config(
        vocab_size=V,
        n_positions=T,
        n_embd=256,
        n_layer=4,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    hf_cfg._attn_implementation = "sdpa"  # HF's fastest CPU attention (flash kernel)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(hf_cfg)  # lm_head tied to wte, as ours
    torch.manual_seed(0)
    sides = {"ours": ours, "hf": hf, "litgpt": litgpt_gpt2()}
    if use_compile:
        torch.manual_seed(0)
        sides["ours+compile"] = torch.compile(GPT(GPTConfig.preset("shakespeare")))
    return sides


def make_optimizer(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    """The same optimizer class and settings for every side, so only the model differs."""
    if kind == "gradtune":
        from gradtune.optim.adamw import AdamW

        return AdamW(model.parameters(), lr=3e-4)  # our one-pass C kernel
    # torch's CPU default is the per-tensor loop (foreach is CUDA-only); fused=True is one kernel.
    return torch.optim.AdamW(model.parameters(), lr=3e-4, fused=kind == "torch-fused")


def make_step(model: torch.nn.Module, autocast: bool, optimizer: str) -> Callable[[torch.Tensor], float]:
    opt = make_optimizer(model, optimizer)
    is_hf = type(model).__module__.startswith("transformers")  # HF returns an output object

    def step(batch: torch.Tensor) -> float:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
        with ctx:
            out = model(batch[:, :-1])
            logits = out.logits if is_hf else out  # (B, T, V); ours and LitGPT return the tensor
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def measure(
    sides: dict[str, torch.nn.Module],
    autocast: bool,
    reps: int,
    steps: int,
    data: torch.Tensor,
    peak_n: int,
    optimizer: str,
    clock: str,
) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]], float]:
    """Alternating repetitions of ``steps`` steps per side, plus a matmul peak probe in each
    repetition (so the peak sees the same machine load as the steps, e.g. other processes).
    Returns per side the median tokens/s (wall) and tokens per CPU-second, the median
    per-repetition ratios to hf and to litgpt, and the median peak FLOP/s."""
    fns = {name: make_step(m, autocast, optimizer) for name, m in sides.items()}
    for fn in fns.values():  # warm-up: allocator, oneDNN primitives, compiled graphs
        fn(data[0])
    dtype = torch.bfloat16 if autocast else torch.float32
    rates: dict[str, list[float]] = {name: [] for name in sides}
    cpu_rates: dict[str, list[float]] = {name: [] for name in sides}
    peaks = []
    names = list(sides)
    for rep in range(reps):
        peaks.append(matmul_rate(dtype, peak_n, 0.3))
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotate who goes first
            t, c = time.perf_counter(), time.process_time()
            for i in range(steps):
                fns[name](data[(rep * steps + i) % len(data)])
            rates[name].append(steps * B * T / (time.perf_counter() - t))
            # CPU seconds of this process: robust to other processes taking turns on the cores
            # (with 1 thread; with more, idle threads spin and count too).
            cpu_rates[name].append(steps * B * T / (time.process_time() - c))
    by = rates if clock == "wall" else cpu_rates
    ratios = {
        name: (
            statistics.median(a / b for a, b in zip(r, by["hf"])),
            statistics.median(a / b for a, b in zip(r, by["litgpt"])),
        )
        for name, r in by.items()
    }
    medians = {name: (statistics.median(r), statistics.median(cpu_rates[name])) for name, r in rates.items()}
    return medians, ratios, statistics.median(peaks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repetition of 1 step")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=8, help="alternating repetitions (fp32)")
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps per repetition (fp32)")
    ap.add_argument("--modes", default="fp32,bf16", help="comma list of fp32, bf16")
    ap.add_argument(
        "--family",
        default="gpt2",
        choices=["gpt2", "llama"],
        help="gpt2: the GPT-2 block vs GPT2LMHeadModel; llama: the recipe's model vs LlamaForCausalLM",
    )
    ap.add_argument(
        "--optimizer",
        default="torch-fused",
        choices=["torch-fused", "torch", "gradtune"],
        help="AdamW for every side: torch.optim.AdamW(fused=True) (default), torch's per-tensor loop, or gradtune's",
    )
    ap.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="ratios from wall time (quiet machine) or from this process's CPU time (a shared "
        "machine; use with --threads 1)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps, steps = (1, 1) if args.quick else (args.reps, args.steps)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"CPU: {cpu_flags()}")
    print(f"at start: {load()}")
    sizes = {"fp32": matmul_size(torch.float32), "bf16": matmul_size(torch.bfloat16)}
    sides = build_sides(args.compile, args.family)
    print(f"family: {args.family}")
    flops = sides["ours"].flops_per_token(T)  # same shape on every side
    print(f"model: {sides['ours'].num_params() / 1e6:.2f}M params, {flops / 1e6:.1f} MFLOP/token (train)")
    data = torch.randint(0, V, (16, B, T + 1), generator=torch.Generator().manual_seed(0))

    rows, peaks = [], {}
    for mode in args.modes.split(","):
        autocast = mode == "bf16"
        m_reps, m_steps = reps, steps
        if autocast and bf16_emulated(sizes) and not args.quick:
            # bf16 matmuls are emulated on this CPU (no AVX512-BF16 / AMX): 10-50x slower than
            # fp32, so a shorter protocol keeps the run within minutes.
            m_reps, m_steps = 2, 1
            print(
                "note: bf16 matmul is far slower than fp32 here (no AVX512-BF16/AMX: emulated); "
                "bf16 runs 2 reps x 1 step"
            )
        rates, ratios, peaks[mode] = measure(
            sides, autocast, m_reps, m_steps, data, sizes[mode], args.optimizer, args.clock
        )
        # Emulated bf16 still runs on the fp32 FMA units: their peak is the honest denominator.
        peak = max(peaks[mode], peaks.get("fp32", 0.0))
        for name, (rate, cpu_rate) in rates.items():
            rows.append((mode, name, rate, cpu_rate, ratios[name], rate * flops / peak))
    for mode, peak in peaks.items():
        print(f"matmul peak {mode}: {peak / 1e9:8.1f} GFLOP/s (n={sizes[mode]}, median over the run)")
    print("MFU = tokens/s * train FLOPs/token / max(peak of the mode, fp32 peak)")
    print(f"optimizer for every side: {args.optimizer} AdamW; ratios from {args.clock} time")
    col = 2 if args.clock == "wall" else 3  # "vs ours fp32" on the same clock as the ratios
    fp32_ours = next((r[col] for r in rows if r[:2] == ("fp32", "ours")), float("nan"))
    print(f"at end: {load()}  (other processes share these cores when the load exceeds 0)")
    print(
        f"\n{'mode':6}{'side':>14}{'tokens/s':>11}{'tok/CPU-s':>11}{'vs hf':>8}{'vs litgpt':>11}{'vs ours fp32':>14}"
        f"{'MFU':>8}"
    )
    for mode, name, rate, cpu_rate, (vs_hf, vs_lit), mfu in rows:
        print(
            f"{mode:6}{name:>14}{rate:>11.0f}{cpu_rate:>11.0f}{vs_hf:>7.2f}x{vs_lit:>10.2f}x"
            f"{(rate, cpu_rate)[col - 2] / fp32_ours:>13.2f}x{mfu:>8.1%}"
        )


if __name__ == "__main__":
    main()
