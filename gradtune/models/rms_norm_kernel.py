"""RMSNorm forward and backward in one C pass each over groups of contiguous floats (our GPT's
norms: models/gpt.py ``RMSNorm``, and its per-head q/k norms).

Why: torch's CPU ``rms_norm`` is composite (pow, mean, add, rsqrt, mul, each a pass over x, with
the float32 copy, the rounding back to the input dtype and the weight's product on top), and its
backward is as many again, and per-head q/k norms (``gpt.qk_norm``) run them once more per layer
(README: what the kernel saves). Here one OpenMP pass reads each group once forward (sum of
squares, then the scaled and weighted output) and once backward.

    r = 1 / sqrt(mean(x^2) + eps)                      per group of N (a head or a whole row)
    y = x * r, rounded to x's dtype;  out = y * w      (float32 out: w is float32)
    dy = g * w;  dx = r * (dy - x r * mean(dy * x r));  dw = sum over groups of g * y

the composite path's arithmetic (``F.rms_norm(x.float()).to(x.dtype) * w``) with sums in another
order, so results agree to float32 rounding; dx is written in x's dtype (bfloat16 rounded to
nearest even). x is read through one row stride: a row of G groups of N contiguous values, so the
q|k columns of the fused q/k/v projection are normalised per head without a copy. Everything else
(weights other than float32, float64, no compiler, a torch.compile trace) takes the torch ops.

transformers' Llama, Mistral, Qwen2 and Qwen3 RMSNorm modules compute the same arithmetic
(``weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)``); ``swap_rms_norms`` routes theirs
here too (models/hf.py, as it routes linears through oneDNN), checking each class's forward source
first: a class whose forward says anything else keeps its own.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import math
import types

import torch
from torch import nn

from gradtune.runtime.c_build import Library, bind_per_type
from gradtune.runtime.c_vectors import BF16, HEADER, PER_TYPE, TYPE_NAMES

SOURCE = (
    HEADER
    + BF16
    + r"""
#include <omp.h>

/* sum of a[i] * b[i], i < n */
static inline float dot(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.0f;
#ifdef VW
    vec acc = VZERO;
    for (; i + VW <= n; i += VW) acc = VFMA(VLOAD(a + i), VLOAD(b + i), acc);
    s = vsum(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* One group's values in float32 (xf), from float32 or bfloat16 memory. */
#define LOAD_GROUP(T, src, xf, n) \
    for (int i = 0; i < n; i++) xf[i] = IN_##T(src[i]);
#define KERNELS(T, CT)                                                                                 \
void rms_fwd_##T(const CT *x, int64_t rows, int64_t stride, int groups, int n, const float *w,       \
                 float eps, float *out, float *rstd, int nthreads) {                                   \
    int nt = rows * groups * n < (1 << 15) ? 1 : nthreads;                                             \
    _Pragma("omp parallel num_threads(nt)")                                                            \
    {                                                                                                  \
        float xf[n];                                                                                   \
        _Pragma("omp for schedule(static)")                                                            \
        for (int64_t r = 0; r < rows; r++) {                                                           \
            for (int g = 0; g < groups; g++) {                                                         \
                const CT *src = x + r * stride + (int64_t)g * n;                                       \
                float *o = out + (r * groups + g) * (int64_t)n;                                        \
                const float *wg = w + (int64_t)g * n;                                                  \
                LOAD_GROUP(T, src, xf, n)                                                              \
                float s = 1.0f / sqrtf(dot(xf, xf, n) / (float)n + eps);                               \
                rstd[r * groups + g] = s;                                                              \
                for (int i = 0; i < n; i++) o[i] = ROUND_##T(xf[i] * s) * wg[i];                       \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
}                                                                                                      \
/* dw_part: (nthreads, groups * n) zeros, each thread's sums; the caller adds them up. */            \
void rms_bwd_##T(const CT *x, int64_t rows, int64_t stride, int groups, int n, const float *w,       \
                 const float *rstd, const float *go, CT *dx, float *dw_part, int nthreads) {           \
    int nt = rows * groups * n < (1 << 15) ? 1 : nthreads;                                             \
    _Pragma("omp parallel num_threads(nt)")                                                            \
    {                                                                                                  \
        float xh[n], dy[n];                                                                            \
        float *dw = dw_part + (int64_t)omp_get_thread_num() * groups * n;                              \
        _Pragma("omp for schedule(static)")                                                            \
        for (int64_t r = 0; r < rows; r++) {                                                           \
            for (int g = 0; g < groups; g++) {                                                         \
                const CT *src = x + r * stride + (int64_t)g * n;                                       \
                const float *gg = go + (r * groups + g) * (int64_t)n, *wg = w + (int64_t)g * n;        \
                float *dwg = dw + (int64_t)g * n;                                                      \
                CT *d = dx + (r * groups + g) * (int64_t)n;                                            \
                float s = rstd[r * groups + g];                                                        \
                for (int i = 0; i < n; i++) {                                                          \
                    xh[i] = IN_##T(src[i]) * s;                                                        \
                    dy[i] = gg[i] * wg[i];                                                             \
                    dwg[i] += gg[i] * ROUND_##T(xh[i]);                                                \
                }                                                                                      \
                float c = dot(dy, xh, n) / (float)n;                                                   \
                for (int i = 0; i < n; i++) d[i] = OUT_##T(s * (dy[i] - xh[i] * c));                   \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
}
"""
    + PER_TYPE
)


def _bind(lib: ctypes.CDLL) -> None:
    i64, ptr, i32, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    signatures = {
        "rms_fwd": [ptr, i64, i64, i32, i32, ptr, f32, ptr, ptr, i32],
        "rms_bwd": [ptr, i64, i64, i32, i32, ptr, ptr, ptr, ptr, ptr, i32],
    }
    bind_per_type(lib, signatures, TYPE_NAMES.values())


_LIBRARY = Library(SOURCE, "rms_norm", _bind)
load, reset = _LIBRARY.load, _LIBRARY.reset  # the library or None (the torch ops); forget it


def rows_of(x: torch.Tensor) -> tuple[int, int] | None:
    """(rows, row stride) when x (..., G, N) is rows of G * N contiguous values at one stride:
    the last two dimensions dense, the leading ones (size-1 ones skipped: their stride is
    arbitrary) collapsing to one strided dimension."""
    if x.dim() < 2 or x.stride(-1) != 1 or (x.shape[-2] > 1 and x.stride(-2) != x.shape[-1]):
        return None
    rows = math.prod(x.shape[:-2])
    if rows == 0:
        return None
    stride, expect = None, 0
    for i in range(x.dim() - 3, -1, -1):
        if x.shape[i] == 1:
            continue
        if stride is None:
            stride = expect = x.stride(i)
        elif x.stride(i) != expect:
            return None
        expect *= x.shape[i]
    return rows, stride if stride is not None else x.shape[-2] * x.shape[-1]


def takes(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int] | None:
    """x's (rows, row stride) when the kernel computes this norm, else None: CPU, x float32 or
    bfloat16 in rows (``rows_of``), a float32 weight of x's last two dimensions' shape, the library
    built, no torch.compile trace. Pass it on to ``rms_norm`` (read once per call, kept for backward)."""
    ok = (
        x.device.type == "cpu"
        and x.dtype in TYPE_NAMES
        and weight.dtype == torch.float32
        and weight.shape == x.shape[-2:]
        and not torch.compiler.is_compiling()
        and load() is not None
    )
    return rows_of(x) if ok else None


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, rows: int, stride: int) -> torch.Tensor:  # type: ignore[override]
        groups, n = x.shape[-2], x.shape[-1]
        w = weight.contiguous()
        out = torch.empty(x.shape, dtype=torch.float32)
        rstd = torch.empty(rows * groups, dtype=torch.float32)
        getattr(load(), f"rms_fwd_{TYPE_NAMES[x.dtype]}")(
            x.data_ptr(),
            rows,
            stride,
            groups,
            n,
            w.data_ptr(),
            eps,
            out.data_ptr(),
            rstd.data_ptr(),
            torch.get_num_threads(),
        )
        ctx.save_for_backward(x, w, rstd)
        ctx.rows, ctx.stride = rows, stride
        return out

    @staticmethod
    def backward(ctx, go: torch.Tensor):  # type: ignore[override]
        x, w, rstd = ctx.saved_tensors
        rows, stride = ctx.rows, ctx.stride
        groups, n = x.shape[-2], x.shape[-1]
        go = go.contiguous().float()
        threads = torch.get_num_threads()
        dx = torch.empty(x.shape, dtype=x.dtype)
        dw = torch.zeros(threads, groups, n, dtype=torch.float32)
        getattr(load(), f"rms_bwd_{TYPE_NAMES[x.dtype]}")(
            x.data_ptr(),
            rows,
            stride,
            groups,
            n,
            w.data_ptr(),
            rstd.data_ptr(),
            go.data_ptr(),
            dx.data_ptr(),
            dw.data_ptr(),
            threads,
        )
        return dx, dw.sum(0), None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, layout: tuple[int, int] | None = None) -> torch.Tensor:
    """``F.rms_norm(x.float(), (N,), eps=eps).to(x.dtype) * weight`` over the last dimension of
    x (..., G, N), weight (G, N) (one group's weight repeated for per-head norms), float32 out;
    as ``takes`` says, whose result is ``layout`` (read from x when not given)."""
    rows, stride = layout or rows_of(x)  # type: ignore[misc]
    return _RMSNorm.apply(x, weight, eps, rows, stride)


# transformers' RMSNorm classes computing ``rms_norm`` above, and the body their forward must have
HF_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
HF_BODY = [
    "input_dtype = hidden_states.dtype",
    "hidden_states = hidden_states.to(torch.float32)",
    "variance = hidden_states.pow(2).mean(-1, keepdim=True)",
    "hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)",
    "return self.weight * hidden_states.to(input_dtype)",
]


@functools.cache
def _same_arithmetic(cls: type) -> bool:
    """``cls.forward``'s statements are HF_BODY's, read from its source (blank and comment lines out)."""
    try:
        lines = [ln.strip() for ln in inspect.getsource(cls.forward).splitlines()[1:]]
    except (OSError, TypeError):
        return False
    return [ln for ln in lines if ln and not ln.startswith("#")] == HF_BODY


def _hf_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    rows, w = hidden_states.unsqueeze(-2), self.weight.view(1, -1)  # (..., 1, C): one group a row
    layout = takes(rows, w)
    if layout:
        return rms_norm(rows, w, self.variance_epsilon, layout).squeeze(-2)
    return type(self).forward(self, hidden_states)


def swap_rms_norms(model: nn.Module) -> int:
    """Route ``model``'s transformers RMSNorm modules of ``HF_CLASSES`` whose forward is HF_BODY
    through the kernel (an instance ``forward``; class and state dict unchanged); returns how many."""
    n = 0
    for m in model.modules():
        if type(m).__name__ in HF_CLASSES and hasattr(m, "variance_epsilon") and _same_arithmetic(type(m)):
            m.forward = types.MethodType(_hf_forward, m)
            n += 1
    return n


def unswap_rms_norms(model: nn.Module) -> int:
    """Undo ``swap_rms_norms`` (a benchmark's peer runs transformers' own); returns how many."""
    return sum(1 for m in model.modules() if type(m).__name__ in HF_CLASSES and vars(m).pop("forward", None))
