"""Preemption: SIGTERM / SIGINT ask the run to stop cleanly at the next step boundary.

First signal: a flag; the loop finishes the step in flight, writes a checkpoint and exits with
``EXIT_PREEMPTED`` (75, EX_TEMPFAIL: "try again later" - rerunning the same command resumes).
Second signal (impatient user, or the scheduler's grace period running out): the default action
is restored and the signal re-delivered, so the process dies at once. If that lands during the
checkpoint write, the write is abandoned half-way in its temporary folder and the previous
checkpoint is untouched (see checkpoint.save); the next run sweeps the leftovers.

Under torchrun a rank that cannot reach the step boundary (stuck in its own code while the
others wait, or past a collective whose peer is gone) would hold the job until the launcher's
own SIGKILL (torchrun waits 30 s). With ``grace`` (the run's ``dist_timeout``: the longest a
healthy rank may wait on a peer) a rank that has not reached the boundary that long after the
first signal exits 128 + signal with one line; reaching it (``answer``) disarms that.

Once the preemption checkpoint is written the outcome is decided: exit 75, resumable. From then
on a further signal (the scheduler repeating SIGTERM, a second Ctrl-C while the process winds
down) is ignored, so it cannot turn that exit into 130 / 143: ``Preempted`` marks the run
*settled* when it is raised, the run's handler then lets signals pass, and ``command_scope`` (the
CLI, around a whole command) ignores them up to the process's exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Optional

from gradtune.runtime.errors import GradtuneError

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)
_STATE = {"settled": False}  # a preemption checkpoint is written: exit 75 is decided


class Preempted(GradtuneError):
    """Raised after the preemption checkpoint is written; the CLI exits with EXIT_PREEMPTED."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        # The loop raises this only once the checkpoint is on disk: from here, signals are late.
        settle()


def settle() -> None:
    """The preemption checkpoint is complete: later signals must not change the exit code."""
    _STATE["settled"] = True


def settled() -> bool:
    return _STATE["settled"]


class Flag:
    def __init__(self, grace: Optional[float] = None) -> None:
        self.signal: Optional[str] = None  # name of the first signal received
        self.grace = grace  # seconds from the first signal to the step boundary; None: no limit
        self.timer: Optional[threading.Timer] = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def settle(self) -> None:
        """For the loop: call as soon as the preemption checkpoint is in place."""
        settle()

    def answer(self) -> None:
        """For the loop: the step boundary is reached, the preemption checkpoint begins."""
        if self.timer is not None:
            self.timer.cancel()

    def _late(self, signum: int) -> None:
        """``grace`` seconds after the first signal and no step boundary: end now."""
        if settled():
            return
        print(
            f"gradtune: {self.signal}: no step boundary reached within {self.grace:g}s (dist_timeout): exiting",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signum)

    def _handle(self, signum: int, frame: object) -> None:
        if settled():  # the checkpoint is written, exit 75 decided: nothing left to stop
            return
        if self.signal is not None:  # second signal: stop now, whatever is being written
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal = signal.Signals(signum).name
        if self.grace is not None:
            self.timer = threading.Timer(self.grace, self._late, (signum,))
            self.timer.daemon = True
            self.timer.start()


@contextlib.contextmanager
def catch(grace: Optional[float] = None) -> Iterator[Flag]:
    """Install the handlers for the duration of a run (main thread only; elsewhere a no-op).
    ``grace``: see the module docstring (torchrun runs pass their ``dist_timeout``)."""
    flag = Flag(grace)
    _STATE["settled"] = False  # a new run: nothing is decided yet
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, flag._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        flag.answer()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _outside_run(previous: dict[int, Any]) -> Callable[[int, Any], None]:
    """A handler for the time outside ``catch``: what was there before, unless settled."""

    def handle(signum: int, frame: Any) -> None:
        if settled():
            return
        before = previous[signum]
        if callable(before):  # Python's own SIGINT handler raises KeyboardInterrupt
            before(signum, frame)
        elif before != signal.SIG_IGN:  # SIG_DFL: the default action, as if we were not here
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    return handle


@contextlib.contextmanager
def command_scope(exiting: bool = False) -> Iterator[None]:
    """Around a whole CLI command. Signals outside a run act as before (SIGINT raises
    KeyboardInterrupt, SIGTERM ends the process) until a preemption checkpoint is written; from
    then on they are ignored, and stay ignored when the scope ends: the process is about to exit
    with EXIT_PREEMPTED, and a signal during that exit must not replace it with 130 / 143.
    ``exiting``: the process ends with the command, so signals stay ignored after it whatever
    the outcome: its exit code is decided and every output written, and the interpreter's own
    shutdown (seconds with a large model) puts the default handlers back, where a Ctrl-C would
    kill the finished process by SIGINT, silently."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _STATE["settled"] = False
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    handler = _outside_run(previous)
    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN if settled() or exiting else previous[s])
