"""The loop's per-step helpers: the C gradient norm, clipping, the unwrapped optimizer step, and
update ratios measured on samples. Each is checked against the plain torch computation."""

import math

import pytest
import torch

from gradtune.loop import gradient
from gradtune.loop.evaluation import ratio_snapshot, update_ratios
from gradtune.optim import SGD, AdamW
from gradtune.optim.direct import direct_step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_norm_matches_torch(dtype):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g, dtype=dtype) for s in [(70_000,), (33, 17), (1,)]]
    ours = gradient.norm(grads)
    assert isinstance(ours, float)  # the C kernel path: no tensor, no dispatch
    ref = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in grads]))
    assert ours == pytest.approx(float(ref), rel=1e-12)
    assert math.isnan(gradient.norm([torch.tensor([1.0, float("nan")])]))
    assert math.isinf(gradient.norm([torch.tensor([1.0, float("inf")])]))


def test_grad_norm_falls_back_for_mixed_dtypes():
    n = gradient.norm([torch.ones(4), torch.ones(4, dtype=torch.float64)])
    assert isinstance(n, torch.Tensor) and float(n) == pytest.approx(8**0.5)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_matches_torch_clip_grad_norm(max_norm):
    g = torch.Generator().manual_seed(1)
    a = [torch.nn.Parameter(torch.zeros(50, 3)), torch.nn.Parameter(torch.zeros(7))]
    b = [torch.nn.Parameter(torch.zeros(50, 3)), torch.nn.Parameter(torch.zeros(7))]
    for p, q in zip(a, b):
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()
    grads = [p.grad for p in a]
    gradient.clip_(grads, gradient.norm(grads), max_norm)
    torch.nn.utils.clip_grad_norm_(b, max_norm)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("cls", [SGD, AdamW])
def test_direct_step_equals_step_and_still_runs_hooks(cls):
    torch.manual_seed(0)
    m1, m2 = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    m2.load_state_dict(m1.state_dict())
    o1, o2 = cls(m1.parameters(), lr=0.1), cls(m2.parameters(), lr=0.1)
    step = direct_step(o2)
    for _ in range(3):
        for m in (m1, m2):
            m.zero_grad()
            m(torch.ones(2, 4)).pow(2).sum().backward()
        o1.step()
        step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    seen = []
    o2.register_step_post_hook(lambda *a: seen.append(1))
    step()
    assert seen == [1]  # a registered hook makes it take torch's wrapped path


def test_update_ratios_exact_for_small_tensors_close_for_large():
    torch.manual_seed(0)
    small = [torch.nn.Parameter(torch.randn(40, 30)), torch.nn.Parameter(torch.randn(30))]
    large = [torch.nn.Parameter(torch.randn(1000, 500))]
    opt = torch.optim.SGD([{"params": small}, {"params": large}], lr=0.01)
    for p in small + large:
        p.grad = torch.randn_like(p)
    before, copies = ratio_snapshot(opt), [p.detach().clone() for p in small + large]
    opt.step()
    r = update_ratios(opt, before)

    def exact(ps, olds):
        du = sum(float(((p.detach() - o).double() ** 2).sum()) for p, o in zip(ps, olds))
        return (du / sum(float((o.double() ** 2).sum()) for o in olds)) ** 0.5

    assert r["update_ratio_g0"] == pytest.approx(exact(small, copies[:2]), rel=1e-9)
    assert r["update_ratio_g1"] == pytest.approx(exact(large, copies[2:]), rel=0.05)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adamw_grad_scale_equals_clipping_first(fused, dtype):
    """AdamW.grad_scale (the loop's clip factor, taken as the kernel reads each gradient) gives
    bitwise the step of clip_'s _foreach_mul_ then step, for one step only; the fused kernel
    leaves p.grad as it was."""
    g = torch.Generator().manual_seed(0)
    shapes = [(70_000,), (33, 17), (5,)]
    a = [torch.randn(s, generator=g, dtype=dtype, requires_grad=True) for s in shapes]
    b = [p.detach().clone().requires_grad_() for p in a]
    oa = AdamW(a, lr=1e-2, weight_decay=0.1, fused=fused)
    ob = AdamW(b, lr=1e-2, weight_decay=0.1, fused=fused)
    for step, scale in enumerate([0.37, 1.0, 0.0123456789]):
        grads = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
        for p, q, gr in zip(a, b, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        oa.grad_scale = scale
        oa.step()
        assert oa.grad_scale == 1.0
        torch._foreach_mul_([q.grad for q in b], scale)  # clip_'s pass (the loop without grad_scale), then the step
        ob.step()
        for p, q in zip(a, b):
            assert torch.equal(p, q)
        if fused:
            assert all(torch.equal(p.grad, gr) for p, gr in zip(a, grads))
