"""metrics.jsonl: what a run measured, one JSON object per logged step, evaluation or event.

Nothing here reads device tensors: the loop hands over Python numbers only at log and evaluation
points, so logging costs no host sync on the hot path.

A fresh log never truncates the previous run's file in place: rows go to a temporary sibling,
which replaces metrics.jsonl atomically once its first row is written (or at ``commit``). A run
that fails before measuring anything leaves the old log whole; after the swap the open file *is*
metrics.jsonl, so ``tail -f`` follows it as before. A resumed log appends to the file as it is.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

from gradtune.runtime.atomic import file_mode


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step/evaluation/event, flushed as written."""

    def __init__(self, path: Optional[Path], append: bool = False, sinks: Sequence[Any] = ()) -> None:
        self.path = path
        self.file: Optional[TextIO] = None
        self.pending: Optional[Path] = None  # the temporary file not yet renamed over ``path``
        self.t0 = time.perf_counter()
        self.rows: list[dict[str, Any]] = []  # kept in memory for the plot and the summary
        # Other views of the same rows (TensorBoard): each has write(row) and close(); they get
        # the row as kept here, non-finite floats as they are, even with no file (path None).
        self.sinks = list(sinks)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if append:
            self.file = path.open("a", encoding="utf-8")
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, file_mode())  # the umask's mode, not mkstemp's 0600
        self.file, self.pending = os.fdopen(fd, "w", encoding="utf-8"), Path(tmp)

    def write(self, row: dict[str, Any]) -> None:
        row = {"time": round(time.perf_counter() - self.t0, 4), **row}
        self.rows.append(row)
        if self.file is not None:
            clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in row.items()}
            self.file.write(json.dumps(clean) + "\n")
            self.file.flush()
            self.commit()
        for sink in self.sinks:
            sink.write(row)

    def commit(self) -> None:
        """Put the fresh log in place of the old one (an empty log too, for a run that measured
        nothing); no-op once done, and for an appended log."""
        if self.pending is not None and self.file is not None and self.path is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            os.replace(self.pending, self.path)
            self.pending = None

    def close(self) -> None:
        """Close the file; a fresh log never committed is dropped, the old file kept."""
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.pending is not None:
            self.pending.unlink(missing_ok=True)
            self.pending = None
        for sink in self.sinks:
            sink.close()
