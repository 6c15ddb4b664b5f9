"""Muon's orthogonalisation: the quintic Newton-Schulz iteration, one matrix at a time (the
reference, torch.optim.Muon's operations) or equally shaped matrices as one batch (the fast path).

    X <- X / ||X||_F;  k times:  A = X X^T,  X <- a X + (b A + c A^2) X

with (a, b, c) = (3.4445, -4.7750, 2.0315) chosen to raise small singular values fastest (Keller
Jordan's Muon, the nanoGPT speedrun and torch.optim.Muon): the singular values land near 1
(roughly 0.7-1.2), not exactly 1, which does not hurt training. It runs in bfloat16 as torch's
does, on the wide orientation (rows <= columns) so A is the small Gram matrix.

Why a batch: a transformer's hidden matrices come in a few shapes, repeated once per layer (the
recipe's GPT: 28 matrices, 3 shapes in the wide orientation), and one at a time each is 3 k small
products; a 192 x 192 product keeps 2 CPU threads busy for tens of microseconds, so much of that
time goes to splitting each product between them. ``orthogonalise`` stacks every group of equally
shaped float32 updates (each transposed and normalised exactly as the reference does it) into one
(n, rows, cols) tensor and runs the same three products a step through ``bmm`` / ``baddbmm``.

Equal to the reference bit for bit by construction, not by hope: the first time a (shape, count,
device) is seen, both are computed and compared, and where torch's batched product does not give
the per-matrix bits (another kernel on this machine), that group stays on the reference for the
rest of the process. Groups of one, bfloat16 updates (``.bfloat16()`` would not copy them) and
matrices under MIN_ROWS rows (torch multiplies those with a naive loop of its own) stay there too.
"""

from __future__ import annotations

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # (a, b, c) of the quintic
NS_STEPS = 5
NS_EPS = 1e-7  # floor of the Frobenius norm the update is first divided by
MIN_ROWS = 8  # a step's smallest product is rows^3 multiply-adds; torch loops naively below ~400

_BATCH_EQUAL: dict[tuple, bool] = {}  # (rows, cols, n, device) -> batched == one at a time, bitwise


def _normalised(g: Tensor, eps: float) -> Tensor:
    """The iteration's start: ``g`` in bfloat16, in the wide orientation, divided by its norm."""
    x = g.bfloat16()
    if g.size(0) > g.size(1):  # (r, c) with r > c: iterate on the (c, r) transpose so x @ x.T is (c, c)
        x = x.T
    return x.div_(x.norm().clamp(min=eps))  # Frobenius norm >= spectral norm: singular values now <= 1


def newton_schulz(g: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    """The orthogonalised (rows, cols) matrix ``g`` in bfloat16, torch's operations in torch's order."""
    if g.ndim != 2:
        raise ValueError(f"Muon orthogonalises 2-D matrices; got shape {tuple(g.shape)}")
    a, b, c = coefficients
    x = _normalised(g, eps)
    for _ in range(steps):
        gram = x @ x.T  # A = X X^T, (r', r')
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.addmm(x, poly, x, beta=a)  # a X + (b A + c A^2) X
    return x.T if g.size(0) > g.size(1) else x


def _iterate(x: Tensor, coefficients: tuple[float, float, float], steps: int) -> Tensor:
    """``newton_schulz``'s loop on a batch x (n, r, c): the same products, n at a time."""
    a, b, c = coefficients
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)  # (n, r, r)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x


def orthogonalise(updates: list[Tensor], coefficients: tuple[float, float, float], steps: int, eps: float) -> list:
    """``newton_schulz`` of every 2-D update, equally shaped float32 ones as one batch (module docstring)."""
    out: list = [None] * len(updates)
    groups: dict[tuple, list[int]] = {}
    for i, g in enumerate(updates):
        batchable = g.ndim == 2 and g.dtype == torch.float32 and min(g.shape) >= MIN_ROWS
        groups.setdefault((min(g.shape), max(g.shape), g.device) if batchable else (i,), []).append(i)
    for key, idx in groups.items():
        key = (*key, len(idx))
        if len(idx) == 1 or not _BATCH_EQUAL.get(key, True):
            for i in idx:
                out[i] = newton_schulz(updates[i], coefficients, steps, eps)
            continue
        x = _iterate(torch.stack([_normalised(updates[i], eps) for i in idx]), coefficients, steps)  # (n, r, c)
        batch = [x[j].T if updates[i].size(0) > updates[i].size(1) else x[j] for j, i in enumerate(idx)]
        if key not in _BATCH_EQUAL:  # first sight: the reference decides, and gives this step's values
            reference = [newton_schulz(updates[i], coefficients, steps, eps) for i in idx]
            _BATCH_EQUAL[key] = all(torch.equal(r, b) for r, b in zip(reference, batch))
            batch = reference
        for i, o in zip(idx, batch):
            out[i] = o
    return out
