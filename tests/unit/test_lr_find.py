"""The lr range test: its suggestion where the answer is known (batch GD on linear regression,
whose stable rates are lr < 2/L and whose best are near 1/L..2/L), the rule on synthetic curves,
the marks on the plot and lr_find.json."""

from __future__ import annotations

import json
import math

import pytest

from gradtune import lr_find
from gradtune.cli import main
from gradtune.config import load_config
from gradtune.jobs import curvature
from gradtune.jobs.registry import build

LINEAR = ["model=linear", "data=diabetes", "batch_size=full", "progress=off", "device=cpu"]


def test_suggestion_on_linear_regression_is_a_stable_rate_near_1_over_L():
    cfg = load_config(None, LINEAR)
    L = curvature.curvature(build(cfg), cfg).L  # exact: the Hessian of the MSE is 2 X'X/m
    r = lr_find.lr_find(cfg)
    assert r.steps == lr_find.default_steps(1e-6, 10.0) == 301
    # The loss bottoms out past 2/L (where GD starts to diverge), not before it ...
    assert 1 / L < r.lowest < 10 / L, (r.lowest, L)
    assert r.divergence is not None and r.divergence > 2 / L
    # ... and the suggestion is a rate that converges, within 3x of 1/L.
    assert 1 / (3 * L) <= r.suggestion < 2 / L, (r.suggestion, 1 / L)
    assert r.note == ""


def _valley(lowest: float, n: int = 301) -> tuple[list[float], list[float]]:
    """A loss flat at 1, falling to 0.2 at ``lowest`` and blowing up past it (v: decades from it)."""
    lrs = [1e-6 * 1e7 ** (i / (n - 1)) for i in range(n)]
    x = [math.log10(lr / lowest) for lr in lrs]
    return lrs, [min(1.0, 0.2 + 0.3 * v * v) if v < 0 else 0.2 + 30 * v * v for v in x]


@pytest.mark.parametrize("lowest", [1e-3, 0.05, 1.0])
def test_rule_finds_the_minimum_and_takes_a_fraction(lowest):
    lrs, losses = _valley(lowest)
    suggestion, found, smoothed, note = lr_find.suggest(lrs, losses, diverged=True)
    # Within the smoothing window: a steep right side pulls the smoothed minimum a little left.
    assert abs(math.log10(found / lowest)) <= lr_find.SMOOTH_DECADES
    assert suggestion == pytest.approx(found / lr_find.FRACTION)
    assert len(smoothed) == len(lrs) and note == ""


def test_rule_says_when_the_curve_does_not_bracket_a_good_rate():
    lrs = [1e-6 * 1e7 ** (i / 300) for i in range(301)]
    falling = [1.0 - i / 400 for i in range(301)]
    assert "still falling" in lr_find.suggest(lrs, falling, diverged=False)[3]
    rising = [1.0 + i / 400 for i in range(301)]
    assert "never fell" in lr_find.suggest(lrs, rising, diverged=True)[3]


def test_plot_marks_the_suggestion_the_minimum_and_the_divergence(tmp_path, monkeypatch):
    lrs, losses = _valley(0.05)
    suggestion, lowest, smoothed, _ = lr_find.suggest(lrs, losses, diverged=True)
    r = lr_find.LRFind(lrs, losses, smoothed, suggestion, lowest, 0.3, 301)
    seen = {}

    def record(curves, path, title, **kw):
        seen.update(kw, curves=curves)
        return path

    monkeypatch.setattr(lr_find, "plot_curves", record)
    lr_find.plot(r, tmp_path / "x.png")
    assert [label for _, label in seen["marks"]] == ["suggested lr", "lowest loss at", "diverged at"]
    assert [x for x, _ in seen["marks"]] == [suggestion, lowest, 0.3]
    lo, hi = seen["ylim"]  # framed on the smoothed curve, not on the diverging tail
    assert lo < min(smoothed) and hi < max(losses)
    monkeypatch.undo()
    png = lr_find.plot(r, tmp_path / "lr_find.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["lr-find", *LINEAR, f"out_dir={out}", "--steps", "120"]) == 0
    data = json.loads((out / "lr_find.json").read_text())
    assert len(data["lrs"]) == len(data["losses"]) == len(data["smoothed"]) <= 120
    assert data["suggestion"] == pytest.approx(data["lowest"] / lr_find.FRACTION)
    assert data["divergence"] == pytest.approx(data["lrs"][-1]) and data["rule"] == lr_find.RULE
    assert (out / "lr_find.png").stat().st_size > 0
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind
    assert f"suggested lr = {data['suggestion']:.3g}" in capsys.readouterr().out
