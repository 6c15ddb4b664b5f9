"""Test instruments, inert unless their environment variable is set.

``GRADTUNE_FAULTS="ckpt.model@2,micro@37=TERM"``: at the 2nd time this process reaches the
point ``ckpt.model`` it sends itself SIGKILL; at the 37th micro-batch, SIGTERM. Points:
    micro        after each micro-batch's backward (inside an accumulation window)
    step         after an optimizer step, before anything else of that step
    ckpt.model   checkpoint: weights written into the temporary folder
    ckpt.files   checkpoint: every file written, manifest not yet
    ckpt.rename  checkpoint: folder complete, not yet renamed into place
    ckpt.after   checkpoint: renamed into place, old ones not yet pruned
Why self-inflicted signals: a kill at an exact, reproducible point (during a write, inside an
accumulation window) in a few milliseconds, where a timer would mostly hit the idle parts.

``GRADTUNE_PROBE=path``: every applied step appends ``{"step", "ids"}`` (its sample ids) to
``path``, so tests can prove that across kills no step's data is seen twice or skipped.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Optional, TextIO

_PLAN: dict[str, tuple[int, int]] = {}
_SEEN: dict[str, int] = {}


def configure(spec: str) -> None:
    """Replace the plan (a forked test process sets its own; see tests/test_kill_resume.py)."""
    _PLAN.clear()
    _SEEN.clear()
    for item in filter(None, spec.split(",")):
        point, _, rest = item.partition("@")
        count, _, sig = rest.partition("=")
        _PLAN[point] = (int(count), getattr(signal, f"SIG{sig or 'KILL'}"))


configure(os.environ.get("GRADTUNE_FAULTS", ""))


def hit(point: str) -> None:
    """Mark that ``point`` was reached; deliver the planned signal on the planned visit."""
    if point not in _PLAN:
        return
    _SEEN[point] = _SEEN.get(point, 0) + 1
    count, sig = _PLAN[point]
    if _SEEN[point] == count:
        os.kill(os.getpid(), sig)


class Probe:
    """Appends each applied step's sample ids to ``GRADTUNE_PROBE`` (no-op when unset)."""

    def __init__(self) -> None:
        path = os.environ.get("GRADTUNE_PROBE")
        self.file: Optional[TextIO] = open(path, "a", encoding="utf-8") if path else None

    def record(self, step: int, ids: list[int]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "ids": ids}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
