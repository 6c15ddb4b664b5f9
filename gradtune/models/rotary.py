"""Rotary positions (RoPE, HF's "rotate half" layout: each head's value i pairs with i + hs/2),
as torch ops and as one C pass each way over the q|k heads of a fused q/k/v projection.

For a pair (a, b) = (x[i], x[i + hs/2]) at position t, with c = cos[t, i] and s = sin[t, i]:

    forward   a' = a c - b s,      b' = b c + a s
    backward  da = ga c + gb s,    db = gb c - ga s          (the rotation's transpose)

Why a kernel: torch's ``apply_rotary`` is three passes over q and three over k forward (the
rotated copy, the product with cos, the fused multiply-add) and as many backward, each writing a
(B, nh, T, hs) temporary (README: what the kernel saves). ``rotate`` reads heads (B, T, G, hs)
through one row stride (the q|k columns of qkv in place, or the q/k norms' output) and writes
float32 (B, T, G, hs), as torch's ops promote against the float32 tables: forward the same
products and sum (equal to float32 rounding); the input's gradient is written in its dtype
rounded once (bf16: torch rounds each branch's gradient before adding them). Everything else
(float64, a torch.compile trace, no compiler) takes ``apply_rotary``.
"""

from __future__ import annotations

import ctypes

import torch

from gradtune.models.rms_norm_kernel import rows_of
from gradtune.runtime.c_build import Library, bind_per_type
from gradtune.runtime.c_vectors import BF16, HEADER, PER_TYPE, TYPE_NAMES


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[i], x[i + hs/2]) pair by its position's angle. x (B, nh, T, hs), cos (T, hs).

    x * cos + rotate_half(x) * sin, with rotate_half's sign moved onto the small (T, hs) table:
    three passes over x (cat, mul, addcmul) instead of five (neg, cat, mul, mul, add)."""
    x1, x2 = x.chunk(2, dim=-1)
    s1, s2 = sin.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat([x2, x1], dim=-1), torch.cat([-s1, s2], dim=-1))


SOURCE = (
    HEADER
    + BF16
    + r"""
#include <omp.h>

/* x: rows of `groups` heads of n values at row stride `stride`; row r is position r % T. */
#define KERNELS(T_, CT)                                                                                \
void rope_fwd_##T_(const CT *x, int64_t rows, int64_t stride, int64_t T, int groups, int n,          \
                   const float *cos, const float *sin, float *out, int nthreads) {                     \
    int half = n / 2, nt = rows * groups * n < (1 << 15) ? 1 : nthreads;                               \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                       \
    for (int64_t r = 0; r < rows; r++) {                                                               \
        const float *c = cos + (r % T) * n, *s = sin + (r % T) * n;                                    \
        for (int g = 0; g < groups; g++) {                                                             \
            const CT *src = x + r * stride + (int64_t)g * n;                                           \
            float *o = out + (r * groups + g) * (int64_t)n;                                            \
            for (int i = 0; i < half; i++) {                                                           \
                float a = IN_##T_(src[i]), b = IN_##T_(src[i + half]);                                 \
                o[i] = a * c[i] + b * -s[i];                                                           \
                o[i + half] = b * c[i + half] + a * s[i + half];                                       \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
}                                                                                                      \
/* go: float32 (rows, groups, n); dx: (rows, groups, n) in x's type */                               \
void rope_bwd_##T_(const float *go, int64_t rows, int64_t T, int groups, int n, const float *cos,    \
                   const float *sin, CT *dx, int nthreads) {                                           \
    int half = n / 2, nt = rows * groups * n < (1 << 15) ? 1 : nthreads;                               \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                       \
    for (int64_t r = 0; r < rows; r++) {                                                               \
        const float *c = cos + (r % T) * n, *s = sin + (r % T) * n;                                    \
        for (int g = 0; g < groups; g++) {                                                             \
            const float *gr = go + (r * groups + g) * (int64_t)n;                                      \
            CT *d = dx + (r * groups + g) * (int64_t)n;                                                \
            for (int i = 0; i < half; i++) {                                                           \
                float ga = gr[i], gb = gr[i + half];                                                   \
                d[i] = OUT_##T_(ga * c[i] + gb * s[i + half]);                                         \
                d[i + half] = OUT_##T_(gb * c[i + half] + ga * -s[i]);                                 \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
}
"""
    + PER_TYPE
)


def _bind(lib: ctypes.CDLL) -> None:
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    signatures = {
        "rope_fwd": [ptr, i64, i64, i64, i32, i32, ptr, ptr, ptr, i32],
        "rope_bwd": [ptr, i64, i64, i32, i32, ptr, ptr, ptr, i32],
    }
    bind_per_type(lib, signatures, TYPE_NAMES.values())


_LIBRARY = Library(SOURCE, "rotary", _bind)
load, reset = _LIBRARY.load, _LIBRARY.reset  # the library or None (the torch ops); forget it


def takes(heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[int, int] | None:
    """heads' (rows, row stride) when the kernel rotates heads (B, T, G, hs): CPU, float32 or
    bfloat16 rows (``rows_of``), float32 contiguous (T, hs) tables, hs even, the library built, no
    torch.compile trace; else None. Pass it on to ``rotate``."""
    ok = (
        heads.device.type == "cpu"
        and heads.dim() == 4
        and heads.dtype in TYPE_NAMES
        and heads.shape[-1] % 2 == 0
        and all(
            t.dtype == torch.float32 and t.is_contiguous() and t.shape == (heads.shape[1], heads.shape[-1])
            for t in (cos, sin)
        )
        and not torch.compiler.is_compiling()
        and load() is not None
    )
    return rows_of(heads) if ok else None


class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, rows: int, stride: int):  # type: ignore[override]
        out = torch.empty(x.shape, dtype=torch.float32)
        T, groups, n = x.shape[1], x.shape[2], x.shape[3]
        getattr(load(), f"rope_fwd_{TYPE_NAMES[x.dtype]}")(
            x.data_ptr(),
            rows,
            stride,
            T,
            groups,
            n,
            cos.data_ptr(),
            sin.data_ptr(),
            out.data_ptr(),
            torch.get_num_threads(),
        )
        ctx.save_for_backward(cos, sin)
        ctx.dtype, ctx.shape, ctx.rows = x.dtype, x.shape, rows
        return out

    @staticmethod
    def backward(ctx, go):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        go = go.float().contiguous()
        dx = torch.empty(ctx.shape, dtype=ctx.dtype)
        T, groups, n = ctx.shape[1], ctx.shape[2], ctx.shape[3]
        getattr(load(), f"rope_bwd_{TYPE_NAMES[ctx.dtype]}")(
            go.data_ptr(),
            ctx.rows,
            T,
            groups,
            n,
            cos.data_ptr(),
            sin.data_ptr(),
            dx.data_ptr(),
            torch.get_num_threads(),
        )
        return dx, None, None, None, None


def rotate(heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: tuple[int, int]) -> torch.Tensor:
    """heads (B, T, G, hs) rotated: float32 (B, T, G, hs); ``layout`` is ``takes``'s answer."""
    return _Rotate.apply(heads, cos, sin, *layout)
