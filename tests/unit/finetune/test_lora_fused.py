"""LoRALinear's fused forward (two GEMMs, the update accumulated in place) against the plain
formula W x + b + (alpha / rank) B A x: outputs and every gradient, with and without bias, for
3-D and 2-D inputs; and the paths that must not take it (autocast, merged, other bases)."""

import pytest
import torch
from torch import nn

from gradtune.finetune.lora import LoRALinear


def reference(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    w, b = layer.base.weight, layer.base.bias
    y = x @ w.t() + (b if b is not None else 0)
    return y + layer.scaling * (x @ layer.lora_a.weight.t()) @ layer.lora_b.weight.t()


def pair(bias: bool, dtype=torch.float32):
    torch.manual_seed(0)
    a = LoRALinear(nn.Linear(24, 40, bias=bias).to(dtype), rank=4, alpha=8.0).to(dtype)
    nn.init.normal_(a.lora_b.weight)  # B = 0 at init would hide errors in the update path
    b = LoRALinear(nn.Linear(24, 40, bias=bias).to(dtype), rank=4, alpha=8.0).to(dtype)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 7, 24), (5, 24)])
@pytest.mark.parametrize("input_grad", [True, False])  # False: the first layer after frozen embeddings
def test_fused_forward_and_grads_match_the_formula(bias, shape, input_grad):
    a, b = pair(bias, torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(input_grad), x.clone().requires_grad_(input_grad)
    g = torch.randn(*shape[:-1], 40, dtype=torch.float64)
    ya, yb = a(xa), reference(b, xb)
    assert ya.shape == yb.shape
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    ya.backward(g)
    yb.backward(g)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)
    if input_grad:
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)


def test_fused_path_is_taken_in_float32_and_close_to_the_unfused_one(monkeypatch):
    a, _ = pair(True)
    x = torch.randn(2, 9, 24)
    unfused = a.base(x) + (a.lora_b(a.lora_a(x)) * a.scaling)
    fused, calls = LoRALinear._fused, []
    monkeypatch.setattr(LoRALinear, "_fused", lambda self, t: calls.append(1) or fused(self, t))
    out = a(x)
    assert calls  # float32, plain nn.Linear, no autocast: fused
    torch.testing.assert_close(out, unfused, rtol=1e-5, atol=1e-6)


def test_autocast_merged_and_other_bases_keep_the_plain_path(monkeypatch):
    a, _ = pair(True)
    monkeypatch.setattr(LoRALinear, "_fused", lambda self, t: pytest.fail("fused path taken"))
    x = torch.randn(2, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert a(x).dtype == torch.bfloat16
    a.merge()
    a(x)
    a.unmerge()

    class Wrapped(nn.Linear):  # e.g. a quantised base: not a plain nn.Linear
        pass

    c = LoRALinear(Wrapped(24, 40), rank=4, alpha=8.0)
    c(x)
