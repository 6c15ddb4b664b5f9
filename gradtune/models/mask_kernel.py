"""The dropout mask in one parallel C pass (models/dropout.py's fast path on the CPU).

Why: drawing the mask with torch ops takes four passes, one of them serial: ``random_`` on
int64 (torch's CPU generator is one sequential stream), then ``bitwise_and_``, a comparison,
and a copy to the mask's dtype (plus a product by 1/q for a scaled mask). Here element i of the
mask comes from a counter-based hash of (seed, i): splitmix64's finaliser of
``seed + (i + 1) * golden``, whose top 15 bits are u, uniform on [0, LEVELS):

    mask[i] = on  if u >= drop  else 0        (drop = round(p * LEVELS), as dropout.py)

written straight in the mask's dtype (float32 / float64 with ``on`` = 1 or 1/q, uint8 0/1),
every thread on its own range. ``seed`` is one 64-bit draw of torch's default CPU generator, so
``torch.manual_seed`` and a checkpoint's RNG state fix every mask (a resumed run draws the same
ones), and the mask does not depend on the thread count. None from ``load`` (no compiler, a
failed build): dropout.py draws with torch ops instead.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from gradtune.runtime.c_build import Library

# Element i's 15-bit level from the seed: the mask stream, shared as C text with models/attention_kernel.py
# (whose fused attention must draw the same mask as this kernel's).
LEVEL = r"""
#include <stdint.h>
static inline uint32_t level(uint64_t seed, int64_t i) {
    uint64_t z = seed + (uint64_t)(i + 1) * 0x9e3779b97f4a7c15ULL;  /* splitmix64 */
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    return (uint32_t)(z >> 49);  /* top 15 bits */
}
"""

SOURCE = (
    LEVEL
    + r"""
#include <omp.h>

#define MASK(name, T)                                                                         \
void name(T *out, int64_t n, uint64_t seed, int32_t drop, T on, int nthreads) {              \
    int nt = n < ((int64_t)1 << 16) ? 1 : nthreads;                                           \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                              \
    for (int64_t i = 0; i < n; i++) out[i] = (int32_t)level(seed, i) >= drop ? on : (T)0;     \
}
MASK(mask_f32, float)
MASK(mask_f64, double)
MASK(mask_u8, uint8_t)

/* out = x * mask, the mask regenerated from the seed (out may be x): dropout's forward and
   backward without the mask in memory. A product, as torch's dropout: inf or nan stay nan. */
#define TIMES(name, T)                                                                        \
void name(T *out, const T *x, int64_t n, uint64_t seed, int32_t drop, T on, int nthreads) {  \
    int nt = n < ((int64_t)1 << 16) ? 1 : nthreads;                                           \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                              \
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * ((int32_t)level(seed, i) >= drop ? on : (T)0); \
}
TIMES(times_f32, float)
TIMES(times_f64, double)
"""
)

_FUNCS = {torch.float32: "mask_f32", torch.float64: "mask_f64", torch.uint8: "mask_u8"}
_TIMES = {torch.float32: "times_f32", torch.float64: "times_f64"}
_CTYPES = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double, torch.uint8: ctypes.c_uint8}


def _bind(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for dtype, name in _FUNCS.items():
        f = getattr(lib, name)
        f.argtypes = [ptr, i64, ctypes.c_uint64, ctypes.c_int32, _CTYPES[dtype], ctypes.c_int]
        f.restype = None
    for dtype in (torch.float32, torch.float64):
        f = getattr(lib, _TIMES[dtype])
        f.argtypes = [ptr, ptr, i64, ctypes.c_uint64, ctypes.c_int32, _CTYPES[dtype], ctypes.c_int]
        f.restype = None


_LIBRARY = Library(SOURCE, "dropout_mask", _bind)
load, reset = _LIBRARY.load, _LIBRARY.reset  # the library or None (dropout.py's torch path); forget it


def mask(shape: torch.Size, drop: int, on: float, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A new CPU tensor of ``shape`` and ``dtype`` (float32, float64 or uint8): ``on`` where kept
    (u >= drop), 0 where dropped; None when the kernel is unavailable."""
    lib = load()
    if lib is None or dtype not in _FUNCS or torch.compiler.is_compiling():
        return None
    seed = draw()
    out = torch.empty(shape, dtype=dtype)
    value = int(on) if dtype == torch.uint8 else on
    getattr(lib, _FUNCS[dtype])(out.data_ptr(), out.numel(), seed, drop, value, torch.get_num_threads())
    return out


def draw() -> int:
    """One draw of torch's default CPU generator: 63 random bits, the seed of one mask's stream."""
    return int(torch.empty((), dtype=torch.int64).random_())


def fusable(x: torch.Tensor) -> bool:
    """``times`` can take x: a CPU float32/float64 tensor, the kernel is built, and no
    torch.compile trace is running (a ctypes call would break its graph: torch ops there)."""
    return x.dtype in _TIMES and x.device.type == "cpu" and not torch.compiler.is_compiling() and load() is not None


def times(x: torch.Tensor, seed: int, drop: int, on: float, inplace: bool = False) -> torch.Tensor:
    """x * mask, the mask of ``mask(x.shape, drop, on, x.dtype)`` drawn with ``seed``, in one
    pass (into x when ``inplace`` and x is contiguous); x as ``fusable`` says."""
    lib = load()
    assert lib is not None and x.dtype in _TIMES
    src = x.contiguous()
    out = src if inplace else torch.empty(src.shape, dtype=src.dtype)
    getattr(lib, _TIMES[x.dtype])(out.data_ptr(), src.data_ptr(), src.numel(), seed, drop, on, torch.get_num_threads())
    return out
