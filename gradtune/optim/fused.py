"""The fast path: build the C kernels of kernel_source.py once, cache them, call them via ctypes.

Mechanism (the build itself: runtime/c_build.py), and why not the alternatives:
  * torch.compile of the update: Inductor compiles per distinct set of shapes (a slow cold
    start for a GPT-sized list of tensors) and re-traces when the parameters change.
  * cpp_extension.load_inline: compiling against torch/extension.h and pybind11 is slow.
  * flattening parameters into one buffer: fast, but changes how params/grads are stored,
    which breaks drop-in use with any model and state_dict structure.
A small C file compiled with gcc/cc needs no torch headers, and the .so is cached under
gradtune's cache root (``$GRADTUNE_CACHE/kernels``) under a hash of source, flags, compiler
and CPU, so the build happens once per machine and later processes only load it.
``compiled(source, stem)`` is that build-and-cache step for any C source.

No compiler, a failed build, or a tensor the kernel does not handle (non-CPU device, dtype
other than float32/float64, non-contiguous, sparse): ``supported`` says no and the optimizer
falls back to its reference path, with a one-time warning when the build failed (or when
fused=True was asked for tensors it cannot take). On CUDA the reference path runs torch ops
on the GPU: correct, but not fused (a Triton/CUDA kernel is future work).
"""

from __future__ import annotations

import ctypes
import warnings

import torch

from gradtune.optim.hyper import AdamWHyper, SGDHyper
from gradtune.optim.kernel_source import SOURCE
from gradtune.runtime.c_build import CFLAGS, Library, cache_dir, compiled  # noqa: F401  (CFLAGS, cache_dir, compiled: the API)

_DTYPES = {torch.float32: "f32", torch.float64: "f64"}

_warned_unsupported = False


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr, dbl, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
    for sfx in _DTYPES.values():
        getattr(lib, f"sgd_{sfx}").argtypes = [i64, ptr, ptr, ptr, ptr, ptr, dbl, dbl, dbl, dbl, i32, i32]
        getattr(lib, f"adamw_{sfx}").argtypes = [
            i64,
            ptr,
            ptr,
            ptr,
            ptr,
            ptr,
            ptr,
            i32,
            ptr,
            dbl,
            dbl,
            dbl,
            dbl,
            dbl,
            dbl,
            i32,
        ]
        getattr(lib, f"sumsq_{sfx}").argtypes = [i64, ptr, ptr, i32]
        getattr(lib, f"sumsq_{sfx}").restype = dbl
    return lib


_LIBRARY = Library(
    SOURCE,
    "optim",
    _bind,
    warn="gradtune.optim: fused kernels unavailable, using the reference per-tensor update (slower, same results).",
)
load, reset = _LIBRARY.load, _LIBRARY.reset  # the library or None, warned once (the reference path); forget it


def supported(tensors: list[torch.Tensor]) -> bool:
    """Can the C kernel update these (params, grads or state): dense, contiguous, CPU, one dtype."""
    if not tensors:
        return False
    dtype = tensors[0].dtype
    strided = torch.strided  # is_cpu / `is`: this runs per tensor per step, keep it cheap
    plain = (torch.Tensor, torch.nn.Parameter)  # not DTensor (FSDP2 shards): its data_ptr is no array
    return dtype in _DTYPES and all(
        type(t) in plain and t.is_cpu and t.dtype is dtype and t.layout is strided and t.is_contiguous()
        for t in tensors
    )


def steps_supported(steps: list[torch.Tensor]) -> bool:
    """AdamW step counters the kernel can increment: CPU float32/float64 scalars, one dtype."""
    dtype = steps[0].dtype
    return dtype in _DTYPES and all(s.is_cpu and s.dtype is dtype and s.numel() == 1 for s in steps)


def choose(fused: bool | None, tensors: list[torch.Tensor]) -> ctypes.CDLL | None:
    """The library when this group should take the fast path, else None (reference path).

    fused=False: never. None: when built and the tensors are supported. True: the same, but
    say once why not (a tensor on CUDA, bf16, non-contiguous...) instead of failing.
    """
    global _warned_unsupported
    if fused is False:
        return None
    lib = load()
    if lib is None:
        return None
    if supported(tensors):
        return lib
    if fused and not _warned_unsupported:
        _warned_unsupported = True
        warnings.warn(
            "gradtune.optim: fused=True but some tensors are not dense contiguous "
            "CPU float32/float64 of one dtype; using the reference update for them.",
            RuntimeWarning,
            stacklevel=3,
        )
    return None


class _Array:
    """A C int64/uint8 array with a ``data_ptr()`` like a tensor's: far cheaper to build than a
    torch.tensor (no dispatcher, no allocator), and this runs a few times every step."""

    __slots__ = ("buf",)

    def __init__(self, values: list[int], ctype: type = ctypes.c_int64) -> None:
        self.buf = (ctype * len(values))(*values)

    def data_ptr(self) -> int:
        return ctypes.addressof(self.buf)


def _ptrs(tensors: list[torch.Tensor]) -> _Array:
    """int64 array of data pointers (n,); kept alive by the caller for the call's duration."""
    return _Array([t.data_ptr() for t in tensors])


def sgd_(
    lib: ctypes.CDLL,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor] | None,
    first: list[bool] | None,
    hyper: SGDHyper,
) -> None:
    """In place: params (and bufs) updated by one SGD step; first[i]: bufs[i] is uninitialised."""
    arrays = [_ptrs(params), _ptrs(grads)]
    numel = _Array([p.numel() for p in params])
    buf_ptr = first_ptr = None
    if bufs is not None:
        arrays += [_ptrs(bufs), _Array([int(f) for f in first], ctypes.c_uint8)]
        buf_ptr, first_ptr = arrays[2].data_ptr(), arrays[3].data_ptr()
    fn = getattr(lib, f"sgd_{_DTYPES[params[0].dtype]}")
    fn(
        len(params),
        arrays[0].data_ptr(),
        arrays[1].data_ptr(),
        buf_ptr,
        numel.data_ptr(),
        first_ptr,
        hyper.lr,
        hyper.momentum,
        hyper.dampening,
        hyper.weight_decay,
        int(hyper.nesterov),
        torch.get_num_threads(),
    )
    # The C kernel wrote through raw pointers: count the writes as torch's in-place ops do, so
    # readers keyed by ``_version`` (fast_decoder's packed weights) see the new values.
    torch.autograd.graph.increment_version(params if bufs is None else params + bufs)


def adamw_(
    lib: ctypes.CDLL,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    hyper: AdamWHyper,
    grad_scale: float = 1.0,
) -> None:
    """In place: one AdamW step; steps are float scalar tensors on CPU, incremented here.
    ``grad_scale``: the update uses g * grad_scale (g itself is left as it is)."""
    if not steps_supported(steps):
        raise ValueError("steps must be CPU float32/float64 scalars of one dtype")
    p, g, m, v, s = (_ptrs(x) for x in (params, grads, exp_avgs, exp_avg_sqs, steps))
    numel = _Array([t.numel() for t in params])
    scratch = _Array([0] * (2 * len(params)), ctypes.c_double)  # per-tensor -step_size, bc2_sqrt
    fn = getattr(lib, f"adamw_{_DTYPES[params[0].dtype]}")
    fn(
        len(params),
        p.data_ptr(),
        g.data_ptr(),
        m.data_ptr(),
        v.data_ptr(),
        numel.data_ptr(),
        s.data_ptr(),
        int(steps[0].dtype == torch.float64),
        scratch.data_ptr(),
        hyper.lr,
        hyper.beta1,
        hyper.beta2,
        hyper.eps,
        hyper.weight_decay,
        grad_scale,
        torch.get_num_threads(),
    )
    torch.autograd.graph.increment_version(params + exp_avgs + exp_avg_sqs + steps)  # as in sgd_


def sumsq(lib: ctypes.CDLL, tensors: list[torch.Tensor]) -> float:
    """Sum of the squares of every element (float64 accumulation), in one pass over memory."""
    ptrs, numel = _ptrs(tensors), _Array([t.numel() for t in tensors])
    fn = getattr(lib, f"sumsq_{_DTYPES[tensors[0].dtype]}")
    return fn(len(tensors), ptrs.data_ptr(), numel.data_ptr(), torch.get_num_threads())
