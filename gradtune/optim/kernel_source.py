"""C source of the fused CPU update: one pass over memory per tensor, all tensors in one call.

Why C with OpenMP, called through ctypes (see gradtune/optim/fused.py for the build):
an optimizer step is memory-bound, so what matters is touching each byte once. torch's
per-tensor reference path makes 5-9 passes (each op reads/writes whole tensors); this loop
reads p, g, m, v once and writes p, m, v once (AdamW: 7 floats = 28 B per parameter). Plain
C without torch headers builds quickly (no torch/extension.h, no pybind11), and linking
``-fopenmp`` binds to the libgomp.so.1 torch has already loaded, so our threads and torch's
are one pool (no oversubscription on small machines).

Exactness: every element follows the *same operation order* as torch.optim's single-tensor
path (``exp_avg.lerp_``, ``exp_avg_sq.mul_().addcmul_()``, ``sqrt() / bc2_sqrt + eps``,
``addcdiv_``); scalars are rounded to the tensor dtype exactly where torch rounds them. The
build uses ``-ffp-contract=off`` so the compiler cannot fuse a*b+c unless we write ``FMA``,
which we do only where torch's vectorised kernels do (lerp, add with alpha, addcmul). float64 matches
torch to the last bits; float32 to a few ulp (torch's scalar tails differ from its vector body).

``PRELUDE`` (headers and the thread partition) is a separate string so that other C loops that
must split work exactly like these kernels can be built on it; ``SOURCE`` is it plus the kernels.
"""

PRELUDE = r"""
#include <math.h>
#include <stdint.h>
#include <omp.h>

#define INLINE static inline __attribute__((always_inline))

/* Thread t of T owns elements [lo, hi) of the concatenation of all tensors (total elements).
   Chunks are multiples of 16 elements (64 B for float) so threads never share a cache line. */
static void thread_range(int64_t total, int64_t *lo, int64_t *hi) {
    int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t chunk = ((total + T - 1) / T + 15) & ~(int64_t)15;
    *lo = t * chunk < total ? t * chunk : total;
    *hi = *lo + chunk < total ? *lo + chunk : total;
}

/* Few elements: forking threads costs more than the whole update. */
static int threads_for(int64_t total, int nthreads) {
    return total < (int64_t)1 << 15 ? 1 : nthreads;
}

"""

SOURCE = (
    PRELUDE
    + r"""
/* The span [a, e) of tensor i that this thread owns, given the tensor's offset `off`. */
#define SPAN(i) \
    int64_t a = lo > off ? lo - off : 0, e = hi - off < numel[i] ? hi - off : numel[i]; \
    if (a >= e) continue;

/* The parallel region every update kernel runs: each thread takes its share [lo, hi) of all
   elements (thread_range), walks the tensors and gets the span [a, e) of tensor i it owns; the
   kernel's body follows and closes the loop and the region with `} }`. */
#define PARALLEL_SPANS \
    _Pragma("omp parallel num_threads(threads_for(total, nthreads))") \
    { int64_t lo, hi, off = 0; thread_range(total, &lo, &hi); \
      for (int64_t i = 0; i < n; off += numel[i], ++i) { SPAN(i)

/* The element loops take their options as compile-time constants (always_inline + literal
   arguments at the call sites below), so no option is tested per element and the loops vectorise. */

/* SGD modes: 0 no momentum | 1 first step, buf = d | 2 momentum | 3 first, nesterov | 4 nesterov */
#define SGD_MODES(CALL) switch (mode) { \
    case 0: CALL(0); break; case 1: CALL(1); break; case 2: CALL(2); break; \
    case 3: CALL(3); break; default: CALL(4); }

#define DEFINE_KERNELS(T, SFX, FMA, SQRT)                                                      \
/* SGD, per element, in torch's order:                                                        \
     d = g + wd * p                   (grad.add(param, alpha=wd); vector body is an FMA)      \
     b = d             on first step  (buf = grad.clone())                                    \
     b = b * mom + (1 - damp) * d     (buf.mul_(mom).add_(grad, alpha=1-damp))                \
     d = d + mom * b   if nesterov, else d = b                                                \
     p = p + (-lr) * d                (param.add_(grad, alpha=-lr))                   */      \
INLINE void sgd_span_##SFX(T *restrict P, const T *restrict G, T *restrict B, int64_t a,      \
                           int64_t e, T wd, T mom, T damp1, T neg_lr, const int has_wd,       \
                           const int mode) {                                                  \
    for (int64_t j = a; j < e; ++j) {                                                         \
        T d = G[j];                                                                           \
        if (has_wd) d = FMA(P[j], wd, d);                                                     \
        if (mode != 0) {                                                                      \
            T b = (mode == 1 || mode == 3) ? d : FMA(d, damp1, B[j] * mom);                   \
            B[j] = b;                                                                         \
            d = mode >= 3 ? FMA(b, mom, d) : b;                                               \
        }                                                                                     \
        P[j] = FMA(d, neg_lr, P[j]);                                                          \
    }                                                                                         \
}                                                                                             \
                                                                                              \
void sgd_##SFX(int64_t n, T **p, T **g, T **buf, const int64_t *numel, const uint8_t *first,   \
               double lr, double momentum, double dampening, double weight_decay,             \
               int nesterov, int nthreads) {                                                  \
    const T wd = (T)weight_decay, mom = (T)momentum, damp1 = (T)(1.0 - dampening);            \
    const T neg_lr = (T)(-lr);                                                                \
    int64_t total = 0;                                                                        \
    for (int64_t i = 0; i < n; ++i) total += numel[i];                                        \
    PARALLEL_SPANS /* opens the region and the loop over tensors; closed by the `} }` below */ \
            T *P = p[i], *G = g[i], *B = buf ? buf[i] : 0;                                    \
            const int mode = !buf ? 0 : (first[i] ? 1 : 2) + (nesterov ? 2 : 0);              \
            if (weight_decay != 0) {                                                          \
                SGD_MODES(SGD_CALL_WD_##SFX)                                                  \
            } else {                                                                          \
                SGD_MODES(SGD_CALL_##SFX)                                                     \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* AdamW, per element, in torch's order (single-tensor path of torch.optim.AdamW):            \
     p = p * (1 - lr * wd)                               (param.mul_)                         \
     m = lerp(m, g, 1 - beta1)                           (exp_avg.lerp_; FMA like torch)      \
     v = v * beta2;  v = v + (1 - beta2) * g * g         (exp_avg_sq.mul_().addcmul_())       \
     p = p + (-step_size) * m / (sqrt(v) / bc2_sqrt + eps)   (param.addcdiv_)                 \
   torch's lerp: w < 0.5 ? m + w (g - m) : g - (g - m)(1 - w) = FMA(coef, g - m, base). */    \
INLINE void adamw_span_##SFX(T *restrict P, const T *restrict G, T *restrict M,               \
                             T *restrict V, int64_t a, int64_t e, T decay, T coef, T b2,      \
                             T c2, T neg_step, T bc2_sqrt, T eps, T gs, const int has_wd,     \
                             const int small) {                                               \
    for (int64_t j = a; j < e; ++j) {                                                         \
        T pj = P[j], gj = G[j] * gs, mj = M[j], vj = V[j];  /* gs: the clip factor, or 1 */   \
        if (has_wd) pj = pj * decay;                                                          \
        mj = FMA(coef, gj - mj, small ? mj : gj);                                             \
        vj = vj * b2;                                                                         \
        vj = FMA(c2 * gj, gj, vj);  /* addcmul's vector body fuses */                         \
        T denom = SQRT(vj) / bc2_sqrt + eps;                                                  \
        pj = pj + neg_step * mj / denom;                                                      \
        P[j] = pj; M[j] = mj; V[j] = vj;                                                      \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* step: float scalar tensors (torch's state["step"]), incremented here; step_is_double says  \
   float64 (default dtype float64) or float32. scratch: 2n doubles for per-tensor scalars. */ \
void adamw_##SFX(int64_t n, T **p, T **g, T **m, T **v, const int64_t *numel,                  \
                 void **step, int step_is_double, double *scratch,                            \
                 double lr, double beta1, double beta2, double eps, double weight_decay,      \
                 double grad_scale, int nthreads) {                                           \
    const T gs = (T)grad_scale;  /* g * gs: torch's _foreach_mul_(grads, grad_scale) */       \
    const T decay = (T)(1.0 - lr * weight_decay), b2 = (T)beta2, c2 = (T)(1.0 - beta2);       \
    const T w1 = (T)(1.0 - beta1), epsT = (T)eps;                                             \
    const int small = fabs((double)w1) < 0.5;                                                 \
    const T coef = small ? w1 : (T)(w1 - (T)1);                                               \
    /* Per-tensor scalars in double, exactly as Python computes them: scratch[2i] = -step_size, \
       scratch[2i+1] = bias_correction2 ** 0.5 */                                             \
    int64_t total = 0;                                                                        \
    for (int64_t i = 0; i < n; ++i) {                                                         \
        double s;                                                                             \
        if (step_is_double) { s = *(double *)step[i] + 1.0; *(double *)step[i] = s; }         \
        else { float f = *(float *)step[i] + 1.0f; *(float *)step[i] = f; s = f; }            \
        scratch[2 * i] = -(lr / (1.0 - pow(beta1, s)));                                       \
        scratch[2 * i + 1] = pow(1.0 - pow(beta2, s), 0.5);                                   \
        total += numel[i];                                                                    \
    }                                                                                         \
    PARALLEL_SPANS /* opens the region and the loop over tensors; closed by the `} }` below */ \
            const T neg_step = (T)scratch[2 * i], bc2_sqrt = (T)scratch[2 * i + 1];           \
            if (weight_decay != 0 && small)                                                   \
                adamw_span_##SFX(p[i], g[i], m[i], v[i], a, e, decay, coef, b2, c2, neg_step, \
                                 bc2_sqrt, epsT, gs, 1, 1);                                       \
            else if (weight_decay != 0)                                                       \
                adamw_span_##SFX(p[i], g[i], m[i], v[i], a, e, decay, coef, b2, c2, neg_step, \
                                 bc2_sqrt, epsT, gs, 1, 0);                                       \
            else if (small)                                                                   \
                adamw_span_##SFX(p[i], g[i], m[i], v[i], a, e, decay, coef, b2, c2, neg_step, \
                                 bc2_sqrt, epsT, gs, 0, 1);                                       \
            else                                                                              \
                adamw_span_##SFX(p[i], g[i], m[i], v[i], a, e, decay, coef, b2, c2, neg_step, \
                                 bc2_sqrt, epsT, gs, 0, 0);                                       \
        }                                                                                     \
    }                                                                                         \
}

/* Sum of squares of every element of n tensors, accumulated in double: the squared gradient
   norm (the guard's finiteness check and clipping need it every step). Each thread sums its own
   range, the partials are added in thread order: the same thread count gives the same bits. */
#define DEFINE_SUMSQ(T, SFX)                                                                   \
double sumsq_##SFX(int64_t n, T **x, const int64_t *numel, int nthreads) {                     \
    int64_t total = 0;                                                                        \
    for (int64_t i = 0; i < n; ++i) total += numel[i];                                        \
    double partial[256] = {0};                                                                \
    int T_used = threads_for(total, nthreads > 256 ? 256 : nthreads);                         \
    _Pragma("omp parallel num_threads(T_used)")                                               \
    {                                                                                         \
        int64_t lo, hi, off = 0;                                                              \
        double acc = 0.0;                                                                     \
        thread_range(total, &lo, &hi);                                                        \
        for (int64_t i = 0; i < n; off += numel[i], ++i) {                                    \
            SPAN(i)                                                                           \
            const T *X = x[i];                                                                \
            double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;  /* 4 chains: vectorisable */      \
            int64_t j = a;                                                                    \
            for (; j + 4 <= e; j += 4) {                                                      \
                double v0 = X[j], v1 = X[j + 1], v2 = X[j + 2], v3 = X[j + 3];                \
                s0 += v0 * v0; s1 += v1 * v1; s2 += v2 * v2; s3 += v3 * v3;                   \
            }                                                                                 \
            for (; j < e; ++j) { double v = X[j]; s0 += v * v; }                              \
            acc += (s0 + s1) + (s2 + s3);                                                     \
        }                                                                                     \
        partial[omp_get_thread_num()] = acc;                                                  \
    }                                                                                         \
    double s = 0.0;                                                                           \
    for (int t = 0; t < T_used; ++t) s += partial[t];                                         \
    return s;                                                                                 \
}

#define SGD_CALL_f32(MODE) sgd_span_f32(P, G, B, a, e, wd, mom, damp1, neg_lr, 0, MODE)
#define SGD_CALL_WD_f32(MODE) sgd_span_f32(P, G, B, a, e, wd, mom, damp1, neg_lr, 1, MODE)
#define SGD_CALL_f64(MODE) sgd_span_f64(P, G, B, a, e, wd, mom, damp1, neg_lr, 0, MODE)
#define SGD_CALL_WD_f64(MODE) sgd_span_f64(P, G, B, a, e, wd, mom, damp1, neg_lr, 1, MODE)

DEFINE_KERNELS(float, f32, fmaf, sqrtf)
DEFINE_KERNELS(double, f64, fma, sqrt)
DEFINE_SUMSQ(float, f32)
DEFINE_SUMSQ(double, f64)
"""
)
