"""Test instruments, inert unless their environment variable is set. One family, ``GRADTUNE_TEST_*``:

``GRADTUNE_TEST_FAULTS="ckpt.model@2,micro@37=TERM,step.begin@6=RAISE/rank1"``: the 2nd time this
process reaches the point ``ckpt.model`` it sends itself SIGKILL; at the 37th micro-batch,
SIGTERM; rank 1 raises at its 6th step. ``=ACTION`` is a signal name (default KILL), ``RAISE``
(a RuntimeError), ``HANG`` (sleeps until killed) or ``INF`` (``hit`` returns True: the caller
makes its values non-finite); ``/rankR`` limits an item to one rank. A point may be named several
times (``grads@2=INF,grads@5=INF``).
Faults fire in the first attempt only (torchrun --max-restarts counts attempts in
TORCHELASTIC_RESTART_COUNT), so a restarted job runs clean. Points:
    step.begin   before a step's batch is drawn (the N-th visit starts step N-1 of a fresh run)
    micro        after each micro-batch's backward (inside an accumulation window)
    step         after an optimizer step, before anything else of that step
    ckpt.model   checkpoint: weights written into the temporary folder
    ckpt.files   checkpoint: every file written, manifest not yet
    ckpt.rename  checkpoint: folder complete, not yet renamed into place
    ckpt.after   checkpoint: renamed into place, old ones not yet pruned
    grads        fp16's loss scale checks a step's gradients for overflow (``INF``: they overflowed)
Why self-inflicted faults: a kill at an exact, reproducible point (during a write, inside an
accumulation window) in a few milliseconds, where a timer would mostly hit the idle parts.

``GRADTUNE_TEST_PROBE=DIR``: every applied step appends ``{"step", "ids"}`` (its sample ids) to
``DIR/steps.jsonl`` (rank 0), and each rank appends the sample ids of every micro-batch it
processed, one line each, to ``DIR/rank<R>.txt``: tests prove with them that across kills and
ranks no sample is seen twice or skipped.

``GRADTUNE_TEST_BUDGET=N``: a ``max_time`` run fixes its step budget at N instead of the
measured one (read in ``loop/budget.py``), so a test can kill and resume a time-budgeted run and
compare it bitwise with an uninterrupted one whatever the machine's speed.

``GRADTUNE_TEST_FP16=1``: ``precision: fp16`` is accepted on CPU (refused otherwise), computing in
fp32 with the dynamic loss scale, its skips and its state exactly as on a GPU
(``loop/loss_scale.py``): the tests drive the scaler on machines without a GPU.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional, TextIO

from gradtune.runtime import distributed

FAULTS_ENV = "GRADTUNE_TEST_FAULTS"
PROBE_ENV = "GRADTUNE_TEST_PROBE"
FP16_ENV = "GRADTUNE_TEST_FP16"

_PLAN: dict[str, dict[int, str]] = {}  # point -> {visit number: action}
_SEEN: dict[str, int] = {}


def configure(spec: str) -> None:
    """Replace the plan (a forked test process sets its own; see the kill-resume tests)."""
    _PLAN.clear()
    _SEEN.clear()
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    for item in filter(None, spec.split(",")):
        item, _, only = item.partition("/rank")
        if only and int(only) != distributed.rank():
            continue
        point, _, rest = item.partition("@")
        count, _, action = rest.partition("=")
        _PLAN.setdefault(point, {})[int(count)] = action or "KILL"


configure(os.environ.get(FAULTS_ENV, ""))


def hit(point: str) -> bool:
    """Mark that ``point`` was reached; carry out the planned fault on a planned visit. True when
    that fault is ``INF`` (the caller poisons its values)."""
    if point not in _PLAN:
        return False
    count = _SEEN[point] = _SEEN.get(point, 0) + 1
    action = _PLAN[point].get(count)
    if action is None:
        return False
    if action == "INF":
        return True
    if action in ("RAISE", "HANG"):  # a signal speaks for itself; these would look like gradtune's own faults
        print(f"gradtune: fault injection: {action} at {point} #{count}", file=sys.stderr, flush=True)
    if action == "RAISE":
        raise RuntimeError(f"injected fault at {point} #{count}")
    if action == "HANG":
        time.sleep(10**6)
    os.kill(os.getpid(), getattr(signal, f"SIG{action}"))
    return False


def fp16_on_cpu() -> bool:
    """``GRADTUNE_TEST_FP16=1``: accept ``precision: fp16`` off a GPU (computed in fp32)."""
    return os.environ.get(FP16_ENV) == "1"


def probe_dir() -> Optional[Path]:
    """The probe folder, or None when probing is off (read once per call by the hot path)."""
    out = os.environ.get(PROBE_ENV)
    return Path(out) if out else None


def record_micro(folder: Path, sample_ids: list[int]) -> None:
    """Append one micro-batch's sample ids to ``folder/rank<R>.txt`` (any rank may be first here:
    rank 0's Probe creates the folder only when its loop starts)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"rank{distributed.rank()}.txt", "a") as f:
        f.write(" ".join(str(i) for i in sample_ids) + "\n")


class Probe:
    """Appends each applied step's sample ids to ``$GRADTUNE_TEST_PROBE/steps.jsonl`` (rank 0;
    a no-op when unset)."""

    def __init__(self) -> None:
        folder = probe_dir()
        self.file: Optional[TextIO] = None
        if folder is not None and distributed.is_main():
            folder.mkdir(parents=True, exist_ok=True)
            self.file = open(folder / "steps.jsonl", "a", encoding="utf-8")

    def record(self, step: int, ids: list[int]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "ids": ids}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
