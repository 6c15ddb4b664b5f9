"""The hardware floor of one decoding step on this machine, for bench/generate.py.

A greedy decoding step of a (B, 1) token through a dense model reads every weight once (fp32:
4 bytes a parameter, the tied embedding included: it is the lm_head) plus each row's KV cache,
and does 2 x (matmul parameters) x B FLOPs. Neither side of a comparison can go below

    bandwidth floor = bytes read per step / measured read bandwidth
    compute floor   = FLOPs per step / measured GEMM rate of the step's own shapes

so each side's ms/step as a multiple of max(floors) says how much room is left, and a speed-up
target between two sides is reachable only while the slower side is that far above the floor.

Read bandwidth: a streaming reduction (``sum``) and a GEMV (``mv``, the decoder's own kernel at
batch 1) over a float32 tensor of the step's own bytes -- larger than the caches for a model like
SmolLM2-135M (538 MB fp32), and read cyclically as decoding reads its weights, so whatever part
of it the last-level cache keeps between passes counts for the floor as it does for the decoder.
The faster of the two medians is the floor's bandwidth (a floor must not be beatable).
GEMM rate: per distinct (B, in) x (in, out) shape, a weight slice small enough to stay in the
core's L2 (so the figure is arithmetic, not memory), the faster of plain ``torch.mm`` and
oneDNN's packed linear; medians. Both use the thread count the timed rows use.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # first-touch pages, kernel choice
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(nbytes: int, repeats: int = 7) -> dict[str, float]:
    """Median read bandwidth (bytes/s) of ``sum`` and ``mv`` over a float32 buffer of ``nbytes``."""
    cols = 576
    x = torch.rand(max(nbytes // 4 // cols, 1), cols)  # (rows, 576) float32, nbytes
    v = torch.rand(cols)
    size = x.numel() * 4
    out = {
        "sum": size / _median_seconds(lambda: x.sum(), repeats),
        "mv": size / _median_seconds(lambda: torch.mv(x, v), repeats),
    }
    return out


def _gemm_rate(rows: int, inner: int, outer: int, dtype: torch.dtype, repeats: int) -> float:
    """FLOP/s of (rows, inner) x (inner, outer) with the weight slice resident in L2 (<= ~1 MB)."""
    per_row = inner * torch.empty((), dtype=dtype).element_size()
    n = max(16, min(outer, (1 << 20) // per_row) // 16 * 16)
    w, x = torch.randn(n, inner).to(dtype), torch.randn(rows, inner).to(dtype)
    reps = 16  # several calls per timing: one small GEMM is a few microseconds
    rates = []
    plain = _median_seconds(lambda: [torch.mm(x, w.t()) for _ in range(reps)], repeats)
    rates.append(2 * rows * inner * n * reps / plain)
    if torch.backends.mkldnn.is_available():
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_size=rows)
            run = lambda: [  # noqa: E731
                torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "") for _ in range(reps)
            ]
            rates.append(2 * rows * inner * n * reps / _median_seconds(run, repeats))
        except (RuntimeError, AttributeError):
            pass
    return max(rates)


def pass_seconds(calls: list[Callable[[], object]], repeats: int = 5) -> float:
    """Median seconds of running ``calls`` in order: a step's GEMMs alone, no other op between them."""
    return _median_seconds(lambda: [c() for c in calls], repeats)


def matmul_shapes(model: nn.Module) -> list[tuple[int, int, int]]:
    """(in, out, count) of the decoding step's GEMMs: the model's nn.Linear weights (fused as the
    decoder fuses them does not change the FLOPs), the LoRA layers read as their merged base."""
    shapes: dict[tuple[int, int], int] = {}
    for m in model.modules():
        if type(m) is nn.Linear:
            key = (m.in_features, m.out_features)
            shapes[key] = shapes.get(key, 0) + 1
    return [(i, o, c) for (i, o), c in sorted(shapes.items())]


class Floor:
    """Bandwidth and compute floors of a decoding step of ``model`` (the peer's plain copy)."""

    def __init__(self, model: nn.Module, repeats: int = 7) -> None:
        self.model = model
        self.param_bytes = {
            dtype: sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()
            for dtype in (torch.float32, torch.bfloat16)
        }
        self.repeats = repeats
        self.measure()
        self.shapes = matmul_shapes(model)
        self._rates: dict[tuple[int, int, int, torch.dtype], float] = {}
        config = model.config
        heads = config.num_attention_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        # K and V of one position, all layers: layers x 2 x Hkv x D elements
        self.kv_elements = config.num_hidden_layers * 2 * config.num_key_value_heads * dim

    def measure(self) -> None:
        """(Re)measure the read bandwidth: bench/generate.py does it next to each row's timed runs,
        under the same load."""
        self.bandwidths = read_bandwidth(self.param_bytes[torch.float32], self.repeats)
        self.bandwidth = max(self.bandwidths.values())

    def step_bytes(self, dtype: torch.dtype, batch: int, context: float) -> float:
        """Bytes one step reads: every weight once, and each row's KV cache of ``context`` positions."""
        element = torch.empty((), dtype=dtype).element_size()
        return self.param_bytes[dtype] + batch * context * self.kv_elements * element

    def step_flops(self, batch: int) -> int:
        return sum(2 * batch * i * o * c for i, o, c in self.shapes)

    def compute_seconds(self, dtype: torch.dtype, batch: int) -> float:
        """Sum over the step's GEMM shapes of FLOPs / that shape's measured rate."""
        total = 0.0
        for i, o, c in self.shapes:
            key = (batch, i, o, dtype)
            if key not in self._rates:
                self._rates[key] = _gemm_rate(batch, i, o, dtype, self.repeats)
            total += 2 * batch * i * o * c / self._rates[key]
        return total

    def line(self, dtype: torch.dtype, batch: int, context: float, sides: dict[str, float]) -> str:
        """The floors of a step and each side's seconds per step (``sides``) as a multiple of them."""
        nbytes = self.step_bytes(dtype, batch, context)
        memory = nbytes / self.bandwidth
        compute = self.compute_seconds(dtype, batch)
        floor = max(memory, compute)
        flops = self.step_flops(batch)
        text = (
            f"    floor per step: reads {nbytes / 1e6:.0f} MB at {self.bandwidth / 1e9:.1f} GB/s -> "
            f"{memory * 1e3:.1f} ms; {flops / 1e9:.2f} GFLOP at {flops / compute / 1e9:.0f} GFLOP/s -> "
            f"{compute * 1e3:.1f} ms | "
        )
        return text + ", ".join(f"{name} {s * 1e3:.1f} ms/step = {s / floor:.2f}x floor" for name, s in sides.items())

    def header(self) -> str:
        mb = self.param_bytes[torch.float32] / 1e6
        found = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in self.bandwidths.items())
        return (
            f"hardware floor: read bandwidth over a {mb:.0f} MB float32 buffer (the fp32 weights' size), "
            f"{torch.get_num_threads()} threads, medians of {self.repeats}: {found} GB/s (the faster is the floor's); "
            f"GEMM rates: the step's shapes, weight slices resident in L2"
        )
