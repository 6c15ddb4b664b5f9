"""Training throughput of our GPT against Hugging Face's GPT2LMHeadModel, same shape, same run.

Both sides: 4 layers, 4 heads, width 256, context 256, batch 8, byte vocabulary (256), dropout 0,
torch.optim.AdamW(lr=3e-4), same seed, the same random byte batches, the same loss code
(F.cross_entropy on the logits, computed outside the model). Sides alternate within each
repetition (the order flips every repetition) and we report medians, so drift in machine load
hits both alike. MFU = tokens/s * training FLOPs per token / the matmul peak measured here.

  python bench/gpt.py            # full: fp32 and bf16 autocast, ~3 minutes on a quiet 2-core CPU
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


def matmul_peak(dtype: torch.dtype, seconds: float) -> tuple[float, int]:
    """Median FLOP/s of a square matmul loop (the median, like the training rates, so machine
    load hits both alike). n doubles from 256 up to 2048 while one product takes < 50 ms, so an
    emulated dtype (bf16 without AVX512-BF16 / AMX) still finishes in time."""
    n = 256
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # first call: allocation and kernel selection
        t = time.perf_counter()
        a @ b
        if n >= 2048 or time.perf_counter() - t > 0.05:
            break
        n *= 2
    rates, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(rates) < 3:
        t = time.perf_counter()
        a @ b
        rates.append(2 * n**3 / (time.perf_counter() - t))
    return statistics.median(rates), n


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
            data: torch.Tensor) -> dict[str, float]:
    """Median tokens/s per side over ``reps`` alternating repetitions of ``steps`` steps each."""
    fns = {name: make_step(m, autocast) for name, m in sides.items()}
    for fn in fns.values():  # warm-up: allocator, oneDNN primitives, compiled graphs
        fn(data[0])
    rates: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            for i in range(steps):
                fns[name](data[(rep * steps + i) % len(data)])
            rates[name].append(steps * B * T / (time.perf_counter() - t))
    return {name: statistics.median(r) for name, r in rates.items()}


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
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peaks[name], n = matmul_peak(dtype, 0.5 if args.quick else 2.0)
        print(f"matmul peak {name}: {peaks[name] / 1e9:8.1f} GFLOP/s  (n={n})")
    sides = build_sides(args.compile)
    flops = sides["ours"].flops_per_token(T)  # same shape on every side
    print(f"model: {sides['ours'].num_params() / 1e6:.2f}M params, {flops / 1e6:.1f} MFLOP/token (train)")
    data = torch.randint(0, V, (16, B, T + 1), generator=torch.Generator().manual_seed(0))

    rows = []
    for mode in args.modes.split(","):
        autocast = mode == "bf16"
        m_reps, m_steps = reps, steps
        if autocast and peaks["bf16"] < 0.5 * peaks["fp32"] and not args.quick:
            # bf16 matmuls are emulated on this CPU (no AVX512-BF16 / AMX): 10-50x slower than
            # fp32, so a shorter protocol keeps the run within minutes.
            m_reps, m_steps = 3, 1
            print("note: bf16 matmul is slower than fp32 here (emulated); bf16 uses 3 reps x 1 step")
        rates = measure(sides, autocast, m_reps, m_steps, data)
        for name, rate in rates.items():
            mfu = rate * flops / peaks[mode]
            rows.append((mode, name, rate, rate / rates["hf"], mfu))
    fp32_ours = next((r[2] for r in rows if r[:2] == ("fp32", "ours")), float("nan"))
    print(f"\n{'mode':6}{'side':>14}{'tokens/s':>11}{'vs hf':>8}{'vs ours fp32':>14}{'MFU':>8}")
    for mode, name, rate, ratio, mfu in rows:
        print(f"{mode:6}{name:>14}{rate:>11.0f}{ratio:>7.2f}x{rate / fp32_ours:>13.2f}x{mfu:>8.1%}")


if __name__ == "__main__":
    main()
