"""Preemption: SIGTERM / SIGINT ask the run to stop cleanly at the next step boundary.

First signal: a flag; the loop finishes the step in flight, writes a checkpoint and exits with
``EXIT_PREEMPTED`` (75, EX_TEMPFAIL: "try again later" - rerunning the same command resumes).
Second signal (impatient user, or the scheduler's grace period running out): the default action
is restored and the signal re-delivered, so the process dies at once. If that lands during the
checkpoint write, the write is abandoned half-way in its temporary folder and the previous
checkpoint is untouched (see checkpoint.save); the next run sweeps the leftovers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator, Optional

from gradtune.runtime.errors import GradtuneError

EXIT_PREEMPTED = 75


class Preempted(GradtuneError):
    """Raised after the preemption checkpoint is written; the CLI exits with EXIT_PREEMPTED."""

    exit_code = EXIT_PREEMPTED


class Flag:
    def __init__(self) -> None:
        self.signal: Optional[str] = None  # name of the first signal received

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal is not None:  # second signal: stop now, whatever is being written
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal = signal.Signals(signum).name


@contextlib.contextmanager
def catch() -> Iterator[Flag]:
    """Install the handlers for the duration of a run (main thread only; elsewhere a no-op)."""
    flag = Flag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, flag._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
