"""The vector vocabulary of gradtune's C kernels (one source text, prepended to a kernel's own).

``HEADER`` defines, for the widest float vectors the build's ``-march=native`` offers,

    vec, VW (floats a vector: 16 with AVX-512, 8 with AVX2 + FMA; undefined with neither)
    VZERO VLOAD VSTORE VSET1 VFMA VMUL VADD VSUB VDIV VMAX VMIN VROUND VPOW2 VZERO_BELOW
    vsum(v), vhmax(v)      horizontal sum and max
    vexp(x)                Cephes' expf: n = round(x log2 e), r = x - n ln 2 in two parts, a
                           degree-7 polynomial for exp r, times 2^n; 0 below EXP_LO

so that a kernel writes its loops once for both widths and keeps a portable path (``#ifndef VW``)
for CPUs with neither. ``BF16`` (appended by kernels that read or write bfloat16) converts one value
each way, rounding to nearest even as torch does, and names the element types ``f32`` / ``bf16``
for kernels generated per type: ``IN_T(v)`` to float, ``OUT_T(v)`` from float, ``ROUND_T(v)`` to
the type's precision and back; ``PER_TYPE`` instantiates a kernel's ``KERNELS(T, CT)`` macro for
both, and ``TYPE_NAMES`` maps torch dtypes to those names.
"""

import torch

HEADER = r"""
#include <stdint.h>
#include <math.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
typedef __m512 vec;
#define VW 16
#define VZERO _mm512_setzero_ps()
#define VLOAD _mm512_loadu_ps
#define VSTORE _mm512_storeu_ps
#define VSET1 _mm512_set1_ps
#define VFMA _mm512_fmadd_ps
#define VMUL _mm512_mul_ps
#define VADD _mm512_add_ps
#define VSUB _mm512_sub_ps
#define VDIV _mm512_div_ps
#define VMAX _mm512_max_ps
#define VMIN _mm512_min_ps
#define VROUND(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define VPOW2(n) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23))
#define VZERO_BELOW(y, x, t) _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, VSET1(t), _CMP_GE_OQ), y)
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
static inline float vhmax(vec v) { return _mm512_reduce_max_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
#define VW 8
#define VZERO _mm256_setzero_ps()
#define VLOAD _mm256_loadu_ps
#define VSTORE _mm256_storeu_ps
#define VSET1 _mm256_set1_ps
#define VFMA _mm256_fmadd_ps
#define VMUL _mm256_mul_ps
#define VADD _mm256_add_ps
#define VSUB _mm256_sub_ps
#define VDIV _mm256_div_ps
#define VMAX _mm256_max_ps
#define VMIN _mm256_min_ps
#define VROUND(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define VPOW2(n) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23))
#define VZERO_BELOW(y, x, t) _mm256_and_ps(y, _mm256_cmp_ps(x, VSET1(t), _CMP_GE_OQ))
static inline float vsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float vhmax(vec v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#define EXP_LO -87.33654f   /* below: exp underflows; written as 0 */
#define EXP_HI 88.3762626647949f

#ifdef VW

/* Cephes expf: n = round(x log2 e), r = x - n ln 2 in two parts, exp r by a degree-7 polynomial. */
static inline vec vexp(vec x) {
    vec xc = VMIN(VMAX(x, VSET1(EXP_LO)), VSET1(EXP_HI));
    vec n = VROUND(VMUL(xc, VSET1(1.44269504088896341f)));
    vec r = VFMA(n, VSET1(-0.693359375f), xc);
    r = VFMA(n, VSET1(2.12194440e-4f), r);
    vec p = VSET1(1.9875691500e-4f);
    p = VFMA(p, r, VSET1(1.3981999507e-3f));
    p = VFMA(p, r, VSET1(8.3334519073e-3f));
    p = VFMA(p, r, VSET1(4.1665795894e-2f));
    p = VFMA(p, r, VSET1(1.6666665459e-1f));
    p = VFMA(p, r, VSET1(5.0000001201e-1f));
    p = VFMA(p, VMUL(r, r), VADD(r, VSET1(1.0f)));
    return VZERO_BELOW(VMUL(p, VPOW2(n)), x, EXP_LO);
}
#endif  /* VW */
"""

BF16 = r"""
#include <string.h>
static inline float bf16_in(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t bf16_out(float f) {  /* round to nearest even; NaN stays NaN */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline float bf16_round(float f) { return bf16_in(bf16_out(f)); }
#define IN_f32(v) (v)
#define IN_bf16(v) bf16_in(v)
#define OUT_f32(v) (v)
#define OUT_bf16(v) bf16_out(v)
#define ROUND_f32(v) (v)
#define ROUND_bf16(v) bf16_round(v)
"""

PER_TYPE = """
KERNELS(f32, float)
KERNELS(bf16, uint16_t)
"""
TYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16"}  # the suffix of each instantiated function
