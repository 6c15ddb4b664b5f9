"""Progress lines: a log file hears from a run at least every LINE_EVERY_S seconds, flushed."""

from __future__ import annotations

from gradtune.telemetry import progress
from gradtune.telemetry.progress import Progress


def test_lines_come_at_least_every_interval_between_evaluations(monkeypatch, capsys):
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    p = Progress("lines", total=1000, unit="samples")
    for step in range(1, 11):  # 10 steps of 32 samples over 29 s: no line yet
        clock[0] += 2.9
        p.tick(step, loss=1.0, lr=0.1, count=32)
    assert capsys.readouterr().err == ""
    clock[0] += 2.0  # 31 s since the start: one line with what happened since
    p.tick(11, loss=0.5, lr=0.1, count=32)
    line = capsys.readouterr().err.strip()
    assert line.startswith("[train] step 11/1000 loss=0.954545 lr=0.1 samples_per_s=11.35")
    assert "eta=" in line and line.count("\n") == 0
    p.report(12, {"loss": 0.4})  # an evaluation line restarts the 30 s
    capsys.readouterr()
    clock[0] += 29.0
    p.tick(13, loss=0.4, lr=0.1, count=32)
    assert capsys.readouterr().err == ""


def test_off_and_bar_modes_print_no_lines(monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    p = Progress("off", total=10)
    clock[0] += 100
    p.tick(1, 1.0, 0.1, 1)
    assert capsys.readouterr().err == ""


def test_duration_format():
    assert progress._duration(42) == "42s" and progress._duration(185) == "3m05s"
    assert progress._duration(3720) == "1h02m"
