"""Training throughput of our GPT against Hugging Face's GPT2LMHeadModel, same shape, same run.

Both sides: 4 layers, 4 heads, width 256, context 256, batch 8, byte vocabulary (256), dropout 0,
torch.optim.AdamW(lr=3e-4), same seed, the same random byte batches, the same loss code
(F.cross_entropy on the logits, computed outside the model). Sides alternate within each
repetition (the order flips every repetition) and we report medians, so drift in machine load
hits both alike. MFU = tokens/s * training FLOPs per token / the matmul peak measured here.

  python bench/gpt.py            # full: fp32 and bf16 autocast, ~2-4 min of CPU on 2 cores
  python bench/gpt.py --quick    # smoke run, seconds
  python bench/gpt.py --compile  # adds torch.compile(ours) as a third side (compile time excluded)
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


def build_sides(use_compile: bool) -> dict[str, torch.nn.Module]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ours = GPT(GPTConfig.preset("shakespeare"))  # 4 layers, 4 heads, C=256, T=256, V=256
    hf_cfg = GPT2Config(vocab_size=V, n_positions=T, n_embd=256, n_layer=4, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    hf_cfg._attn_implementation = "sdpa"  # HF's fastest CPU attention (flash kernel)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(hf_cfg)  # lm_head tied to wte, as ours
    sides = {"ours": ours, "hf": hf}
    if use_compile:
        torch.manual_seed(0)
        sides["ours+compile"] = torch.compile(GPT(GPTConfig.preset("shakespeare")))
    return sides


def make_step(model: torch.nn.Module, autocast: bool) -> Callable[[torch.Tensor], float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    is_hf = not isinstance(getattr(model, "_orig_mod", model), GPT)  # HF returns an output object

    def step(batch: torch.Tensor) -> float:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
        with ctx:
            out = model(batch[:, :-1])
            logits = out.logits if is_hf else out  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def measure(sides: dict[str, torch.nn.Module], autocast: bool, reps: int, steps: int,
            data: torch.Tensor, peak_n: int) -> tuple[dict[str, float], dict[str, float], float]:
    """Alternating repetitions of ``steps`` steps per side, plus a matmul peak probe in each
    repetition (so the peak sees the same machine load as the steps, e.g. other processes).
    Returns median tokens/s per side, median per-repetition ratio to hf, median peak FLOP/s."""
    fns = {name: make_step(m, autocast) for name, m in sides.items()}
    for fn in fns.values():  # warm-up: allocator, oneDNN primitives, compiled graphs
        fn(data[0])
    dtype = torch.bfloat16 if autocast else torch.float32
    rates: dict[str, list[float]] = {name: [] for name in sides}
    peaks = []
    names = list(sides)
    for rep in range(reps):
        peaks.append(matmul_rate(dtype, peak_n, 0.3))
        for name in names if rep % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            for i in range(steps):
                fns[name](data[(rep * steps + i) % len(data)])
            rates[name].append(steps * B * T / (time.perf_counter() - t))
    ratios = {name: statistics.median(a / b for a, b in zip(r, rates["hf"])) for name, r in rates.items()}
    return {name: statistics.median(r) for name, r in rates.items()}, ratios, statistics.median(peaks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repetition of 1 step")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=8, help="alternating repetitions (fp32)")
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps per repetition (fp32)")
    ap.add_argument("--modes", default="fp32,bf16", help="comma list of fp32, bf16")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps, steps = (1, 1) if args.quick else (args.reps, args.steps)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    sizes = {"fp32": matmul_size(torch.float32), "bf16": matmul_size(torch.bfloat16)}
    sides = build_sides(args.compile)
    flops = sides["ours"].flops_per_token(T)  # same shape on every side
    print(f"model: {sides['ours'].num_params() / 1e6:.2f}M params, {flops / 1e6:.1f} MFLOP/token (train)")
    data = torch.randint(0, V, (16, B, T + 1), generator=torch.Generator().manual_seed(0))

    rows, peaks = [], {}
    for mode in args.modes.split(","):
        autocast = mode == "bf16"
        m_reps, m_steps = reps, steps
        if autocast and sizes["bf16"] < sizes["fp32"] and not args.quick:
            # bf16 matmuls are emulated on this CPU (no AVX512-BF16 / AMX): 10-50x slower than
            # fp32, so a shorter protocol keeps the run within minutes.
            m_reps, m_steps = 2, 1
            print("note: bf16 matmul is far slower than fp32 here (no AVX512-BF16/AMX: emulated); "
                  "bf16 runs 2 reps x 1 step")
        rates, ratios, peaks[mode] = measure(sides, autocast, m_reps, m_steps, data, sizes[mode])
        # Emulated bf16 still runs on the fp32 FMA units: their peak is the honest denominator.
        peak = max(peaks[mode], peaks.get("fp32", 0.0))
        for name, rate in rates.items():
            rows.append((mode, name, rate, ratios[name], rate * flops / peak))
    for mode, peak in peaks.items():
        print(f"matmul peak {mode}: {peak / 1e9:8.1f} GFLOP/s (n={sizes[mode]}, median over the run)")
    print("MFU = tokens/s * train FLOPs/token / max(peak of the mode, fp32 peak)")
    fp32_ours = next((r[2] for r in rows if r[:2] == ("fp32", "ours")), float("nan"))
    print(f"\n{'mode':6}{'side':>14}{'tokens/s':>11}{'vs hf':>8}{'vs ours fp32':>14}{'MFU':>8}")
    for mode, name, rate, ratio, mfu in rows:
        print(f"{mode:6}{name:>14}{rate:>11.0f}{ratio:>7.2f}x{rate / fp32_ours:>13.2f}x{mfu:>8.1%}")


if __name__ == "__main__":
    main()
