"""The SwiGLU kernel (models/swiglu_kernel.py) against its oracle, torch's ``F.silu(gate) * up``:
output and gradient, float32 and bfloat16, whole rows, rows at a stride, widths off the vector and
block sizes, extreme gates; our GPT's Llama MLP takes it and gives the torch ops' loss and
gradients; layouts it cannot read and a missing library take the torch ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradtune.models import swiglu_kernel
from gradtune.models.gpt import GPT, GPTConfig
from tests.gpt_paths import assert_kernel_equals_torch_ops

pytestmark = pytest.mark.skipif(swiglu_kernel.load() is None, reason="no C compiler: the torch path only")


def torch_ops(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


# (base shape, how h is cut from it): rows of 2 x 64; hidden 37 (a vector tail); hidden 300 (two
# blocks of the kernel's loop); rows at a stride (the first 2 x 48 columns of 106); one value a side
CASES = {
    "rows": ((3, 5, 128), lambda b: b),
    "vector tail": ((4, 74), lambda b: b),
    "two blocks": ((2, 3, 600), lambda b: b),
    "strided rows": ((2, 7, 106), lambda b: b[..., :96]),
    "one value": ((1, 2), lambda b: b),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_torch_ops(case: str, dtype: torch.dtype) -> None:
    shape, cut = CASES[case]
    torch.manual_seed(0)
    base = (torch.randn(shape) * 4).to(dtype).requires_grad_()
    h = cut(base)
    assert swiglu_kernel.takes(h)
    out, ref = swiglu_kernel.swiglu(h), torch_ops(h)
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
    g = torch.randn_like(ref)
    (dh,), (rdh,) = torch.autograd.grad(out, base, g), torch.autograd.grad(ref, base, g)
    assert dh.dtype == dtype
    if dtype == torch.float32:  # the same formulas; exp's last bits differ (Cephes vs torch's)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(dh, rdh, atol=2e-6, rtol=2e-6)
        return
    # bf16: rounded where torch's ops round, so equal but where exp's last float32 bit moves a
    # value across a bf16 rounding boundary: one bf16 step at most, and rarely
    for a, b in ((out, ref), (dh, rdh)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=2**-7)
        assert (a != b).float().mean() < 1e-3


def test_extreme_gates_follow_silu() -> None:
    """silu(g) -> 0 for g -> -inf and g for g -> +inf (exp's range is clamped): no inf or NaN."""
    g = torch.tensor([-1e4, -200.0, -88.0, -20.0, 0.0, 20.0, 88.0, 200.0, 1e4])
    h = torch.cat([g, torch.ones_like(g)]).unsqueeze(0).requires_grad_()
    out = swiglu_kernel.swiglu(h)
    torch.testing.assert_close(out, torch_ops(h), atol=1e-30, rtol=1e-6)
    (dh,) = torch.autograd.grad(out.sum(), h)
    (rdh,) = torch.autograd.grad(torch_ops(h).sum(), h)
    assert torch.isfinite(dh).all()
    torch.testing.assert_close(dh, rdh, atol=1e-30, rtol=1e-6)


def test_layouts_the_kernel_cannot_read_take_the_torch_ops() -> None:
    assert not swiglu_kernel.takes(torch.randn(4, 8, dtype=torch.float64))
    assert not swiglu_kernel.takes(torch.randn(4, 7))  # no gate|up halves
    assert not swiglu_kernel.takes(torch.randn(8, 4).t())  # rows not contiguous
    assert not swiglu_kernel.takes(torch.randn(2, 3, 8).transpose(0, 1))  # rows not one run
    assert not swiglu_kernel.takes(torch.randn(0, 8))
    assert swiglu_kernel.takes(torch.randn(2, 3, 8))
    h = torch.randn(8, 4, dtype=torch.float64)
    torch.testing.assert_close(swiglu_kernel.swiglu(h), torch_ops(h), atol=0, rtol=0)


def test_gpt_mlp_takes_the_kernel_and_equals_the_torch_ops(monkeypatch) -> None:
    """Every Llama MLP goes through the kernel (counted); the loss and every gradient equal the
    torch ops' (kernel refused), in float32 and under bf16 autocast."""
    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny-llama", vocab_size=64)
    model = GPT(cfg)
    calls = []
    real = swiglu_kernel._SwiGLU.apply
    monkeypatch.setattr(swiglu_kernel._SwiGLU, "apply", lambda *a: calls.append(1) or real(*a))
    assert_kernel_equals_torch_ops(monkeypatch, model, calls, cfg.n_layer, swiglu_kernel)


def test_without_the_library_the_torch_ops_run(monkeypatch) -> None:
    monkeypatch.setattr(swiglu_kernel, "load", lambda: None)
    assert not swiglu_kernel.takes(torch.randn(4, 8))

    def unreachable(*args):
        raise AssertionError("the kernel was called without its library")

    monkeypatch.setattr(swiglu_kernel._SwiGLU, "apply", unreachable)
    model = GPT(GPTConfig.preset("tiny-llama", vocab_size=64))
    model(torch.randint(0, 64, (1, 8))).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
