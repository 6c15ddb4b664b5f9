"""The fast path (gradtune/optim/fused.py): equal to the reference path, used when it can be,
and a warned fallback to the reference when it cannot be built or the tensors don't fit."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch

from gradtune.optim import SGD, AdamW
from gradtune.optim import fused as fast
from gradtune.runtime import c_build

TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
# Sizes around the kernel's edges: 1 element, a non-multiple of the vector width and of the
# 16-element thread chunk, and > 2**15 total so the OpenMP split over threads is exercised.
SHAPES = [(), (17,), (3, 5, 7), (129, 65), (40001,)]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One thread: on a loaded 2-core CI box, OpenMP barriers of oversubscribed threads make
    each step ~20x slower. test_fast_equals_reference_multithreaded covers the thread split."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def fresh_loader(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[None]:
    """An empty kernel cache and a forgotten library; restored to normal afterwards."""
    monkeypatch.setenv("GRADTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(fast, "_warned_unsupported", False)
    fast.reset()
    yield
    fast.reset()


def trajectories(make_opt, dtype: torch.dtype, steps: int = 200) -> list[list[torch.Tensor]]:
    """Final params of the same run with fused=False and fused=True."""
    out = []
    for fused in (False, True):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in SHAPES]
        opt = make_opt(params, fused)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
            opt.step()
        out.append([p.detach() for p in params])
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "kw",
    [
        dict(momentum=0.9),
        dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
        dict(momentum=0.5, dampening=0.5, weight_decay=1e-3),
        dict(),
    ],
    ids=["momentum", "nesterov_wd", "dampening", "plain"],
)
def test_sgd_fast_equals_reference(kw: dict, dtype: torch.dtype) -> None:
    ref, fused = trajectories(lambda p, f: SGD(p, lr=0.01, **kw, fused=f), dtype)
    for a, b in zip(fused, ref):
        assert rel_err(a, b) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kw", [dict(), dict(betas=(0.5, 0.9), weight_decay=0.0)], ids=["default", "beta1_half"])
def test_adamw_fast_equals_reference(kw: dict, dtype: torch.dtype) -> None:
    ref, fused = trajectories(lambda p, f: AdamW(p, lr=1e-2, **kw, fused=f), dtype)
    for a, b in zip(fused, ref):
        assert rel_err(a, b) <= TOL[dtype]


@pytest.mark.parametrize("threads", [2, 3])
def test_fast_equals_reference_multithreaded(threads: int) -> None:
    """The kernel splits the concatenated tensors into per-thread chunks: same result."""
    torch.set_num_threads(threads)
    ref, fused = trajectories(lambda p, f: AdamW(p, lr=1e-2, fused=f), torch.float64, steps=10)
    for a, b in zip(fused, ref):
        assert rel_err(a, b) <= 1e-12
    ref, fused = trajectories(lambda p, f: SGD(p, lr=1e-2, momentum=0.9, fused=f), torch.float32, steps=10)
    for a, b in zip(fused, ref):
        assert rel_err(a, b) <= 1e-6


def test_fast_path_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fast.load() is not None, "gcc/cc is present here, the kernel must build"
    calls = []
    monkeypatch.setattr(fast, "adamw_", lambda *a, **k: calls.append("adamw"))
    monkeypatch.setattr(fast, "sgd_", lambda *a, **k: calls.append("sgd"))
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.ones(4)
    AdamW([p]).step()
    SGD([p], lr=0.1, momentum=0.9).step()
    SGD([p], lr=0.1, fused=False).step()  # forced reference: no kernel call
    assert calls == ["adamw", "sgd"]


def _run_both(make_opt) -> tuple[torch.Tensor, torch.Tensor]:
    """One param after 3 steps with ours and with torch.optim (the oracle)."""
    out = []
    for cls_opt in make_opt:
        p = torch.linspace(-1, 1, 10, dtype=torch.float64).requires_grad_()
        opt = cls_opt([p])
        for k in range(3):
            p.grad = torch.full_like(p, 0.1 * (k + 1))
            opt.step()
        out.append(p.detach())
    return out[0], out[1]


@pytest.mark.parametrize("failure", ["no_compiler", "compiler_fails"])
def test_fallback_when_kernel_cannot_be_built(failure: str, fresh_loader, monkeypatch: pytest.MonkeyPatch) -> None:
    if failure == "no_compiler":
        monkeypatch.setattr(c_build, "compiler", lambda: None)
    else:
        monkeypatch.setenv("GRADTUNE_CC", "false")  # /bin/false: exits 1, builds nothing
    with pytest.warns(RuntimeWarning, match="fused kernels unavailable"):
        ours, ref = _run_both([lambda p: AdamW(p, lr=0.1), lambda p: torch.optim.AdamW(p, lr=0.1, foreach=False)])
    assert rel_err(ours, ref) <= 1e-12
    with warnings.catch_warnings():  # one-time: later optimizers and steps stay quiet
        warnings.simplefilter("error")
        ours, ref = _run_both(
            [lambda p: SGD(p, lr=0.1, momentum=0.9, fused=True), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)]
        )
    assert rel_err(ours, ref) <= 1e-12


def test_build_is_cached(fresh_loader, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    assert fast.load() is not None
    assert len(list(tmp_path.glob("kernels/optim_*.so"))) == 1
    fast.reset()  # a "new process": must load the cached .so, not compile again

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt despite a cached kernel")

    monkeypatch.setattr(c_build, "build", no_build)
    assert fast.load() is not None


def test_unsupported_tensors_fall_back_with_warning(fresh_loader) -> None:
    """A non-contiguous leaf and a bf16 param take the reference path, still exact."""

    def params() -> list[torch.Tensor]:
        return [
            torch.arange(12.0).reshape(3, 4).t().requires_grad_(),  # non-contiguous
            torch.ones(5, dtype=torch.bfloat16, requires_grad=True),
        ]

    pa, pb = params(), params()
    a = SGD(pa, lr=0.1, momentum=0.9, fused=True)
    b = torch.optim.SGD(pb, lr=0.1, momentum=0.9)
    with pytest.warns(RuntimeWarning, match="fused=True but"):
        for _ in range(3):
            for p, q in zip(pa, pb):
                p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
            a.step(), b.step()
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)


@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.1, momentum=0.9), lambda ps: AdamW(ps, lr=0.1)])
def test_fast_step_counts_its_writes(make) -> None:
    """The C kernel writes through raw pointers; it bumps the version counters as torch's
    in-place ops do, so a reader keyed by ``_version`` (fast_decoder's kept packed weights)
    sees the step. The reference path (fused=False) bumps them by its own in-place ops."""
    assert fast.load() is not None
    p = torch.zeros(8, requires_grad=True)
    p.grad = torch.ones(8)
    opt = make([p])
    before = p._version
    opt.step()
    assert not torch.equal(p.detach(), torch.zeros(8)) and p._version > before
    for state in opt.state[p].values():  # momentum / moments / step: written by the kernel too
        if isinstance(state, torch.Tensor):
            assert state._version > 0
