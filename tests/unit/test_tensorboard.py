"""TensorBoardSink: metrics.jsonl's rows, read back from the event files by TensorBoard's own
loader, are the same numbers at the same steps; guard and resume events are text."""

from __future__ import annotations

import builtins
import math
from pathlib import Path
from typing import Any

import pytest

from gradtune.runtime.errors import GradtuneError
from gradtune.telemetry import tensorboard as tb_module
from gradtune.telemetry.metrics_log import MetricsLog
from gradtune.telemetry.tensorboard import TensorBoardSink

CHECKPOINT = 10  # the resumed run restarts from the checkpoint taken after step 10's evaluation


def _steps(log: MetricsLog, first: int, last: int, scale: float) -> None:
    """What a language-model run logs: a step row per step, an evaluation every 5 steps."""
    for s in range(first, last + 1):
        log.write({"kind": "step", "step": s, "loss": scale * 3.0 / s, "lr": 1e-3 * s / 13})
        if s % 5 == 0:
            log.write(
                {
                    "kind": "eval",
                    "step": s,
                    "epoch": round(s / 13, 4),
                    "lr": 1e-3 * s / 13,
                    "loss": scale * 2.9 / s,
                    "ppl": math.exp(2.9 / s),
                    "grad_norm": 0.7 + s,
                    "update_ratio_g0": 1.25e-3,
                    "update_ratio_g1": 3e-4,
                    "tokens_per_s": 12345.5,
                    "mfu": 0.0123,
                    "val_loss": scale * 3.1 / s,
                    "val_ppl": math.exp(3.1 / s),
                }
            )


def _run(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A run killed after step 13, then resumed from step 10: (every row written in order, the
    rows TensorBoard should show: the interrupted run's rows after the checkpoint are orphans)."""
    first = MetricsLog(folder / "metrics.jsonl", sinks=[TensorBoardSink(folder / "tb")])
    _steps(first, 1, 6, 1.0)
    # The 7th step's loss is NaN: skipped (no step row), the counter stays at 6, then retried.
    first.write(
        {
            "kind": "guard",
            "step": 6,
            "action": "skip",
            "reason": "non-finite loss (nan)",
            "epoch": 0,
            "index": 6,
            "sample_ids": [12, 13],
        }
    )
    _steps(first, 7, 13, 1.0)
    first.close()
    kept = [r for r in first.rows if r["step"] <= CHECKPOINT]
    second = MetricsLog(folder / "metrics.jsonl", append=True, sinks=[TensorBoardSink(folder / "tb")])
    second.write({"kind": "resume", "step": CHECKPOINT, "checkpoint": "step-00000010", "skipped": []})
    _steps(second, CHECKPOINT + 1, 15, 0.5)  # recomputed with other values: the orphans must go
    second.close()
    return first.rows + second.rows, kept + second.rows


def _accumulator(folder: Path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    ea = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def _expected(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key not in ("kind", "step") and isinstance(value, (int, float)):
                out.setdefault(f"{row['kind']}/{key}", []).append((row["step"], float(value)))
    return out


def test_every_numeric_field_is_a_scalar_at_its_step(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    _, shown = _run(tmp_path)
    ea = _accumulator(tmp_path / "tb")
    expected = _expected(shown)
    assert {
        "step/loss",
        "step/lr",
        "eval/loss",
        "eval/val_loss",
        "eval/val_ppl",
        "eval/grad_norm",
        "eval/update_ratio_g0",
        "eval/tokens_per_s",
        "eval/mfu",
        "guard/index",
        "resume/time",
    } <= set(expected)
    assert sorted(ea.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in ea.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        for (_, value), (_, want) in zip(got, points):
            assert value == pytest.approx(want, rel=1e-6, nan_ok=True), tag
    # The resumed values replaced the orphans (steps 11-13 at half the loss) and the
    # checkpoint's own evaluation stayed.
    assert [e.step for e in ea.Scalars("eval/val_loss")] == [5, 10, 15]
    assert next(e.value for e in ea.Scalars("step/loss") if e.step == 12) == pytest.approx(0.5 * 3.0 / 12, rel=1e-6)


def test_guard_and_resume_rows_are_text(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.util import tensor_util

    _run(tmp_path)
    ea = _accumulator(tmp_path / "tb")
    assert set(ea.PluginTagToContent("text")) == {"guard", "resume"}
    (guard,) = ea.Tensors("guard")
    (resume,) = ea.Tensors("resume")
    assert (guard.step, resume.step) == (6, CHECKPOINT)
    guard_text = tensor_util.make_ndarray(guard.tensor_proto).item().decode()
    assert "**action**: skip" in guard_text and "non-finite loss (nan)" in guard_text
    assert "**sample_ids**: [12, 13]" in guard_text
    assert "step-00000010" in tensor_util.make_ndarray(resume.tensor_proto).item().decode()


def test_an_eval_row_is_on_disk_before_close(tmp_path: Path) -> None:
    """A TensorBoard watching a running job sees each evaluation as it is logged."""
    pytest.importorskip("tensorboard")
    sink = TensorBoardSink(tmp_path / "tb")
    log = MetricsLog(None, sinks=[sink])  # no file (a non-main rank's log) still feeds its sinks
    log.write({"kind": "step", "step": 1, "loss": 2.0, "lr": 0.1})
    log.write({"kind": "eval", "step": 1, "loss": 1.5, "val_loss": 1.75})
    try:
        ea = _accumulator(tmp_path / "tb")
        assert [e.value for e in ea.Scalars("eval/val_loss")] == [1.75]
        assert [e.value for e in ea.Scalars("step/loss")] == [2.0]
    finally:
        log.close()
    log.close()  # closing twice, and a row after close, are harmless
    sink.write({"kind": "eval", "step": 2, "loss": 1.0})


def test_strings_lists_and_none_are_not_scalars_non_finite_are(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    with_sink = MetricsLog(None, sinks=[TensorBoardSink(tmp_path / "tb")])
    with_sink.write(
        {
            "kind": "eval",
            "step": 3,
            "loss": 1.0,
            "note": "x",
            "ids": [1, 2],
            "grad_norm": None,
            "improved": True,
            "mfu": math.inf,
            "val_loss": math.nan,
        }
    )
    with_sink.close()
    ea = _accumulator(tmp_path / "tb")
    assert sorted(ea.Tags()["scalars"]) == ["eval/improved", "eval/loss", "eval/mfu", "eval/time", "eval/val_loss"]
    # Non-finite values are logged as they are: TensorBoard shows them as such.
    assert ea.Scalars("eval/mfu")[0].value == math.inf
    assert math.isnan(ea.Scalars("eval/val_loss")[0].value)
    assert ea.Scalars("eval/improved")[0].value == 1.0
    assert ea.Tags()["tensors"] == []  # an eval row is a measurement, not an event


def test_missing_tensorboard_is_one_line_gradtune_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_tensorboard(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(GradtuneError) as err:
        TensorBoardSink(tmp_path / "tb")
    assert str(err.value) == "log_to: tensorboard needs the tensorboard package (pip install tensorboard)"
    assert str(err.value) == tb_module.MISSING and "\n" not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert not (tmp_path / "tb").exists()  # nothing written before the error
