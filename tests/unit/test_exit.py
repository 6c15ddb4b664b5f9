"""The ``gradtune`` process ends without the interpreter's teardown (cli.leave), and loses nothing
by it: threads finish, atexit handlers run (trackers register theirs there), buffered output is
written, the exit code is the command's. A profiler or tracer keeps the normal exit, and so does
a failing torchrun rank."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from gradtune import cli

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import atexit, sys, threading, time
    from gradtune.cli import leave

    class Finalised:
        def __del__(self):
            print("teardown ran", flush=True)

    KEEP = Finalised()  # freed by the interpreter's teardown only
    atexit.register(lambda: print("atexit ran", flush=True))

    def late():
        time.sleep(0.3)
        sys.stdout.write("thread finished;")

    threading.Thread(target=late).start()
    sys.stdout.write("buffered;")  # no newline, no flush: still in the buffer
    leave(3)
    print("after leave")
    """
)


def test_leave_ends_after_threads_atexit_and_flush_without_the_teardown():
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 3, p.stderr
    assert p.stdout == "buffered;thread finished;atexit ran\n", p.stdout
    assert p.stderr == ""


def test_a_bad_argument_and_help_keep_their_codes():
    for args, code in ((["--help"], 0), (["train", "--no-such-flag"], 2)):
        p = subprocess.run(
            [sys.executable, "-m", "gradtune", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
        )
        assert p.returncode == code, (args, p.stderr)
    assert "usage: gradtune" in p.stderr and "--no-such-flag" in p.stderr


def test_under_a_profiler_the_normal_exit_is_kept():
    previous = sys.getprofile()
    sys.setprofile(lambda *a: None)
    try:
        assert cli.leave(5) == 5  # returned: the profiler writes its results at the normal exit
    finally:
        sys.setprofile(previous)


def test_a_failing_torchrun_rank_keeps_the_normal_exit(monkeypatch):
    """torchrun stops the other ranks when one exits: a failing rank leaves them the teardown's
    time to print their own line (every rank's one-line error, tests/e2e/test_fsdp_resume.py)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.leave(74) == 74  # returned, not os._exit: the interpreter's exit follows
