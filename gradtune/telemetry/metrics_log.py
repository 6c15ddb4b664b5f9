"""metrics.jsonl: what a run measured, one JSON object per logged step, evaluation or event.

Nothing here reads device tensors: the loop hands over Python numbers only at log and evaluation
points, so logging costs no host sync on the hot path.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional, TextIO


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step/evaluation/event, flushed as written."""

    def __init__(self, path: Optional[Path], append: bool = False) -> None:
        self.path = path
        self.file: Optional[TextIO] = None
        self.t0 = time.perf_counter()
        self.rows: list[dict[str, Any]] = []  # kept in memory for the plot and the summary
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = path.open("a" if append else "w", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        row = {"time": round(time.perf_counter() - self.t0, 4), **row}
        self.rows.append(row)
        if self.file is not None:
            clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in row.items()}
            self.file.write(json.dumps(clean) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
