"""Float32 decoding steps of a Llama-family model in C (models/fast_decoder.py's fast path on the
CPU, bound by models/decode_step.py): at batch 1 the whole step in one call, in batches the steps
between the GEMMs.

Why: at batch 1 a step reads every weight once (a GEMV per projection: memory-bound) and does
little else, but through torch ops it is ~35 kernel calls a layer, each a few microseconds of
dispatch (bench/generate.py prints the step's time beside its GEMMs alone). Here the whole step
-- per layer RMSNorm, q/k/v (+ biases), rotary, the KV cache write, attention over the cache, o,
RMSNorm, gate/up, SiLU * up, down, both residual adds; then the final norm and the head -- runs in
one OpenMP parallel region on torch's thread pool: the GEMVs split by rows, attention by heads,
the rest by one thread between barriers. The batch helpers (``add_rms_f32``, ``silu_mul_f32``,
``attend_f32``) share these pieces, attention's masked form included.

The arithmetic is transformers' (LlamaRMSNorm, rotate_half rotary, softmax attention with the
layer's scale, SiLU MLP); sums run in a different order than MKL's and oneDNN's, so logits agree
to float32 rounding, not bit for bit (greedy text agrees unless two logits tie within it).
None from ``load`` (no compiler, a failed build): the torch ops path.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from gradtune.runtime.c_build import Library

SOURCE = r"""
#include <stdint.h>
#include <math.h>
#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

/* Per layer, in this order (NULL where a layer has no bias). */
enum { NORM_IN, WQ, WK, WV, BQ, BK, BV, WO, NORM_POST, WG, WU, WD, KC, VC, NPTR };

/* y[r] (+)= W[r, :] . x for r in [r0, r1). Eight rows a pass share each load of x and keep eight
   read streams open (memory-bound: what counts is bytes of W a second). Explicit FMA vectors where
   the CPU has them (a `#pragma omp simd` reduction keeps one accumulator chain and is slower), a
   portable loop elsewhere. */
#if defined(__AVX512F__)
typedef __m512 vec;
#define VW 16
#define VZERO _mm512_setzero_ps()
#define VLOAD _mm512_loadu_ps
#define VFMA _mm512_fmadd_ps
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
#define VW 8
#define VZERO _mm256_setzero_ps()
#define VLOAD _mm256_loadu_ps
#define VFMA _mm256_fmadd_ps
static inline float vsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

static void gemv(float *y, const float *W, const float *x, int64_t r0, int64_t r1, int64_t n, int add) {
    int64_t r = r0;
#ifdef VW
    for (; r + 8 <= r1; r += 8) {
        const float *w = W + r * n;
        vec a[8];
        for (int j = 0; j < 8; j++) a[j] = VZERO;
        int64_t i = 0;
        for (; i + VW <= n; i += VW) {
            vec xv = VLOAD(x + i);
            #pragma GCC unroll 8
            for (int j = 0; j < 8; j++) a[j] = VFMA(VLOAD(w + j * n + i), xv, a[j]);
        }
        for (int j = 0; j < 8; j++) {
            float s = vsum(a[j]);
            for (int64_t k = i; k < n; k++) s += w[j * n + k] * x[k];
            y[r + j] = add ? y[r + j] + s : s;
        }
    }
#endif
    for (; r < r1; r++) {
        const float *w = W + r * n;
        float s = 0;
        #pragma omp simd reduction(+:s)
        for (int64_t i = 0; i < n; i++) s += w[i] * x[i];
        y[r] = add ? y[r] + s : s;
    }
}

/* This thread's share of rows [0, rows), in blocks of 8 (static, like omp for). */
static void share(int64_t rows, int64_t *r0, int64_t *r1) {
    int nt = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t blocks = (rows + 7) / 8, per = blocks / nt, extra = blocks % nt;
    int64_t b0 = t * per + (t < extra ? t : extra), b1 = b0 + per + (t < extra);
    *r0 = b0 * 8 < rows ? b0 * 8 : rows;
    *r1 = b1 * 8 < rows ? b1 * 8 : rows;
}

static void gemv_shared(float *y, const float *W, const float *x, int64_t rows, int64_t n, int add) {
    int64_t r0, r1;
    share(rows, &r0, &r1);
    gemv(y, W, x, r0, r1, n, add);
}

/* LlamaRMSNorm in float32: w * (x / sqrt(mean(x^2) + eps)). */
static void rms(float *out, const float *x, const float *w, int64_t n, float eps) {
    float ss = 0;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

/* x cos + rotate_half(x) sin for each of `heads` vectors of d: sin_signed = (-sin1, sin2). */
static void rope(float *x, int heads, int d, const float *cos, const float *sin_signed) {
    int half = d / 2;
    for (int h = 0; h < heads; h++) {
        float *v = x + (int64_t)h * d;
        for (int i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            v[i] = a * cos[i] + b * sin_signed[i];
            v[i + half] = b * cos[i + half] + a * sin_signed[i + half];
        }
    }
}

/* One head's attention of query q (d) over keys/values k, v (len, d), the keys j where ok[j] is
   set (ok NULL: all; the query's own key always is): out (d). p: len floats. */
static void attend(float *out, const float *q, const float *k, const float *v, int64_t len, int d,
                   float scale, const uint8_t *ok, float *p) {
    float m = -INFINITY;
    for (int64_t j = 0; j < len; j++) {
        float s = -INFINITY;
        if (!ok || ok[j]) {
            const float *kj = k + j * d;
            s = 0;
            #pragma omp simd reduction(+:s)
            for (int i = 0; i < d; i++) s += q[i] * kj[i];
            s *= scale;
        }
        p[j] = s;
        m = s > m ? s : m;
    }
    float sum = 0;
    for (int64_t j = 0; j < len; j++) { p[j] = p[j] == -INFINITY ? 0 : expf(p[j] - m); sum += p[j]; }
    for (int i = 0; i < d; i++) out[i] = 0;
    for (int64_t j = 0; j < len; j++) {
        if (p[j] == 0) continue;
        const float *vj = v + j * d;
        float pj = p[j] / sum;
        #pragma omp simd
        for (int i = 0; i < d; i++) out[i] += pj * vj[i];
    }
}

/* y = W x, W (rows, n): the step's GEMV alone (bench/generate.py times it). */
void gemv_f32(float *y, const float *W, const float *x, int64_t rows, int64_t n, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    gemv_shared(y, W, x, rows, n, 0);
}

/* ptrs: layers * NPTR pointers; eps: layers * 2 (input, post-attention); dims: hidden, heads,
   kv_heads, head dim, intermediate, cache capacity, vocabulary, layers. pos: the token's position
   (its cache row). scratch: hidden * 2 + (heads + 2 kv_heads) d + heads d + 2 inter
   + heads * (pos + 1) floats. */
void decode_f32(const float *const *ptrs, const float *eps, const int64_t *dims, float scale,
                const float *embed_row, const float *cos, const float *sin_signed, int64_t pos,
                const float *norm_f, float eps_f, const float *head_w, float *logits, float *scratch,
                int nthreads) {
    const int64_t hidden = dims[0], inter = dims[4], cap = dims[5], vocab = dims[6];
    const int heads = (int)dims[1], kvh = (int)dims[2], d = (int)dims[3], layers = (int)dims[7];
    const int64_t len = pos + 1, qd = (int64_t)heads * d, kd = (int64_t)kvh * d;
    float *x = scratch, *xn = x + hidden, *q = xn + hidden, *k = q + qd, *v = k + kd;
    float *att = v + kd, *g = att + qd, *u = g + inter, *p = u + inter;
    for (int64_t i = 0; i < hidden; i++) x[i] = embed_row[i];
    #pragma omp parallel num_threads(nthreads)
    {
        for (int l = 0; l < layers; l++) {
            const float *const *w = ptrs + (int64_t)l * NPTR;
            #pragma omp single
            rms(xn, x, w[NORM_IN], hidden, eps[2 * l]);
            gemv_shared(q, w[WQ], xn, qd, hidden, 0);
            gemv_shared(k, w[WK], xn, kd, hidden, 0);
            gemv_shared(v, w[WV], xn, kd, hidden, 0);
            #pragma omp barrier
            #pragma omp single
            {
                if (w[BQ]) for (int64_t i = 0; i < qd; i++) q[i] += w[BQ][i];
                if (w[BK]) for (int64_t i = 0; i < kd; i++) k[i] += w[BK][i];
                if (w[BV]) for (int64_t i = 0; i < kd; i++) v[i] += w[BV][i];
                rope(q, heads, d, cos, sin_signed);
                rope(k, kvh, d, cos, sin_signed);
                float *kc = (float *)w[KC], *vc = (float *)w[VC];  /* (kv_heads, cap, d) */
                for (int h = 0; h < kvh; h++)
                    for (int i = 0; i < d; i++) {
                        kc[((int64_t)h * cap + pos) * d + i] = k[(int64_t)h * d + i];
                        vc[((int64_t)h * cap + pos) * d + i] = v[(int64_t)h * d + i];
                    }
            }
            #pragma omp for schedule(static)
            for (int h = 0; h < heads; h++) {
                int64_t kv = (int64_t)(h / (heads / kvh)) * cap * d;
                attend(att + (int64_t)h * d, q + (int64_t)h * d, w[KC] + kv, w[VC] + kv, len, d, scale, 0, p + h * len);
            }
            gemv_shared(x, w[WO], att, hidden, qd, 1);  /* x += o(att) */
            #pragma omp barrier
            #pragma omp single
            rms(xn, x, w[NORM_POST], hidden, eps[2 * l + 1]);
            gemv_shared(g, w[WG], xn, inter, hidden, 0);
            gemv_shared(u, w[WU], xn, inter, hidden, 0);
            #pragma omp barrier
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < inter; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
            gemv_shared(x, w[WD], g, hidden, inter, 1);  /* x += down(silu(g) * u) */
            #pragma omp barrier
        }
        #pragma omp single
        rms(xn, x, norm_f, hidden, eps_f);
        gemv_shared(logits, head_w, xn, vocab, hidden, 0);
    }
}

/* Batches (B > 1): the steps between the packed GEMMs (fast_decoder's float32 path), one call each. */

/* Per row b of B: x[b] += delta[b] (delta may be NULL), then xn[b] = rms(x[b]) w (w may be NULL). */
void add_rms_f32(float *x, const float *delta, const float *w, float eps, float *xn, int64_t rows, int64_t hidden) {
    for (int64_t b = 0; b < rows; b++) {
        float *xb = x + b * hidden;
        if (delta) for (int64_t i = 0; i < hidden; i++) xb[i] += delta[b * hidden + i];
        if (w) rms(xn + b * hidden, xb, w, hidden, eps);
    }
}

/* h (B, inter) = silu(gu[:, :inter]) * gu[:, inter:], gu (B, 2 inter) the gate/up GEMM's output. */
void silu_mul_f32(float *h, const float *gu, int64_t rows, int64_t inter, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < rows; b++)
        for (int64_t i = 0; i < inter; i++) {
            float g = gu[b * 2 * inter + i];
            h[b * inter + i] = g / (1.0f + expf(-g)) * gu[b * 2 * inter + inter + i];
        }
}

/* One (B, 1) step's attention. y (B, (heads + 2 kv_heads) d): the q/k/v GEMM's output; rotary at
   row b's position pos[b]; k, v written to cache row `at` of kc/vc (B, kv_heads, cap, d); each
   query attends to rows <= at where valid (B, cap) is set (NULL: all). att (B, heads d); scratch:
   B heads (d + cap) floats. */
void attend_f32(float *y, float *kc, float *vc, int64_t rows, int heads, int kvh, int d, int64_t cap,
                int64_t at, const int64_t *pos, const float *cos, const float *sin_signed,
                const uint8_t *valid, float scale, float *att, float *scratch, int nthreads) {
    const int64_t width = (int64_t)(heads + 2 * kvh) * d, len = at + 1;
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp for schedule(static)
        for (int64_t bg = 0; bg < rows * kvh; bg++) {
            int64_t b = bg / kvh, g = bg % kvh;
            float *k = y + b * width + (int64_t)(heads + g) * d, *v = k + (int64_t)kvh * d;
            rope(k, 1, d, cos + pos[b] * d, sin_signed + pos[b] * d);
            float *kr = kc + ((b * kvh + g) * cap + at) * d, *vr = vc + ((b * kvh + g) * cap + at) * d;
            for (int i = 0; i < d; i++) { kr[i] = k[i]; vr[i] = v[i]; }
        }
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < rows * heads; bh++) {
            int64_t b = bh / heads, h = bh % heads, g = h / (heads / kvh);
            float *q = scratch + bh * (d + cap), *p = q + d;
            for (int i = 0; i < d; i++) q[i] = y[b * width + h * d + i];
            rope(q, 1, d, cos + pos[b] * d, sin_signed + pos[b] * d);
            int64_t kv = (b * kvh + g) * cap * d;
            attend(att + b * (int64_t)heads * d + h * d, q, kc + kv, vc + kv, len, d, scale,
                   valid ? valid + b * cap : 0, p);
        }
    }
}
"""


def _bind(lib: ctypes.CDLL) -> None:
    ptr, f32, i64, i32 = ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_int
    lib.decode_f32.argtypes = [ptr, ptr, ptr, f32, ptr, ptr, ptr, i64, ptr, f32, ptr, ptr, ptr, i32]
    lib.gemv_f32.argtypes = [ptr, ptr, ptr, i64, i64, i32]
    lib.add_rms_f32.argtypes = [ptr, ptr, ptr, f32, ptr, i64, i64]
    lib.silu_mul_f32.argtypes = [ptr, ptr, i64, i64, i32]
    lib.attend_f32.argtypes = [ptr, ptr, ptr, i64, i32, i32, i32, i64, i64, ptr, ptr, ptr, ptr, f32, ptr, ptr, i32]
    for f in (lib.decode_f32, lib.gemv_f32, lib.add_rms_f32, lib.silu_mul_f32, lib.attend_f32):
        f.restype = None


_LIBRARY = Library(SOURCE, "decode_step", _bind)
load, reset = _LIBRARY.load, _LIBRARY.reset  # the library or None (fast_decoder's torch path); forget it


def gemv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """W (rows, n) times x (n): the kernel's GEMV alone, as the step runs it (float32, contiguous)."""
    lib = load()
    assert lib is not None and plain(w) and plain(x)
    y = torch.empty(w.shape[0])
    lib.gemv_f32(y.data_ptr(), w.data_ptr(), x.data_ptr(), w.shape[0], w.shape[1], torch.get_num_threads())
    return y


def plain(t: Optional[torch.Tensor]) -> bool:
    """None, or a contiguous float32 CPU tensor: what the kernels read through a pointer."""
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())
