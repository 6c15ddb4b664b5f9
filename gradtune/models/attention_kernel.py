"""The C side of models/fused_attention.py: float32 attention (dropout, causal, grouped k/v heads),
one OpenMP task per (batch, head) forward and per (batch, k/v head) backward (the arithmetic and
the why are there). Built once per machine
by runtime/c_build.py; ``attn_width`` is the vector width in floats (16 AVX-512, 8 AVX2, 0 where
the CPU has neither: no kernel). ``load`` gives None without a compiler or on a failed build."""

from __future__ import annotations

import ctypes

from gradtune.models.mask_kernel import LEVEL
from gradtune.runtime.c_build import Library
from gradtune.runtime.c_vectors import HEADER

SOURCE = (
    HEADER
    + LEVEL
    + r"""
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#ifdef VW
int attn_width(void) { return VW; }
#if VW == 16
#define CB 4      /* score columns a pass: CB vectors */
#define RB 6      /* query rows a pass (6 x 4 accumulators of 32 registers) */
#else
#define CB 2
#define RB 4
#endif

/* One row: p (s scores) -> softmax(scale * p + bias) in place, and pd = p * mk (the dropped row;
   mk NULL: no dropout, pd unused): three passes (scale, bias and max; exp and sum; normalise and mask). */
static void softmax_row(float *p, float *pd, const float *mk, const float *bias, float scale, int64_t s) {
    int64_t j = 0;
    vec mv = VSET1(-INFINITY), sc = VSET1(scale);
    for (; j + VW <= s; j += VW) {
        vec x = VMUL(VLOAD(p + j), sc);
        if (bias) x = VADD(x, VLOAD(bias + j));
        VSTORE(p + j, x);
        mv = VMAX(mv, x);
    }
    float m = vhmax(mv);
    for (; j < s; j++) {
        p[j] = p[j] * scale + (bias ? bias[j] : 0.0f);
        m = p[j] > m ? p[j] : m;
    }
    vec sv = VZERO;
    mv = VSET1(m);
    for (j = 0; j + VW <= s; j += VW) {
        vec e = vexp(VSUB(VLOAD(p + j), mv));
        VSTORE(p + j, e);
        sv = VADD(sv, e);
    }
    float sum = vsum(sv);
    for (; j < s; j++) { float e = p[j] - m < EXP_LO ? 0.0f : expf(p[j] - m); p[j] = e; sum += e; }
    float inv = 1.0f / sum;
    vec iv = VSET1(inv);
    if (!mk) {
        for (j = 0; j + VW <= s; j += VW) VSTORE(p + j, VMUL(VLOAD(p + j), iv));
        for (; j < s; j++) p[j] *= inv;
        return;
    }
    for (j = 0; j + VW <= s; j += VW) {
        vec x = VMUL(VLOAD(p + j), iv);
        VSTORE(p + j, x);
        VSTORE(pd + j, VMUL(x, VLOAD(mk + j)));
    }
    for (; j < s; j++) { p[j] *= inv; pd[j] = p[j] * mk[j]; }
}

/* Dims: B, H, T, S, D. Strides (elements) of q, k, v, out/go-like tensors: [b, h, t], d contiguous. */
typedef struct { int64_t b, h, t; } strides;

#define AI static inline __attribute__((always_inline))

/* sc[r][j] = sum_d q[r][d] kt[d][j] for R rows (stride qst), the first s columns, s whole vectors (PAD:
   the callers' zero-padded kt, D x (its row stride kts >= s)); sc rows s apart. */
AI void scores(const int R, float *sc, const float *q, int64_t qst, const float *kt, int64_t kts, int64_t s,
               int64_t d) {
    int64_t j = 0;
    for (; j + CB * VW <= s; j += CB * VW) {
        vec acc[RB][CB];
        for (int r = 0; r < R; r++) for (int c = 0; c < CB; c++) acc[r][c] = VZERO;
        for (int64_t e = 0; e < d; e++) {
            vec kv[CB];
            for (int c = 0; c < CB; c++) kv[c] = VLOAD(kt + e * kts + j + c * VW);
            for (int r = 0; r < R; r++) {
                vec qb = VSET1(q[r * qst + e]);
                for (int c = 0; c < CB; c++) acc[r][c] = VFMA(qb, kv[c], acc[r][c]);
            }
        }
        for (int r = 0; r < R; r++) for (int c = 0; c < CB; c++) VSTORE(sc + r * s + j + c * VW, acc[r][c]);
    }
    for (; j + VW <= s; j += VW) {
        vec acc[RB];
        for (int r = 0; r < R; r++) acc[r] = VZERO;
        for (int64_t e = 0; e < d; e++) {
            vec kv = VLOAD(kt + e * kts + j);
            for (int r = 0; r < R; r++) acc[r] = VFMA(VSET1(q[r * qst + e]), kv, acc[r]);
        }
        for (int r = 0; r < R; r++) VSTORE(sc + r * s + j, acc[r]);
    }
}

/* o[r] = mul * sum_j w[r][j] m[j-row] (ND vectors) for R rows, j < s: w rows ws apart, m rows mst. */
AI void combine(const int R, const int ND, float *o, int64_t ost, const float *w, int64_t ws, const float *m,
                int64_t mst, int64_t s, float mul) {
    vec acc[RB][8];
    for (int r = 0; r < R; r++) for (int n = 0; n < ND; n++) acc[r][n] = VZERO;
    for (int64_t j = 0; j < s; j++) {
        vec mv[8];
        for (int n = 0; n < ND; n++) mv[n] = VLOAD(m + j * mst + n * VW);
        for (int r = 0; r < R; r++) {
            vec b = VSET1(w[r * ws + j]);
            for (int n = 0; n < ND; n++) acc[r][n] = VFMA(b, mv[n], acc[r][n]);
        }
    }
    vec mu = VSET1(mul);
    for (int r = 0; r < R; r++) for (int n = 0; n < ND; n++) VSTORE(o + r * ost + n * VW, VMUL(acc[r][n], mu));
}

/* acc[j] += sum_r w[r][j] x[r] (ND vectors) for every j < s (w rows ws apart): a rank-R update of an s x D buffer. */
AI void rank_update(const int R, const int ND, float *acc, const float *w, int64_t ws, const float *x, int64_t xst,
                    int64_t s) {
    vec xv[RB][8];
    for (int r = 0; r < R; r++) for (int n = 0; n < ND; n++) xv[r][n] = VLOAD(x + r * xst + n * VW);
    const int64_t d = ND * VW;
    for (int64_t j = 0; j < s; j++) {
        vec a[8];
        for (int n = 0; n < ND; n++) a[n] = VLOAD(acc + j * d + n * VW);
        for (int r = 0; r < R; r++) {
            vec b = VSET1(w[r * ws + j]);
            for (int n = 0; n < ND; n++) a[n] = VFMA(b, xv[r][n], a[n]);
        }
        for (int n = 0; n < ND; n++) VSTORE(acc + j * d + n * VW, a[n]);
    }
}

/* dst (rows x d, dense) = src (rows x d, row stride st). The kernels read k and v from such a copy:
   a head-split source puts its rows H * d floats apart, and reading a column of them, or a vector
   from each row in turn, maps the rows onto a few cache sets that evict each other. */
static void dense(float *dst, const float *src, int64_t rows, int64_t st, int64_t d) {
    for (int64_t j = 0; j < rows; j++) memcpy(dst + j * d, src + j * st, d * sizeof(float));
}

/* dst (d x sp) = src (rows x d, dense)^T, columns rows .. sp zero. */
static void transpose(float *dst, const float *src, int64_t rows, int64_t sp, int64_t d) {
    for (int64_t e = 0; e < d; e++) {
        for (int64_t j = 0; j < rows; j++) dst[e * sp + j] = src[j * d + e];
        for (int64_t j = rows; j < sp; j++) dst[e * sp + j] = 0.0f;
    }
}

/* Keys rounded up to whole vectors: the products with k^T (scores) compute that many columns (a scalar tail
   costs about what the vectors do) from zero-padded copies; softmax, mask, products with v stop at the keys. */
#define PAD(n) (((n) + VW - 1) / VW * VW)

static void mask_row(float *m, uint64_t seed, int64_t base, int64_t s, int32_t drop) {
    for (int64_t j = 0; j < s; j++) m[j] = (int32_t)level(seed, base + j) >= drop ? 1.0f : 0.0f;
}

/* Forward of R query rows of one head: their scores over the first s keys (P rows PAD(s) apart); row r
   attends to its first lim + r keys (causal; lim >= s: all s), the rest of its row is 0. Row r's
   mask elements start at base + r * SS (SS: all the keys), the composite path's index; drop <= 0
   (p = 0): no mask, the probabilities themselves multiply v. */
AI void fwd_rows(const int R, const int ND, float *P, float *pd, float *mk, const float *q, strides qs,
                 const float *kt, int64_t kts, const float *v, strides vs, const float *bias, strides bs, float *o,
                 strides os, int64_t s, int64_t lim, float scale, float inv_kq, uint64_t seed, int64_t base,
                 int64_t SS, int32_t drop) {
    const int64_t d = ND * VW, pw = PAD(s);
    scores(R, P, q, qs.t, kt, kts, pw, d);  /* P rows pw apart */
    for (int r = 0; r < R; r++) {
        int64_t n = lim + r < s ? lim + r : s;
        if (drop > 0) mask_row(mk + r * pw, seed, base + r * SS, n, drop);
        softmax_row(P + r * pw, pd + r * pw, drop > 0 ? mk + r * pw : NULL, bias ? bias + r * bs.t : NULL, scale, n);
        for (int64_t j = n; j < s; j++) P[r * pw + j] = pd[r * pw + j] = 0.0f;
    }
    combine(R, ND, o, os.t, drop > 0 ? pd : P, pw, v, vs.t, s, inv_kq);
}

typedef struct {
    int64_t B, H, T, S, D;
    strides q, k, v, o, bias;  /* o: the output (forward) or the output gradient (backward) */
    strides gq, gk, gv;        /* backward's outputs */
    float scale, inv_kq;
    uint64_t seed;
    int32_t drop;
    int32_t causal;            /* query i sees keys 0 .. i + S - T (T <= S) */
    int64_t G;                 /* query heads per k/v head: k, v, gk, gv have H / G heads */
} shape;

/* Keys a block of rows starting at row i computes (P rows that far apart) and the valid keys of
   its first row: all S, or causal up to the block's last row. */
static int64_t block_keys(const shape *a, int64_t i, int R) {
    int64_t n = PAD(i + R + a->S - a->T);  /* whole vectors, as the products with k^T compute them */
    return a->causal && n < a->S ? n : a->S;
}

static int64_t first_valid(const shape *a, int64_t i) { return a->causal ? i + 1 + a->S - a->T : a->S; }

/* probs NULL (no backward to follow): each block's probabilities live in the task's ps (RB x PAD(S)). */
AI void fwd_head(const int ND, const shape *a, float *out, float *probs, const float *q, const float *k,
                 const float *v, const float *bias, int64_t bh, float *kt, float *kc, float *vc, float *pd, float *mk,
                 float *ps) {
    int64_t b = bh / a->H, h = bh % a->H, T = a->T, S = a->S, D = a->D, kh_ = h / a->G;
    const float *qh = q + b * a->q.b + h * a->q.h, *kh = k + b * a->k.b + kh_ * a->k.h;
    const float *vh = v + b * a->v.b + kh_ * a->v.h;
    const float *bh_ = bias ? bias + b * a->bias.b + h * a->bias.h : NULL;
    float *oh = out + b * a->o.b + h * a->o.h, *ph = probs ? probs + bh * T * PAD(S) : NULL;
    dense(kc, kh, S, a->k.t, D);
    dense(vc, vh, S, a->v.t, D);
    transpose(kt, kc, S, PAD(S), D);
    strides ds = {0, 0, D};
    int64_t i = 0;
    for (; i + RB <= T; i += RB)
        fwd_rows(RB, ND, ph ? ph + i * PAD(S) : ps, pd, mk, qh + i * a->q.t, a->q, kt, PAD(S), vc, ds,
                 bh_ ? bh_ + i * a->bias.t : NULL, a->bias, oh + i * a->o.t, a->o, block_keys(a, i, RB),
                 first_valid(a, i), a->scale, a->inv_kq, a->seed, (bh * T + i) * S, S, a->drop);
    for (; i < T; i++)
        fwd_rows(1, ND, ph ? ph + i * PAD(S) : ps, pd, mk, qh + i * a->q.t, a->q, kt, PAD(S), vc, ds,
                 bh_ ? bh_ + i * a->bias.t : NULL, a->bias, oh + i * a->o.t, a->o, block_keys(a, i, 1),
                 first_valid(a, i), a->scale, a->inv_kq, a->seed, (bh * T + i) * S, S, a->drop);
}

/* The head-size switch: ND (vectors a head) is a compile-time constant in each case. */
#define BY_ND(nd, call) \
    switch (nd) { \
    case 1: call(1); break; case 2: call(2); break; case 3: call(3); break; case 4: call(4); break; \
    case 5: call(5); break; case 6: call(6); break; case 7: call(7); break; case 8: call(8); break; \
    }

void attn_fwd(const shape *a, float *out, float *probs, const float *q, const float *k, const float *v,
              const float *bias, int nthreads) {
    int64_t n = a->B * a->H, nd = a->D / VW, sp = PAD(a->S);
    int nt = n < nthreads ? (int)n : nthreads;
    #pragma omp parallel num_threads(nt)
    {
        float *kt = aligned_alloc(64, ((a->D * sp + 15) / 16) * 64);
        float *pd = aligned_alloc(64, ((RB * sp + 15) / 16) * 64);
        float *mk = aligned_alloc(64, ((RB * sp + 15) / 16) * 64);
        float *kc = aligned_alloc(64, ((a->D * a->S + 15) / 16) * 64);
        float *vc = aligned_alloc(64, ((a->D * a->S + 15) / 16) * 64);
        float *ps = probs ? NULL : aligned_alloc(64, ((RB * sp + 15) / 16) * 64);
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < n; bh++) {
#define FWD(N) fwd_head(N, a, out, probs, q, k, v, bias, bh, kt, kc, vc, pd, mk, ps)
            BY_ND(nd, FWD)
#undef FWD
        }
        free(kt); free(kc); free(vc); free(pd); free(mk); free(ps);
    }
}

/* Backward of R query rows: dq rows out; dk, dv accumulated in gka, gva (S x D) over the first s
   keys, as forward computed them (P rows PAD(s) apart, 0 past each row's valid keys: their dS and
   dropped P are 0 too). vt is D x PAD(SS); row r's mask starts at base + r * SS. */
AI void bwd_rows(const int R, const int ND, const float *P, float *ds, float *pd, float *mk, float *g,
                 const float *go, strides gos, const float *q, strides qs, const float *k, strides ks,
                 const float *vt, float *gq, strides gqs, float *gka, float *gva,
                 int64_t s, float scale, float inv_kq, uint64_t seed, int64_t base, int64_t SS, int32_t drop) {
    const int64_t d = ND * VW;
    for (int r = 0; r < R; r++) for (int64_t e = 0; e < d; e++) g[r * d + e] = go[r * gos.t + e] * inv_kq;
    const int64_t pw = PAD(s);  /* P, ds, pd, mk rows pw apart, as forward stored P */
    scores(R, ds, g, d, vt, PAD(SS), pw, d);  /* (go * inv_kq) v^T */
    if (drop <= 0) {  /* no mask: dS = P * (dP - rowsum(dP * P)), and P itself multiplies into dv */
        for (int r = 0; r < R; r++) {
            const float *p = P + r * pw;
            float *dr = ds + r * pw;
            vec cv = VZERO;
            int64_t j = 0;
            for (; j + VW <= s; j += VW) cv = VFMA(VLOAD(dr + j), VLOAD(p + j), cv);
            float c = vsum(cv);
            for (; j < s; j++) c += dr[j] * p[j];
            vec cc = VSET1(c);
            for (j = 0; j + VW <= s; j += VW) VSTORE(dr + j, VMUL(VLOAD(p + j), VSUB(VLOAD(dr + j), cc)));
            for (; j < s; j++) dr[j] = p[j] * (dr[j] - c);
        }
        combine(R, ND, gq, gqs.t, ds, pw, k, ks.t, s, scale);
        rank_update(R, ND, gka, ds, pw, q, qs.t, s);
        rank_update(R, ND, gva, P, pw, g, d, s);
        return;
    }
    for (int r = 0; r < R; r++) mask_row(mk + r * pw, seed, base + r * SS, s, drop);
    for (int r = 0; r < R; r++) {
        const float *p = P + r * pw, *mr = mk + r * pw;
        float *dr = ds + r * pw, *pr = pd + r * pw;
        vec cv = VZERO;
        int64_t j = 0;
        for (; j + VW <= s; j += VW) {  /* vectors by hand: the compiler keeps a float sum in order */
            vec m = VLOAD(mr + j), pv = VLOAD(p + j), dv = VMUL(VLOAD(dr + j), m);
            VSTORE(dr + j, dv);
            VSTORE(pr + j, VMUL(pv, m));
            cv = VFMA(dv, pv, cv);
        }
        float c = vsum(cv);
        for (; j < s; j++) { dr[j] *= mr[j]; pr[j] = p[j] * mr[j]; c += dr[j] * p[j]; }
        vec cc = VSET1(c);
        for (j = 0; j + VW <= s; j += VW) { vec pv = VLOAD(p + j); VSTORE(dr + j, VMUL(pv, VSUB(VLOAD(dr + j), cc))); }
        for (; j < s; j++) dr[j] = p[j] * (dr[j] - c);
    }
    combine(R, ND, gq, gqs.t, ds, pw, k, ks.t, s, scale);
    rank_update(R, ND, gka, ds, pw, q, qs.t, s);
    rank_update(R, ND, gva, pd, pw, g, d, s);
}

/* One task: k/v head kh of batch b (bk = b * H / G + kh) and its G query heads, whose dk, dv sum in
   the task's gka, gva: no two tasks write the same rows. */
AI void bwd_head(const int ND, const shape *a, float *gq, float *gk, float *gv, const float *probs,
                 const float *go, const float *q, const float *k, const float *v, int64_t bk, float *vt,
                 float *kc, float *vc, float *ds, float *pd, float *mk, float *g, float *gka, float *gva) {
    int64_t hk = a->H / a->G, b = bk / hk, h_ = bk % hk, T = a->T, S = a->S, D = a->D, SP = PAD(S);
    const float *kh = k + b * a->k.b + h_ * a->k.h, *vh = v + b * a->v.b + h_ * a->v.h;
    dense(kc, kh, S, a->k.t, D);
    dense(vc, vh, S, a->v.t, D);
    transpose(vt, vc, S, SP, D);
    strides dn = {0, 0, D};
    memset(gka, 0, S * D * sizeof(float));
    memset(gva, 0, S * D * sizeof(float));
    for (int64_t h = h_ * a->G; h < (h_ + 1) * a->G; h++) {
        int64_t bh = b * a->H + h;
        const float *qh = q + b * a->q.b + h * a->q.h, *goh = go + b * a->o.b + h * a->o.h;
        const float *ph = probs + bh * T * SP;
        float *gqh = gq + b * a->gq.b + h * a->gq.h;
        int64_t i = 0;
        for (; i + RB <= T; i += RB)
            bwd_rows(RB, ND, ph + i * SP, ds, pd, mk, g, goh + i * a->o.t, a->o, qh + i * a->q.t, a->q, kc, dn,
                     vt, gqh + i * a->gq.t, a->gq, gka, gva, block_keys(a, i, RB), a->scale, a->inv_kq, a->seed,
                     (bh * T + i) * S, S, a->drop);
        for (; i < T; i++)
            bwd_rows(1, ND, ph + i * SP, ds, pd, mk, g, goh + i * a->o.t, a->o, qh + i * a->q.t, a->q, kc, dn,
                     vt, gqh + i * a->gq.t, a->gq, gka, gva, block_keys(a, i, 1), a->scale, a->inv_kq, a->seed,
                     (bh * T + i) * S, S, a->drop);
    }
    float *gkh = gk + b * a->gk.b + h_ * a->gk.h, *gvh = gv + b * a->gv.b + h_ * a->gv.h;
    for (int64_t j = 0; j < S; j++)
        for (int64_t e = 0; e < D; e++) {
            gkh[j * a->gk.t + e] = gka[j * D + e] * a->scale;
            gvh[j * a->gv.t + e] = gva[j * D + e];
        }
}

void attn_bwd(const shape *a, float *gq, float *gk, float *gv, const float *probs, const float *go,
              const float *q, const float *k, const float *v, int nthreads) {
    int64_t n = a->B * (a->H / a->G), nd = a->D / VW;
    int nt = n < nthreads ? (int)n : nthreads;
    #pragma omp parallel num_threads(nt)
    {
        int64_t sd = ((a->D * a->S + 15) / 16) * 64, rs = ((RB * PAD(a->S) + 15) / 16) * 64;
        float *vt = aligned_alloc(64, ((a->D * PAD(a->S) + 15) / 16) * 64);
        float *gka = aligned_alloc(64, sd), *gva = aligned_alloc(64, sd);
        float *kc = aligned_alloc(64, sd), *vc = aligned_alloc(64, sd);
        float *ds = aligned_alloc(64, rs), *pd = aligned_alloc(64, rs), *mk = aligned_alloc(64, rs);
        float *g = aligned_alloc(64, ((RB * a->D + 15) / 16) * 64);
        #pragma omp for schedule(static)
        for (int64_t bk = 0; bk < n; bk++) {
#define BWD(N) bwd_head(N, a, gq, gk, gv, probs, go, q, k, v, bk, vt, kc, vc, ds, pd, mk, g, gka, gva)
            BY_ND(nd, BWD)
#undef BWD
        }
        free(vt); free(kc); free(vc); free(gka); free(gva); free(ds); free(pd); free(mk); free(g);
    }
}
#else
int attn_width(void) { return 0; }
#endif
"""
)


class Strides(ctypes.Structure):
    _fields_ = [("b", ctypes.c_int64), ("h", ctypes.c_int64), ("t", ctypes.c_int64)]


class Shape(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("B", "H", "T", "S", "D")]
    _fields_ += [(n, Strides) for n in ("q", "k", "v", "o", "bias", "gq", "gk", "gv")]
    _fields_ += [("scale", ctypes.c_float), ("inv_kq", ctypes.c_float), ("seed", ctypes.c_uint64)]
    _fields_ += [("drop", ctypes.c_int32), ("causal", ctypes.c_int32), ("G", ctypes.c_int64)]


def _bind(lib: ctypes.CDLL) -> None:
    ptr = ctypes.c_void_p
    lib.attn_width.argtypes, lib.attn_width.restype = [], ctypes.c_int
    if lib.attn_width() == 0:
        return
    lib.attn_fwd.argtypes = [ctypes.POINTER(Shape), ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.attn_bwd.argtypes = [ctypes.POINTER(Shape), ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.attn_fwd.restype = lib.attn_bwd.restype = None


_LIBRARY = Library(SOURCE, "dropout_attention", _bind)
load, reset = _LIBRARY.load, _LIBRARY.reset  # the library or None (the composite path); forget it
