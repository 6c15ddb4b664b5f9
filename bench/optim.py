"""Optimizer step time: gradtune.optim vs torch.optim on GPT-2-124M-shaped float32 params.

    python bench/optim.py           # full: 124.4M params, ~1-2 minutes
    python bench/optim.py --quick   # smoke run: 2 layers, 8k vocab, 3 repetitions

An optimizer step is memory-bound, so each time is also shown as bandwidth: bytes a one-pass
implementation must move per step divided by the time, next to the triad bandwidth
(a = b + s*c) measured in the same process. Bytes counted per parameter (float32):
  SGD momentum: read p, g, buf; write p, buf    = 5 x 4 B
  AdamW:        read p, g, m, v; write p, m, v  = 7 x 4 B
  Muon:         read p, g, buf; write p, buf    = 5 x 4 B, on the hidden matrices of the first
                --muon-layers blocks only: its step is bound by the Newton-Schulz matmuls
                (bfloat16), not memory, so its GB/s is not a bandwidth and only the ratio counts
  triad:        read b, c; write a              = 3 x 4 B  (write-allocate traffic not counted)
All implementations share the same params and grads (one set in memory); each has its own
state. Repetitions alternate the order of implementations; we report medians.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
from collections.abc import Callable

import torch

from gradtune.optim import SGD, AdamW, Muon, fused
from gradtune.optim.kernel_source import PRELUDE

# STREAM's triad, a = b + s * c, on the optimizer kernels' prelude: the same threads and the
# same partition of the elements as the updates, so the two bandwidths compare like for like.
TRIAD_SOURCE = (
    PRELUDE
    + r"""
void triad_f32(int64_t n, float *restrict a, const float *restrict b, const float *restrict c,
               float s, int nthreads) {
    _Pragma("omp parallel num_threads(threads_for(n, nthreads))")
    {
        int64_t lo, hi;
        thread_range(n, &lo, &hi);
        for (int64_t j = lo; j < hi; ++j) a[j] = b[j] + s * c[j];
    }
}
"""
)


def gpt2_shapes(n_layer: int = 12, vocab: int = 50257, n_ctx: int = 1024, d: int = 768) -> list[tuple[int, ...]]:
    """Parameter shapes of GPT-2 124M (HF Conv1D layout: weight (in, out))."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (n_ctx, d)]  # wte, wpe
    for _ in range(n_layer):
        shapes += [
            (d,),
            (d,),  # ln_1 weight, bias
            (d, 3 * d),
            (3 * d,),  # attn.c_attn
            (d, d),
            (d,),  # attn.c_proj
            (d,),
            (d,),  # ln_2
            (d, 4 * d),
            (4 * d,),  # mlp.c_fc
            (4 * d, d),
            (d,),
        ]  # mlp.c_proj
    return shapes + [(d,), (d,)]  # ln_f


def make_params(shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    params = []
    for s in shapes:
        p = torch.empty(s).uniform_(-0.02, 0.02).requires_grad_()
        p.grad = torch.empty(s).uniform_(-1e-3, 1e-3)
        params.append(p)
    return params


def triad_kernel() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], None] | None:
    """``triad(a, b, c, s)``: a = b + s * c over contiguous float32 CPU tensors, in C built like
    the optimizer's kernels (same compiler lookup and flags, cached under gradtune's cache root
    in kernels/); None when it cannot be built."""
    try:
        lib = ctypes.CDLL(str(fused.compiled(TRIAD_SOURCE, "triad")))
    except (RuntimeError, OSError) as err:
        print(f"triad kernel unavailable ({str(err).splitlines()[0]}); using torch.add")
        return None
    fn = lib.triad_f32
    fn.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_int]
    fn.restype = None

    def triad(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, s: float) -> None:
        fn(a.numel(), a.data_ptr(), b.data_ptr(), c.data_ptr(), s, torch.get_num_threads())

    return triad


def triad_gbps(n: int, reps: int) -> float:
    """Median GB/s of STREAM's triad a = b + s*c over n float32 elements (3 x 4 B counted per
    element), in a plain C/OpenMP loop with the threads our optimizer uses (torch.add with
    alpha reached only about half the bandwidth here, which would flatter any optimizer)."""
    triad = triad_kernel()
    a, b, c = torch.zeros(n), torch.rand(n), torch.rand(n)  # zeros: pages touched before timing
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        if triad is not None:
            triad(a, b, c, 0.5)
        else:
            torch.add(b, c, alpha=0.5, out=a)
        times.append(time.perf_counter() - t0)
    return 3 * 4 * n / statistics.median(times[1:]) / 1e9


def timed_medians(opts: dict[str, torch.optim.Optimizer], reps: int, budget_s: float) -> dict[str, list[float]]:
    """Seconds per step for each optimizer; the order rotates and reverses every repetition
    so slow drift (thermal, other processes) does not favour one side. Stops after
    budget_s once 3 repetitions are done (a loaded machine can be 10x slower)."""
    deadline = time.perf_counter() + budget_s
    for opt in opts.values():  # warm-up: state allocation, kernel build/load, page faults
        opt.step()
        opt.step()
    names, times = list(opts), {k: [] for k in opts}
    for r in range(reps):
        if r >= 3 and time.perf_counter() > deadline:
            break
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            opts[name].step()
            times[name].append(time.perf_counter() - t0)
    return times


def hidden(params: list[torch.Tensor], layers: int) -> list[torch.Tensor]:
    """The 2-D weights of the first ``layers`` blocks (c_attn, attn.c_proj, c_fc, mlp.c_proj):
    what Muon steps; wte and wpe (the first two tensors) are AdamW's."""
    return [p for p in params[2:] if p.dim() == 2][: 4 * layers]


def variants(
    params: list[torch.Tensor], mats: list[torch.Tensor]
) -> dict[str, dict[str, Callable[[], torch.optim.Optimizer]]]:
    sgd = dict(lr=1e-3, momentum=0.9)
    adamw = dict(lr=1e-4, weight_decay=0.1)
    muon = dict(lr=0.02, weight_decay=0.1)
    return {
        "SGD momentum": {
            "gradtune (fused)": lambda: SGD(params, **sgd),
            "torch foreach=False": lambda: torch.optim.SGD(params, **sgd, foreach=False),
            "torch foreach=True": lambda: torch.optim.SGD(params, **sgd, foreach=True),
            "torch fused=True": lambda: torch.optim.SGD(params, **sgd, fused=True),
        },
        "AdamW": {
            "gradtune (fused)": lambda: AdamW(params, **adamw),
            "torch foreach=False": lambda: torch.optim.AdamW(params, **adamw, foreach=False),
            "torch foreach=True": lambda: torch.optim.AdamW(params, **adamw, foreach=True),
            "torch fused=True": lambda: torch.optim.AdamW(params, **adamw, fused=True),
        },
        "Muon": {"gradtune": lambda: Muon(mats, **muon), "torch": lambda: torch.optim.Muon(mats, **muon)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model, 3 reps: a smoke run")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per implementation")
    ap.add_argument(
        "--budget-s", type=float, default=40.0, help="per optimizer: stop repeating after this many seconds (>= 3 reps)"
    )
    ap.add_argument(
        "--muon-layers", type=int, default=None, help="blocks whose matrices Muon steps (default 2; quick 1)"
    )
    args = ap.parse_args()
    reps = args.reps or (3 if args.quick else 9)
    shapes = gpt2_shapes(n_layer=2, vocab=8192) if args.quick else gpt2_shapes()
    params = make_params(shapes)
    n = sum(p.numel() for p in params)
    triad_n = min(n, 64 * 2**20)  # >= 768 MB over 3 arrays: far beyond any cache
    mats = hidden(params, args.muon_layers or (1 if args.quick else 2))
    bytes_per = {"SGD momentum": 5 * 4 * n, "AdamW": 7 * 4 * n, "Muon": 5 * 4 * sum(p.numel() for p in mats)}

    print(
        f"params: {len(params)} tensors, {n / 1e6:.1f}M float32 | torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()} | "
        f"load average {os.getloadavg()[0]:.1f} | Muon: {len(mats)} matrices"
    )
    triad_before = triad_gbps(triad_n, reps)
    rows = []
    for algo, makers in variants(params, mats).items():
        opts = {name: make() for name, make in makers.items()}
        times = timed_medians(opts, reps, args.budget_s)
        ours = statistics.median(times[next(iter(makers))])  # the first implementation is gradtune's
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append((algo, name, len(ts), med, min(ts), bytes_per[algo] / med / 1e9, ours / med))
        del opts  # free this algorithm's state before the next one
    triad = (triad_before + triad_gbps(triad_n, reps)) / 2

    print(
        f"triad a = b + s*c: {triad:.1f} GB/s (mean of before/after medians: "
        f"{triad_before:.1f} / {2 * triad - triad_before:.1f})"
    )
    print(
        f"bytes per step: SGD momentum {bytes_per['SGD momentum'] / 1e9:.2f} GB, "
        f"AdamW {bytes_per['AdamW'] / 1e9:.2f} GB, Muon {bytes_per['Muon'] / 1e9:.2f} GB"
    )
    head = (
        f"{'optimizer':<14}{'implementation':<22}{'steps':>6}{'median ms':>10}{'min ms':>9}"
        f"{'GB/s':>7}{'% triad':>9}{'ours/this':>11}"
    )
    print(head + "\n" + "-" * len(head))
    for algo, name, steps, med, best, gbps, ratio in rows:
        print(
            f"{algo:<14}{name:<22}{steps:>6}{med * 1e3:>10.1f}{best * 1e3:>9.1f}{gbps:>7.1f}"
            f"{100 * gbps / triad:>8.0f}%{ratio:>10.2f}x"
        )
    print(
        f"\nHow measured: one process, up to {reps} timed steps per implementation (fewer if "
        f"over the {args.budget_s:.0f} s budget: see 'steps') after 2 warm-up "
        "steps, order rotated/reversed each repetition, medians; shared params and grads, "
        "separate optimizer state. ours/this < 1 means gradtune is faster. On a shared "
        "machine, compare ratios, not absolute times (load average printed above)."
    )


if __name__ == "__main__":
    main()
