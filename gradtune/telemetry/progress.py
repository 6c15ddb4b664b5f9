"""What a run shows while it trains: a progress bar on a terminal, quiet lines in CI and logs.

Nothing here reads device tensors per step: the loop hands over Python numbers only at log and
evaluation points, so telemetry costs no host sync on the hot path.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return str(v)


class Progress:
    """``bar``: tqdm on stderr, refreshed at most ~10 times a second; ``lines``: one line per
    evaluation/log point on stderr; ``off``: silent. ``auto`` picks bar on a terminal (not in CI)."""

    def __init__(self, mode: str, total: int, desc: str = "train") -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() and not os.environ.get("CI") else "lines"
        self.mode, self.total, self.desc = mode, total, desc
        self.bar = None
        self.last_step = 0
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", mininterval=0.1, dynamic_ncols=True, leave=True)

    def advance(self, step: int) -> None:
        """Called at log points only (not every step): moves the bar to ``step``."""
        if self.bar is not None:
            self.bar.update(step - self.last_step)
            self.last_step = step

    def report(self, step: int, values: dict[str, Any]) -> None:
        self.advance(step)
        if self.bar is not None:
            self.bar.set_postfix({k: _fmt(v) for k, v in values.items() if k in ("loss", "val_loss", "lr")},
                                 refresh=False)
        elif self.mode == "lines":
            body = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
            print(f"[{self.desc}] step {step}/{self.total} {body}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.mode != "off":
            print(text, file=sys.stderr, flush=True)

    def close(self, step: int) -> None:
        if self.bar is not None:
            self.advance(step)
            self.bar.close()
