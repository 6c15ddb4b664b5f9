"""Learning-rate range test: grow lr exponentially over a short run, watch the loss, suggest one.

Too small a rate crawls (flat loss), a good one descends fast, too large oscillates then
diverges. From the run's own initial weights, with its own optimizer, batches and clipping, lr
goes from ``min_lr`` to ``max_lr`` geometrically, one step per rate; the sweep stops once the
running loss exceeds 4x its best (or turns non-finite): that is the divergence point.

The rule, picked by measurement (``bench/lr_find.py``: the suggestion against the best rate of
a grid, each point trained for a fixed budget, on linear regression, an MLP, logistic
regression, a small GPT and a MiniLM head; the figures are in the README, "How lr-find and
lr: auto choose"):

* density: ``STEPS_PER_DECADE`` steps per decade of lr. Fewer and each rate gets too few steps
  for its effect to show; more and the sweep trains so long at each rate that the loss turns up
  earlier, which the fraction below is calibrated against. The loss curve needs a fixed
  density, not a number of epochs: a few epochs of a small table are fewer steps than this
  anyway, and an epoch of a large corpus would cost more than many training runs.
* smoothing: a centred mean over +-0.1 decade of lr: it has no lag, unlike an exponential
  average, so the minimum lies where the loss really bottoms out.
* suggestion: the lr at the smoothed minimum - where the loss stops improving, the edge of
  stability - divided by ``FRACTION``: the minimum sits a few times above the best fixed rate on
  every model measured. Also measured and rejected: the steepest descent of the smoothed curve
  (the loss falls fastest early, long before the best rate), the minimum of an exponential
  average (its lag moves the minimum with the sweep's density), other smoothing windows and
  fractions.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from gradtune.config import Config
from gradtune.data.sampler import make_sampler
from gradtune.jobs import curvature
from gradtune.jobs.registry import build
from gradtune.loop.gradient import accumulate, clip_, norm
from gradtune.optim.build import make_optimizer
from gradtune.runtime.atomic import write_text
from gradtune.runtime.device import autocast, resolve_device
from gradtune.telemetry.plots import plot_curves

STEPS_PER_DECADE = 43  # default sweep density (see the module doc)
SMOOTH_DECADES = 0.1  # half-width of the centred smoothing window, in decades of lr
FRACTION = 5.0  # suggestion = lr at the smoothed minimum / FRACTION
STOP_FACTOR = 4.0  # the sweep stops when the running loss exceeds this multiple of its best
RULE = f"lr at the minimum of the loss smoothed over +-{SMOOTH_DECADES:g} decade, / {FRACTION:g}"


@dataclass
class LRFind:
    lrs: list[float]
    losses: list[float]  # each step's mean batch loss, before its update
    smoothed: list[float]  # centred mean over +-SMOOTH_DECADES of lr
    suggestion: float
    lowest: float  # lr at the smoothed minimum: where the loss stops improving
    divergence: Optional[float]  # lr at which the sweep stopped as diverged; None: reached max_lr
    steps: int  # planned (the sweep stops early at divergence)
    note: str = ""  # a warning when the curve does not bracket a good rate


def default_steps(min_lr: float, max_lr: float) -> int:
    """STEPS_PER_DECADE per decade of the range, at least 50."""
    return max(50, math.ceil(STEPS_PER_DECADE * math.log10(max_lr / min_lr)))


def smooth(lrs: list[float], losses: list[float]) -> list[float]:
    """Centred mean of ``losses`` over the points within SMOOTH_DECADES (in log10 lr) of each."""
    if len(lrs) < 2:
        return list(losses)
    per_decade = (len(lrs) - 1) / max(math.log10(lrs[-1] / lrs[0]), 1e-12)
    half = max(1, round(SMOOTH_DECADES * per_decade))
    out = []
    for i in range(len(losses)):
        window = losses[max(0, i - half) : i + half + 1]
        out.append(sum(window) / len(window))
    return out


def suggest(lrs: list[float], losses: list[float], diverged: bool) -> tuple[float, float, list[float], str]:
    """(suggestion, lr at the smoothed minimum, smoothed curve, note)."""
    smoothed = smooth(lrs, losses)
    i = min(range(len(smoothed)), key=smoothed.__getitem__)
    note = ""
    if i == len(smoothed) - 1 and not diverged:
        note = "the loss was still falling at --max-lr: the suggestion is a lower bound; raise --max-lr"
    elif i <= len(smoothed) // 20:
        note = "the loss never fell: lower --min-lr, or check the data and the model"
    return lrs[i] / FRACTION, lrs[i], smoothed, note


def _prepare(cfg: Config):
    """(job, cfg with numbers for lr/momentum auto) - the sweep sets lr itself."""
    job = build(cfg)
    if cfg.lr == "auto":
        cfg, _ = curvature.resolve(job, cfg)
    return job, cfg


def _sweep(cfg: Config, min_lr: float, max_lr: float, steps: int) -> tuple[list[float], list[float], bool]:
    """(lrs, losses, diverged): one step per rate, geometric from min_lr to max_lr."""
    job, cfg = _prepare(cfg)
    device = resolve_device(cfg.device)
    model = job.model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, job.param_groups or params, model)
    sampler = make_sampler(job, cfg)
    # fp16 needs the loop's loss scale and its skips (loop/loss_scale.py): the sweep runs fp32 then.
    amp = autocast("fp32" if cfg.precision == "fp16" else cfg.precision, device)
    # optimizer=muon: the Muon groups keep muon_lr's ratio to lr; the sweep (and suggestion) is lr's
    ratios = [g["lr"] / cfg.lr if g.get("muon") and cfg.lr else 1.0 for g in opt.param_groups]
    lrs: list[float] = []
    losses: list[float] = []
    avg, best = 0.0, math.inf
    for i in range(steps):
        lr = min_lr * (max_lr / min_lr) ** (i / max(1, steps - 1))
        for g, ratio in zip(opt.param_groups, ratios):
            g["lr"] = lr * ratio
        for p in params:
            p.grad = None
        loss_sum, count, _ = accumulate(model, job.objective, job.train, next(sampler).micro, device, amp)
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, 1.0 / float(count))  # the gradient of the mean, as the loop
        loss = float(loss_sum) / float(count)
        if not math.isfinite(loss):
            return lrs, losses, True
        lrs.append(lr)
        losses.append(loss)
        # The stop test runs on an exponential average (beta 0.9, bias-corrected): one noisy
        # mini-batch must not end the sweep.
        avg = 0.9 * avg + 0.1 * loss
        running = avg / (1 - 0.9 ** (i + 1))
        best = min(best, running)
        if running > STOP_FACTOR * best and i > 5:
            return lrs, losses, True
        if cfg.clip_grad_norm is not None:  # as the run will: clipping changes where it diverges
            clip_(grads, norm(grads), cfg.clip_grad_norm)
        opt.step()
    return lrs, losses, False


def lr_find(cfg: Config, min_lr: float = 1e-6, max_lr: float = 10.0, steps: Optional[int] = None) -> LRFind:
    """The range test on the model, data, optimizer and batch size ``cfg`` describes."""
    steps = steps or default_steps(min_lr, max_lr)
    lrs, losses, diverged = _sweep(cfg, min_lr, max_lr, steps)
    if not losses:
        nan = float("nan")
        return LRFind([], [], [], nan, nan, min_lr, steps, "the loss was not finite at the first step")
    suggestion, lowest, smoothed, note = suggest(lrs, losses, diverged)
    return LRFind(lrs, losses, smoothed, suggestion, lowest, lrs[-1] if diverged else None, steps, note)


def plot(result: LRFind, path: Path, title: Optional[str] = None) -> Path:
    """Loss against lr (log), the raw per-step losses faint under the smoothed curve, with the
    suggestion, the minimum and the divergence point marked."""
    marks = [(result.suggestion, "suggested lr"), (result.lowest, "lowest loss at")]
    if result.divergence is not None:
        marks.append((result.divergence, "diverged at"))
    curves = {"loss per step": (result.lrs, result.losses), "smoothed (+-0.1 decade)": (result.lrs, result.smoothed)}
    # The y range of the smoothed curve up to its minimum, padded: the raw batch losses' spikes
    # and the diverging tail leave the frame instead of flattening the part that decides.
    end = result.lrs.index(result.lowest) + 1 if result.lowest in result.lrs else len(result.lrs)
    head = [v for v in result.smoothed[:end] if math.isfinite(v)] or [0.0, 1.0]
    lo, hi = min(head), max(head)
    span = max(hi - lo, 1e-12 + 1e-3 * abs(hi))
    return plot_curves(
        curves,
        path,
        title or "lr range test",
        xlabel="learning rate",
        ylabel="training loss",
        logx=True,
        logy=False,
        marks=marks,
        faint=["loss per step"],
        ylim=(lo - 0.15 * span, hi + 0.35 * span),
    )


def save(result: LRFind, path: Path, min_lr: float, max_lr: float) -> Path:
    """lr_find.json: the curve and the decision, written atomically (non-finite numbers as null)."""

    def num(v):
        return v if v is not None and math.isfinite(v) else None

    out = {
        **{k: num(v) if isinstance(v, float) else v for k, v in dataclasses.asdict(result).items()},
        "losses": [num(v) for v in result.losses],
        "smoothed": [num(v) for v in result.smoothed],
        "min_lr": min_lr,
        "max_lr": max_lr,
        "rule": RULE,
    }
    write_text(path, json.dumps(out, indent=1))
    return path
