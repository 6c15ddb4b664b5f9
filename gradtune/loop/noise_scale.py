"""The gradient noise scale: how large a batch still pays (McCandlish et al. 2018, "An Empirical
Model of Large-Batch Training", appendix A), from the micro-batches the loop already computes.

With the true gradient G and the per-sample gradient covariance Σ, a batch of B samples has
E|G_B|² = |G|² + tr(Σ)/B. Two batch sizes measured on the same step — the first micro-batch
(b samples) and the whole batch (B) — give unbiased estimates

    |G|²   ≈ (B |G_B|² - b |G_b|²) / (B - b)
    tr(Σ)  ≈ (|G_b|² - |G_B|²) / (1/b - 1/B)

each noisy, so each is averaged (an exponential moving average, as the paper does) before the
ratio B_simple = tr(Σ) / |G|²: the batch size where the gradient's signal and noise are equal.
Training with batch B then takes ~S_min (1 + B_simple/B) steps and ~E_min (1 + B/B_simple)
samples: far below B_simple, a larger batch cuts the steps almost in proportion; far above, it
only spends samples. No extra backward pass: one more gradient norm after the first micro-batch.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from gradtune.loop import gradient
from gradtune.loop.components import Component, ScalarState


class NoiseScale(ScalarState):
    saved = {"g2": float, "trace": float, "weight": float, "batch": float}

    def __init__(self, beta: float = 0.95, unit: str = "samples") -> None:
        self.beta = beta  # EMA decay per step of both estimates
        self.unit = unit  # what the counts count: samples, or tokens for language models
        self.g2 = self.trace = 0.0  # EMAs (not bias-corrected: ``weight`` is)
        self.weight = 0.0
        self.batch = 0.0  # the full batch's size (samples or tokens): the largest measured

    def update(self, b: float, big: float, sq_small: float, sq_big: float) -> None:
        """One step: ``sq_small`` = |mean gradient of the first b samples|², ``sq_big`` = the
        same over the whole batch of ``big`` samples (b < big)."""
        if not (0 < b < big) or not (math.isfinite(sq_small) and math.isfinite(sq_big)):
            return
        g2 = (big * sq_big - b * sq_small) / (big - b)
        trace = (sq_small - sq_big) / (1.0 / b - 1.0 / big)
        k = self.beta
        self.g2, self.trace = k * self.g2 + (1 - k) * g2, k * self.trace + (1 - k) * trace
        self.weight = k * self.weight + (1 - k)
        self.batch = max(self.batch, big)  # an epoch's short last batch is not the batch size

    @property
    def value(self) -> Optional[float]:
        """B_simple in samples (or tokens), None until measured or while |G|² is not positive."""
        if self.weight == 0.0 or self.g2 <= 0.0:
            return None
        return max(self.trace, 0.0) / self.g2

    def advice(self) -> Optional[str]:
        """One line on the batch size, from B_simple and the batch in use."""
        bn, b = self.value, self.batch
        if bn is None or not b:
            return None
        steps = (1 + bn / (2 * b)) / (1 + bn / b)  # doubling the batch: steps and samples factors
        samples = (1 + 2 * b / bn) / (1 + b / bn)
        if b < bn / 4:
            verdict = (
                f"a batch of {b:g} {self.unit} is well below it: "
                f"doubling it would take x{steps:.2f} the steps for x{samples:.2f} the samples"
            )
        elif b > 4 * bn:
            verdict = (
                f"a batch of {b:g} {self.unit} is well above it: "
                f"a batch near {bn:,.0f} would need about as many steps and far fewer samples"
            )
        else:
            verdict = f"a batch of {b:g} {self.unit} is near it: a good trade of steps against samples"
        return f"noise scale ~ {bn:,.0f} {self.unit}: {verdict}"


class NoiseScaleMeter(Component):
    """``noise_scale: true`` on the loop's events: the two gradient norms of each step (first
    micro-batch, whole batch) update the estimate; each evaluation row gets ``noise_scale``; the
    end of the run puts the advice in summary.json. Needs micro-batches, one process."""

    key = "noise"
    wants_first = True

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.noise = NoiseScale(unit=unit)

    def on_gradients(self, grads: list[torch.Tensor], gnorm: Any, count: float, first: Optional[list]) -> None:
        if first:  # [|grad of the first micro-batch's sum|², its count]; the batch's mean grad now
            big = float(gnorm) if gnorm is not None else float(gradient.norm(grads))
            self.noise.update(first[1], count, first[0] / first[1] ** 2, big * big)

    def on_measure(self, row: dict[str, Any]) -> None:
        if self.noise.value is not None:
            row["noise_scale"] = self.noise.value

    def on_run_end(self) -> None:
        n = self.noise
        if n.value is not None:  # summary.json, report, the CLI's advice
            self.view.job.info["noise_scale"] = {"samples": n.value, "batch": n.batch, "advice": n.advice()}

    def state_dict(self) -> dict[str, Any]:
        return self.noise.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.noise.load_state_dict(state)
