"""Linear models: y = x W^T + b. Linear regression (MSE), logistic / softmax regression (CE).

``closed_form`` is the least-squares optimum, the oracle gradient descent must reach.
"""

from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int = 1) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, out)
        return self.linear(x)


def closed_form(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares with intercept, in float64: argmin_w,b mean((x w + b - y)^2).

    x (N, F), y (N,) -> (w (F,), b ()). Solved by QR (lstsq) rather than the normal equations,
    whose X^T X squares the condition number.
    """
    x64, y64 = x.double(), y.double()
    if not (torch.isfinite(x64).all() and torch.isfinite(y64).all()):
        # LAPACK's gelsy rejects NaN/inf as an "illegal argument", which torch reports as an
        # internal assert; callers validate their data, this keeps the failure a plain one.
        raise ValueError("closed_form: x and y must be finite")
    design = torch.cat([x64, torch.ones(x64.shape[0], 1, dtype=torch.float64)], dim=1)  # (N, F+1)
    sol = torch.linalg.lstsq(design, y64.unsqueeze(1)).solution.squeeze(1)
    return sol[:-1], sol[-1]


def closed_form_loss(x: torch.Tensor, y: torch.Tensor, half: bool = False) -> float:
    """Training MSE at the least-squares optimum (with the 1/(2m) convention if ``half``)."""
    w, b = closed_form(x, y)
    mse = ((x.double() @ w + b - y.double()) ** 2).mean().item()
    return mse / 2 if half else mse
