"""gradtune.optim against the oracle, torch.optim: same trajectory, same state, same schedulers.

Error measure: per tensor, max|ours - torch| / max|torch| (a relative error that stays
meaningful for entries near zero). Bounds: 1e-12 in float64, 1e-6 in float32, after 200 steps.
Each optimizer runs on both paths: fused=False (reference) and fused=True (C fast path).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch

from gradtune.optim import SGD, AdamW

SHAPES = [(), (7,), (5, 3), (2, 3, 4, 5), (40, 41)]  # scalar, vector, matrix, 4-D, odd-sized
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
STEPS = 200


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in SHAPES]


def groups(params: list[torch.Tensor], kw2: dict) -> list[dict]:
    """Two groups with different lr / weight_decay (kw2 overrides for the second)."""
    return [{"params": params[:2]}, {"params": params[2:], **kw2}]


def set_grads(params: list[torch.Tensor], step: int, gen: torch.Generator) -> None:
    """Fresh gradients; param i has grad None on steps where (step + i) % 7 == 0."""
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        p.grad = None if (step + i) % 7 == 0 else g


def run_pair(
    make_ours: Callable, make_torch: Callable, dtype: torch.dtype, save_at: int | None = None, steps: int = STEPS
) -> None:
    """Step ours and torch on identical params/grads; optionally reload ours from a state_dict."""
    ours_p, ref_p = make_params(dtype), make_params(dtype)
    ours, ref = make_ours(ours_p), make_torch(ref_p)
    gen_o, gen_r = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for step in range(steps):
        if step == save_at:  # save ours, load into a fresh ours, continue
            buf = io.BytesIO()
            torch.save(ours.state_dict(), buf)
            buf.seek(0)
            ours = make_ours(ours_p)
            ours.load_state_dict(torch.load(buf, weights_only=True))
        set_grads(ours_p, step, gen_o)
        set_grads(ref_p, step, gen_r)
        ours.step()
        ref.step()
    for a, b in zip(ours_p, ref_p):
        assert rel_err(a.detach(), b.detach()) <= TOL[dtype], (a.shape, rel_err(a, b))
    for a, b in zip(ours_p, ref_p):  # state too: same keys, same values
        sa, sb = ours.state[a], ref.state[b]
        assert set(sa) == set(sb)
        for k in sa:
            assert rel_err(sa[k].double(), sb[k].double()) <= TOL[dtype], k


SGD_CASES = {
    "plain": dict(lr=0.05),
    "momentum": dict(lr=0.05, momentum=0.9),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "weight_decay": dict(lr=0.05, weight_decay=0.1),
    "dampening": dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01),
    "nesterov_wd": dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.05),
}
ADAMW_CASES = {
    "default": dict(),
    "no_decay": dict(lr=3e-3, weight_decay=0.0),
    "small_beta1": dict(lr=1e-2, betas=(0.3, 0.99), eps=1e-6, weight_decay=0.1),  # lerp w >= .5
}
DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_matches_torch(case: str, dtype: torch.dtype, fused: bool) -> None:
    kw = SGD_CASES[case]
    kw2 = {"lr": kw["lr"] * 0.5, "weight_decay": 0.02}
    run_pair(
        lambda p: SGD(groups(p, kw2), **kw, fused=fused),
        lambda p: torch.optim.SGD(groups(p, kw2), **kw, foreach=False),
        dtype,
    )


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ADAMW_CASES))
def test_adamw_matches_torch(case: str, dtype: torch.dtype, fused: bool) -> None:
    kw = ADAMW_CASES[case]
    kw2 = {"lr": 2e-3, "weight_decay": 0.3}
    run_pair(
        lambda p: AdamW(groups(p, kw2), **kw, fused=fused),
        lambda p: torch.optim.AdamW(groups(p, kw2), **kw, foreach=False),
        dtype,
    )


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_state_dict_resume_matches_torch(name: str, dtype: torch.dtype, fused: bool) -> None:
    if name == "sgd":
        kw = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
        ours, ref = (lambda p: SGD(p, **kw, fused=fused)), (lambda p: torch.optim.SGD(p, **kw))
    else:
        kw = dict(lr=1e-2, weight_decay=0.1)
        ours, ref = (lambda p: AdamW(p, **kw, fused=fused)), (lambda p: torch.optim.AdamW(p, **kw))
    run_pair(ours, ref, dtype, save_at=100)


def test_state_dict_structure_matches_torch() -> None:
    for ours_cls, ref_cls, kw in [
        (SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
        (AdamW, torch.optim.AdamW, dict(lr=1e-3)),
    ]:
        pa, pb = make_params(torch.float32), make_params(torch.float32)
        a, b = ours_cls(pa, **kw), ref_cls(pb, **kw)
        for p, q in zip(pa, pb):
            p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
        a.step(), b.step()
        sa, sb = a.state_dict(), b.state_dict()
        assert sa["state"].keys() == sb["state"].keys()
        for i in sa["state"]:
            assert sa["state"][i].keys() == sb["state"][i].keys()
            for k, v in sa["state"][i].items():
                w = sb["state"][i][k]
                assert (v.dtype, v.shape, v.device) == (w.dtype, w.shape, w.device), k
        assert sa["param_groups"][0]["params"] == sb["param_groups"][0]["params"]
        # torch's state_dict loads into ours (extra torch-only keys are carried along)
        c = ours_cls(pa, **kw)
        c.load_state_dict(sb)
        assert c.param_groups[0]["fused"] is None


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("sched", ["cosine", "lambda"])
def test_lr_schedulers_match_torch(sched: str, fused: bool) -> None:
    def with_sched(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        if sched == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30, eta_min=1e-4)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * 0.97**s)

    for ours_cls, ref_cls, kw in [
        (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
        (AdamW, torch.optim.AdamW, dict(lr=1e-2)),
    ]:
        pa, pb = make_params(torch.float64), make_params(torch.float64)
        a, b = ours_cls(pa, **kw, fused=fused), ref_cls(pb, **kw)
        sa, sb = with_sched(a), with_sched(b)
        gen = torch.Generator().manual_seed(3)
        for step in range(50):
            for p, q in zip(pa, pb):
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                q.grad = p.grad.clone()
            a.step(), b.step()
            sa.step(), sb.step()
            assert a.param_groups[0]["lr"] == b.param_groups[0]["lr"]
        for p, q in zip(pa, pb):
            assert rel_err(p.detach(), q.detach()) <= 1e-12


def test_argument_validation() -> None:
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="Invalid learning rate: -0.1"):
        SGD(p, lr=-0.1)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        AdamW(p, lr=-1e-3)
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum"):
        SGD(p, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="zero dampening"):
        SGD(p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="momentum"):
        SGD(p, lr=0.1, momentum=-0.9)
    with pytest.raises(ValueError, match="weight_decay"):
        SGD(p, lr=0.1, weight_decay=-1)
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        AdamW(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="epsilon"):
        AdamW(p, eps=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        AdamW(p, weight_decay=-0.1)


def test_closure_and_no_grad_params() -> None:
    w = torch.ones(3, requires_grad=True)
    frozen = torch.ones(2, requires_grad=True)  # never gets a grad: no state, unchanged
    opt = AdamW([w, frozen], lr=0.1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 3.0
    assert frozen.eq(1).all() and frozen not in opt.state and w.lt(1).all()
