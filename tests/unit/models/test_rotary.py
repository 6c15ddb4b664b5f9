"""The rotary kernel (models/rotary.py ``rotate``) against its oracle, ``apply_rotary`` (torch ops,
HF's rotate-half layout): output and the input's gradient, float32 and bfloat16 heads, heads read
in place from the q|k columns of a fused projection, one position taken from the middle of the
tables (a decoding step); our GPT's q and k take it, with and without q/k norms, and give the torch
ops' loss and gradients; layouts it cannot read and a missing library take the torch ops."""

from __future__ import annotations

import pytest
import torch

from gradtune.models import rotary
from gradtune.models.gpt import GPT, GPTConfig, rotary_cache
from tests.gpt_paths import assert_kernel_equals_torch_ops

pytestmark = pytest.mark.skipif(rotary.load() is None, reason="no C compiler: the torch path only")


def tables(start: int, T: int, hs: int) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = rotary_cache(
        GPTConfig.preset("tiny-llama", vocab_size=64, block_size=16, n_embd=hs, n_head=1, n_kv_head=1)
    )
    return cos[start : start + T], sin[start : start + T]  # rows of the full table, as GPT.forward slices


# (base shape, how heads (B, T, G, hs) are cut from it, first position): heads of a contiguous
# tensor; the q|k columns of qkv (row stride 384, 6 heads of 48); one position from the middle
CASES = {
    "heads": ((2, 7, 6, 48), lambda b: b, 0),
    "qk columns": ((2, 7, 384), lambda b: b[..., :288].unflatten(-1, (6, 48)), 0),
    "one position": ((3, 1, 384), lambda b: b[..., :288].unflatten(-1, (6, 48)), 9),
    "small head": ((1, 5, 2, 2), lambda b: b, 3),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_apply_rotary(case: str, dtype: torch.dtype) -> None:
    shape, cut, start = CASES[case]
    torch.manual_seed(0)
    base = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    heads = cut(base)
    cos, sin = tables(start, heads.shape[1], heads.shape[-1])
    layout = rotary.takes(heads, cos, sin)
    assert layout
    out = rotary.rotate(heads, cos, sin, layout)  # (B, T, G, hs)
    ref = rotary.apply_rotary(heads.transpose(1, 2), cos, sin).transpose(1, 2)  # as attention calls it
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-6)
    g = torch.randn_like(ref)
    (dx,), (rdx,) = torch.autograd.grad(out, base, g), torch.autograd.grad(ref, base, g)
    assert dx.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(dx, rdx, atol=2e-6, rtol=1e-6)
        return
    # bf16: torch rounds each branch's gradient to bf16 before adding them, the kernel rounds the
    # sum once: within a bf16 step of torch's and closer to the float64 gradient
    base64 = base.detach().double().requires_grad_()
    h64 = cut(base64)
    exact = torch.autograd.grad(
        rotary.apply_rotary(h64.transpose(1, 2), cos.double(), sin.double()), base64, g.double().transpose(1, 2)
    )[0]
    torch.testing.assert_close(dx.double(), exact, atol=1e-2, rtol=2**-8)
    assert (dx.double() - exact).abs().mean() <= (rdx.double() - exact).abs().mean()


def test_layouts_the_kernel_cannot_read_take_the_torch_ops() -> None:
    cos, sin = tables(0, 4, 8)
    assert rotary.takes(torch.randn(2, 4, 3, 8), cos, sin)
    assert not rotary.takes(torch.randn(2, 4, 3, 8, dtype=torch.float64), cos, sin)
    assert not rotary.takes(torch.randn(2, 4, 3, 8), cos.double(), sin.double())
    assert not rotary.takes(torch.randn(2, 5, 3, 8), cos, sin)  # tables for 4 positions
    assert not rotary.takes(torch.randn(2, 4, 3, 7), cos[:, :7], sin[:, :7])  # no pairs
    assert not rotary.takes(torch.randn(2, 4, 8, 3).transpose(-1, -2), cos, sin)  # strided heads
    assert not rotary.takes(torch.randn(4, 2, 3, 8).transpose(0, 1), cos, sin)  # rows not one run


@pytest.mark.parametrize("qk_norm", [False, True])
def test_gpt_takes_the_kernel_and_equals_the_torch_ops(monkeypatch, qk_norm: bool) -> None:
    """q and k of every layer are rotated by one kernel call (counted); the loss and every gradient
    equal the torch ops' (kernel refused), in float32 and under bf16 autocast."""
    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny-llama", vocab_size=64, qk_norm=qk_norm)
    model = GPT(cfg)
    calls = []
    real = rotary.rotate
    monkeypatch.setattr(rotary, "rotate", lambda *a: calls.append(1) or real(*a))
    assert_kernel_equals_torch_ops(monkeypatch, model, calls, cfg.n_layer, rotary)


def test_without_the_library_the_torch_ops_run(monkeypatch) -> None:
    monkeypatch.setattr(rotary, "load", lambda: None)
    cos, sin = tables(0, 4, 8)
    assert not rotary.takes(torch.randn(2, 4, 3, 8), cos, sin)

    def unreachable(*args):
        raise AssertionError("the kernel was called without its library")

    monkeypatch.setattr(rotary, "rotate", unreachable)
    for qk_norm in (False, True):
        model = GPT(GPTConfig.preset("tiny-llama", vocab_size=64, qk_norm=qk_norm))
        model(torch.randint(0, 64, (1, 8))).sum().backward()
        assert all(p.grad is not None for p in model.parameters())
