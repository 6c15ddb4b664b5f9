"""Float32 linears through oneDNN (models/onednn_linear.py): forward and the three gradients against
float64 ``F.linear`` (the oracle), the module swap keeps the class, state and copies right, and the
plain path runs where the rule says MKL."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradtune.models import onednn_linear

needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"),
    reason="torch built without oneDNN",
)


@pytest.fixture
def prefer(monkeypatch):
    monkeypatch.setattr(onednn_linear, "preferred", lambda: True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@needs_onednn
@pytest.mark.parametrize("rows,fin,fout,bias", [(16, 8, 5, True), (300, 384, 1536, True), (2048, 96, 40, False)])
def test_linear_and_gradients_equal_float64(prefer, rows, fin, fout, bias):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, fin, generator=g, requires_grad=True)
    w = torch.randn(fout, fin, generator=g, requires_grad=True)
    b = torch.randn(fout, generator=g, requires_grad=True) if bias else None
    gy = torch.randn(rows, fout, generator=g)
    y = onednn_linear._Linear.apply(x, w, b)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], gy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    ref = F.linear(x64, w64, b64)
    refs = torch.autograd.grad(ref, [t for t in (x64, w64, b64) if t is not None], gy.double())
    assert y.dtype == torch.float32 and _rel(y, ref) < 1e-5
    for a, r in zip(grads, refs):
        assert _rel(a, r) < 1e-5


@needs_onednn
def test_swap_keeps_class_state_and_copies(prefer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 300), nn.ReLU(), nn.Linear(300, 256), nn.Linear(256, 3))
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert onednn_linear.swap_linears(model) == 2
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))  # noqa: E721
    assert "forward" not in vars(model[3])  # 768 weights: MKL
    assert list(model.state_dict()) == keys
    x = torch.randn(4, 32, 256)  # 128 rows: through oneDNN (the last, small layer: MKL)
    out = model(x)
    assert out.grad_fn is not None and torch.allclose(out, ref(x), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    ref(x).sum().backward()
    for p, r in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, r.grad, atol=1e-4, rtol=1e-5)
    twin = copy.deepcopy(model)  # its forward is bound to the copy, not to the original
    with torch.no_grad():
        twin[3].bias.add_(1.0)
    assert torch.allclose(twin(x), model(x) + 1.0, atol=1e-5)


def test_plain_path_where_mkl_is_the_rule(monkeypatch):
    monkeypatch.setattr(onednn_linear, "preferred", lambda: False)
    layer = nn.Linear(256, 256)
    assert onednn_linear.swap_linears(nn.Sequential(layer)) == 0 and "forward" not in vars(layer)
    monkeypatch.setattr(onednn_linear, "preferred", lambda: True)
    assert onednn_linear.swap_linears(nn.Sequential(nn.Linear(8, 4))) == 0  # too small to pay for a call
    onednn_linear.swap_linears(nn.Sequential(layer))
    x = torch.randn(onednn_linear.MIN_ROWS - 1, 256)  # too few rows: F.linear itself
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    x64 = x.double()  # float64: F.linear itself
    assert torch.equal(layer.double()(x64), F.linear(x64, layer.weight, layer.bias))


def test_rule_is_the_cpu_vendor():
    """``preferred`` reads the vendor, not a timing: the same answer every time on one machine."""
    onednn_linear.preferred.cache_clear()
    try:
        first = onednn_linear.preferred()
        onednn_linear.preferred.cache_clear()
        assert onednn_linear.preferred() == first
        try:
            vendor = next(line for line in open("/proc/cpuinfo") if line.startswith("vendor_id"))
        except (OSError, StopIteration):
            vendor = ""
        if torch.backends.mkldnn.is_available():
            assert first == ("AuthenticAMD" in vendor)
    finally:
        onednn_linear.preferred.cache_clear()


@pytest.mark.skipif(not onednn_linear.preferred(), reason="this CPU keeps MKL")
def test_a_row_does_not_depend_on_its_batch():
    """Where oneDNN runs, a row's output is the same bits in a batch of 2 rows or of 300 (an
    evaluation's chunk size, a preference pair's partner): the single row takes MKL either way."""
    torch.manual_seed(1)
    layer = nn.Linear(256, 300)
    onednn_linear.swap_linears(nn.Sequential(layer))
    x = torch.randn(300, 256)
    with torch.no_grad():
        full = layer(x)
        for n in (2, 3, 7, 15, 16, 17, 64, 299):
            assert torch.equal(layer(x[:n]), full[:n]), n


def test_unswap_gives_torch_its_forward_back(prefer):
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    assert onednn_linear.swap_linears(model) == 2
    assert onednn_linear.unswap_linears(model) == 2
    assert all("forward" not in vars(m) for m in model) and onednn_linear.unswap_linears(model) == 0
