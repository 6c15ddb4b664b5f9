"""SwiGLU's gate, ``silu(gate) * up``, forward and backward in one C pass each (our GPT's Llama MLP:
models/gpt_mlp.py, gate|up written side by side by one matmul).

Why: torch runs it as silu (a pass over gate, writing silu(gate)), then mul (reading that and up,
writing the product); backward as two muls and ``silu_backward``: five passes over (N, H) tensors
and two temporaries where one pass reads gate and up once each way (README: what it saves).

    s = silu(g) = g / (1 + exp(-g)), rounded to h's dtype;  out = s * u, rounded
    ds = dout * u, rounded;  dg = ds * sig(g) * (1 + g (1 - sig(g)));  du = dout * s

torch's arithmetic at torch's rounding points (a bf16 h rounds where torch's bf16 ops round), with
Cephes' exp (runtime/c_vectors.py) for torch's, so results agree to float32 rounding before each
rounding to bf16. s is recomputed in backward from g (nothing but h is kept). Rows of (N, 2H): gate
the first H values, up the next H, each row contiguous, rows at one stride. Everything else
(float64, no compiler, a torch.compile trace, other layouts) takes the torch ops.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from gradtune.models.rms_norm_kernel import rows_of
from gradtune.runtime.c_build import Library, bind_per_type
from gradtune.runtime.c_vectors import BF16, HEADER, PER_TYPE, TYPE_NAMES

SOURCE = (
    HEADER
    + BF16
    + r"""
#include <omp.h>

#define BLOCK 256

/* s[i] = g[i] / (1 + exp(-g[i])) and, when sig is given, sig[i] = 1 / (1 + exp(-g[i])), i < n */
static inline void silu(const float *g, float *s, float *sig, int n) {
    int i = 0;
#ifdef VW
    for (; i + VW <= n; i += VW) {
        vec x = VLOAD(g + i);
        vec d = VADD(VSET1(1.0f), vexp(VSUB(VZERO, x)));
        VSTORE(s + i, VDIV(x, d));
        if (sig) VSTORE(sig + i, VDIV(VSET1(1.0f), d));
    }
#endif
    for (; i < n; i++) {
        float d = 1.0f + expf(-g[i]);
        s[i] = g[i] / d;
        if (sig) sig[i] = 1.0f / d;
    }
}

#define KERNELS(T, CT)                                                                                 \
void swiglu_fwd_##T(const CT *h, int64_t rows, int64_t stride, int64_t hidden, CT *out, int nthreads) {\
    int nt = rows * hidden < (1 << 15) ? 1 : nthreads;                                                 \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                       \
    for (int64_t r = 0; r < rows; r++) {                                                               \
        float g[BLOCK], s[BLOCK];                                                                      \
        const CT *gate = h + r * stride, *up = gate + hidden;                                          \
        CT *o = out + r * hidden;                                                                      \
        for (int64_t j = 0; j < hidden; j += BLOCK) {                                                  \
            int n = hidden - j < BLOCK ? (int)(hidden - j) : BLOCK;                                    \
            for (int i = 0; i < n; i++) g[i] = IN_##T(gate[j + i]);                                    \
            silu(g, s, 0, n);                                                                          \
            for (int i = 0; i < n; i++) o[j + i] = OUT_##T(ROUND_##T(s[i]) * IN_##T(up[j + i]));       \
        }                                                                                              \
    }                                                                                                  \
}                                                                                                      \
void swiglu_bwd_##T(const CT *h, int64_t rows, int64_t stride, int64_t hidden, const CT *go,          \
                    CT *dh, int nthreads) {                                                            \
    int nt = rows * hidden < (1 << 15) ? 1 : nthreads;                                                 \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                       \
    for (int64_t r = 0; r < rows; r++) {                                                               \
        float g[BLOCK], s[BLOCK], sig[BLOCK];                                                          \
        const CT *gate = h + r * stride, *up = gate + hidden, *d = go + r * hidden;                    \
        CT *dg = dh + r * 2 * hidden, *du = dg + hidden;                                               \
        for (int64_t j = 0; j < hidden; j += BLOCK) {                                                  \
            int n = hidden - j < BLOCK ? (int)(hidden - j) : BLOCK;                                    \
            for (int i = 0; i < n; i++) g[i] = IN_##T(gate[j + i]);                                    \
            silu(g, s, sig, n);                                                                        \
            for (int i = 0; i < n; i++) {                                                              \
                float dy = IN_##T(d[j + i]);                                                           \
                float ds = ROUND_##T(dy * IN_##T(up[j + i]));                                          \
                du[j + i] = OUT_##T(dy * ROUND_##T(s[i]));                                             \
                dg[j + i] = OUT_##T(ds * (sig[i] * (1.0f + g[i] * (1.0f - sig[i]))));                  \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
}
"""
    + PER_TYPE
)


def _bind(lib: ctypes.CDLL) -> None:
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    signatures = {"swiglu_fwd": [ptr, i64, i64, i64, ptr, i32], "swiglu_bwd": [ptr, i64, i64, i64, ptr, ptr, i32]}
    bind_per_type(lib, signatures, TYPE_NAMES.values())


_LIBRARY = Library(SOURCE, "swiglu", _bind)
load, reset = _LIBRARY.load, _LIBRARY.reset  # the library or None (the torch ops); forget it


def takes(h: torch.Tensor) -> tuple[int, int] | None:
    """h's (rows, row stride) when the kernel computes ``swiglu(h)``: CPU, float32 or bfloat16 rows
    of an even width at one stride (``rows_of``), the library built, no torch.compile trace; else
    None. Pass it on to the kernel (read once per call)."""
    ok = (
        h.device.type == "cpu"
        and h.dtype in TYPE_NAMES
        and h.shape[-1] % 2 == 0
        and not torch.compiler.is_compiling()
        and load() is not None
    )
    return rows_of(h.unsqueeze(-2)) if ok else None  # (..., 1, 2H): one group a row


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, rows: int, stride: int) -> torch.Tensor:  # type: ignore[override]
        hidden = h.shape[-1] // 2
        out = torch.empty(*h.shape[:-1], hidden, dtype=h.dtype)
        getattr(load(), f"swiglu_fwd_{TYPE_NAMES[h.dtype]}")(
            h.data_ptr(), rows, stride, hidden, out.data_ptr(), torch.get_num_threads()
        )
        ctx.save_for_backward(h)
        ctx.rows, ctx.stride = rows, stride
        return out

    @staticmethod
    def backward(ctx, go: torch.Tensor):  # type: ignore[override]
        (h,) = ctx.saved_tensors
        go = go.to(h.dtype).contiguous()
        dh = torch.empty(h.shape, dtype=h.dtype)
        getattr(load(), f"swiglu_bwd_{TYPE_NAMES[h.dtype]}")(
            h.data_ptr(), ctx.rows, ctx.stride, h.shape[-1] // 2, go.data_ptr(), dh.data_ptr(), torch.get_num_threads()
        )
        return dh, None, None


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for h = gate|up (..., 2H) -> (..., H) in h's dtype: the kernel where
    ``takes(h)``, else the torch ops."""
    layout = takes(h)
    if layout:
        return _SwiGLU.apply(h, *layout)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up
