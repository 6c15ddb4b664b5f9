"""What a run shows while it trains: a progress bar on a terminal, quiet lines in CI and logs.

Nothing here reads device tensors: the loop hands over Python numbers (the step's loss, which
the guard reads anyway, its lr and its sample or token count). ``tick`` runs every step and
returns after one clock read unless a line or a bar refresh is due, so it costs well under a
microsecond on the hot path.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any


def _duration(seconds: float) -> str:
    """'1h02m', '3m05s', '42s'."""
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return str(v)


LINE_EVERY_S = 30.0  # ``lines``: longest silence between two lines (a log tailed with tail -f)
BAR_EVERY_S = 0.5  # ``bar``: how often the bar moves between evaluations


class Progress:
    """``bar``: tqdm on stderr, refreshed at most ~10 times a second; ``lines``: one line per
    evaluation on stderr and one at least every LINE_EVERY_S seconds between them (step, loss,
    lr, throughput, ETA), each flushed; ``off``: silent. ``auto`` picks bar on a terminal (not
    in CI). ``unit`` names what the loop counts per step: samples, or tokens for language models."""

    def __init__(self, mode: str, total: int, desc: str = "train", unit: str = "samples", start: int = 0) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() and not os.environ.get("CI") else "lines"
        self.mode, self.total, self.desc, self.unit = mode, total, desc, unit
        self.bar = None
        self.last_step = 0
        self.t0 = self.t_line = time.monotonic()
        self.start = start  # the step the clock started at (a resumed run's checkpoint)
        self.loss_sum, self.steps, self.count = 0.0, 0, 0.0  # since the last line
        every = LINE_EVERY_S if mode == "lines" else BAR_EVERY_S
        self.next_due = self.t0 + every if mode in ("lines", "bar") else math.inf
        self.every = every
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", mininterval=0.1, dynamic_ncols=True, leave=True)

    def tick(self, step: int, loss: float, lr: float, count: float) -> None:
        """After each applied step: accumulate; print a line or move the bar when one is due."""
        self.loss_sum += loss
        self.steps += 1
        self.count += count
        now = time.monotonic()
        if now < self.next_due:
            return
        self.next_due = now + self.every
        if self.bar is not None:
            self.advance(step)
            return
        rate = self.count / max(now - self.t_line, 1e-9)
        per_step = (now - self.t0) / max(step - self.start, 1)
        eta = per_step * (self.total - step)
        print(
            f"[{self.desc}] step {step}/{self.total} loss={self.loss_sum / self.steps:.6g} lr={lr:.3g} "
            f"{self.unit}_per_s={rate:.4g} eta={_duration(eta)}",
            file=sys.stderr,
            flush=True,
        )
        self.loss_sum, self.steps, self.count, self.t_line = 0.0, 0, 0.0, now

    def retotal(self, total: int) -> None:
        """A new step total (max_time fixes it once the first steps are timed)."""
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def advance(self, step: int) -> None:
        """Called at log points only (not every step): moves the bar to ``step``."""
        if self.bar is not None:
            self.bar.update(step - self.last_step)
            self.last_step = step

    def report(self, step: int, values: dict[str, Any]) -> None:
        self.advance(step)
        if self.bar is not None:
            self.bar.set_postfix(
                {k: _fmt(v) for k, v in values.items() if k in ("loss", "val_loss", "lr")}, refresh=False
            )
        elif self.mode == "lines":
            body = " ".join(f"{k}={_fmt(v)}" for k, v in values.items() if not isinstance(v, (dict, list)))
            print(f"[{self.desc}] step {step}/{self.total} {body}", file=sys.stderr, flush=True)
            now = time.monotonic()  # the next progress line is due LINE_EVERY_S after this one
            self.next_due, self.t_line = now + self.every, now
            self.loss_sum, self.steps, self.count = 0.0, 0, 0.0

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.mode != "off":
            print(text, file=sys.stderr, flush=True)

    def close(self, step: int) -> None:
        if self.bar is not None:
            self.advance(step)
            self.bar.close()
