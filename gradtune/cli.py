"""The ``gradtune`` command: one table of subcommands, each a file in ``gradtune/commands``.

Every bad input ends as one line on stderr and exit code 2, never a traceback. A checkpoint
that cannot be written exits 74 (EX_IOERR); a run stopped by SIGTERM/SIGINT after writing its
checkpoint exits 75 (EX_TEMPFAIL: run the same command again to resume); SIGINT / SIGTERM
anywhere else, start-up included, exits 130 / 143 with one line.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import gc
import importlib.metadata
import os
import platform
import signal
import sys
import threading
from types import ModuleType
from typing import Any, Iterator, Optional


def _interrupted_while_starting(signum: int, frame: Any) -> None:
    # Importing torch and the commands takes seconds. A KeyboardInterrupt raised inside an import
    # has no try block around it (main is not running yet) and prints a traceback; nothing has
    # been read or written yet, so leave at once, with the line main prints (130 / 143).
    term = signum == signal.SIGTERM
    print(f"gradtune: {'terminated' if term else 'interrupted'}", file=sys.stderr, flush=True)
    os._exit(143 if term else 130)


# Installed before the heavy imports below, put back after them (an importing test runner keeps
# its own Ctrl-C). signal.signal works in the main thread only.
_STARTING = threading.current_thread() is threading.main_thread()
_BEFORE = (
    {s: signal.signal(s, _interrupted_while_starting) for s in (signal.SIGINT, signal.SIGTERM)} if _STARTING else {}
)

from gradtune.runtime import collector  # noqa: E402

with collector.paused():  # torch and the commands: objects that live as long as the process
    import torch  # noqa: E402

    from gradtune.commands import compare, demo, export, generate, lr_find, predict, tokenizer, train  # noqa: E402
    from gradtune.commands import config as config_cmd  # noqa: E402
    from gradtune.commands import eval as eval_cmd  # noqa: E402
    from gradtune.runtime import distributed, lock  # noqa: E402
    from gradtune.runtime.errors import GradtuneError  # noqa: E402
    from gradtune.state.preempt import Preempted, command_scope, settled  # noqa: E402

    # What the imports loaded lives as long as the process (a command, or a caller of main): out of
    # every later pass, which would walk all of it once more as soon as the collector resumes.
    gc.freeze()

for _signum, _handler in _BEFORE.items():
    signal.signal(_signum, _handler)

# name -> module with HELP, setup(parser), run(args) -> exit code
COMMANDS: dict[str, ModuleType] = {
    "train": train,
    "lr-find": lr_find,
    "demo": demo,
    "eval": eval_cmd,
    "predict": predict,
    "generate": generate,
    "export": export,
    "compare": compare,
    "tokenizer": tokenizer,
    "config": config_cmd,
}

# A write that fails for lack of room or a read-only disk is the environment, not the input: one
# line and EX_IOERR (74), like a checkpoint that cannot be written, never a traceback.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


def _version() -> str:
    try:
        return importlib.metadata.version("gradtune")  # the installed package's (pyproject.toml)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default; a positional without one shows none; epilogs
    (the settings list of ``train --help``) keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        said = action.help or ""
        if "default" in said or (not action.option_strings and action.default is None):
            return said  # the help names the default itself, or there is none to name
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradtune",
        description="Gradient descent, visible: from a line to large models.",
        epilog="`gradtune COMMAND --help` for a command's options; `gradtune config` for the training settings.",
    )
    p.add_argument(
        "--version",
        action="version",
        version=f"gradtune {_version()} (torch {torch.__version__}, Python {platform.python_version()})",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        cmd = sub.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            epilog=getattr(module, "EPILOG", None),
            formatter_class=HelpFormatter,
        )
        module.setup(cmd)
        cmd.set_defaults(func=module.run)
    return p


_SAID = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143)}


def _stop_now(signum: int, frame: Any) -> None:
    """SIGINT / SIGTERM outside the loop (start-up, writing the outputs): end the command now with
    one line, 130 / 143. Not by raising KeyboardInterrupt: third-party loaders run during start-up
    (transformers' AutoTokenizer, imports inside it) and one of them swallows it, so a Ctrl-C
    seconds after launch went unnoticed and the run trained to the end with exit 0. Nothing is
    left half-written: every output is written beside its target and renamed into place (what
    is left of an interrupted write is swept by the next run); the run folder's lock is removed
    here, the kernel drops the lock itself. Inside the loop the run's own handler is installed
    instead (a preemption checkpoint, exit 75), and once that checkpoint is written signals are
    ignored (``settled``): exit 75 is decided."""
    if settled():
        return
    word, code = _SAID[signal.Signals(signum)]
    print(f"gradtune: {word}", file=sys.stderr, flush=True)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        lock.release_all()
    os._exit(code)


@contextlib.contextmanager
def _signals_end_the_command() -> Iterator[None]:
    """Install ``_stop_now`` for SIGINT and SIGTERM (main thread only), put the previous back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _stop_now) for s in _SAID}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: Optional[list[str]] = None, exiting: bool = False) -> int:
    """Run one command; its exit code. ``exiting``: the process ends when this returns (the
    ``gradtune`` command, ``python -m gradtune``): signals are ignored from then on."""
    try:
        # command_scope: once a preemption checkpoint is written, later signals cannot change 75.
        with command_scope(exiting), _signals_end_the_command():
            args = parser().parse_args(argv)
            return args.func(args)
    except GradtuneError as e:
        # 2: bad input; 74: a checkpoint could not be written; 75: preempted, checkpoint saved.
        kind = "preempted" if isinstance(e, Preempted) else "error"
        who = distributed.where()  # under torchrun: which rank said it
        print(f"gradtune: {kind}{' on ' + who if who else ''}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("gradtune: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        print(f"gradtune: error: cannot write {e.filename or 'an output file'}: {e.strerror}", file=sys.stderr)
        return 74
    except Exception as e:
        if not distributed.launched():
            raise
        # One line naming the rank, then the traceback (torchrun's summary names the first failure).
        print(f"gradtune: error on {distributed.describe(e)}", file=sys.stderr, flush=True)
        raise


def entry() -> int:
    """The ``gradtune`` console command (and ``python -m gradtune``): the process ends here."""
    collector.keep_loaded()  # a command: what it loads (a model, matplotlib) lives until it exits
    try:
        code = main(exiting=True)
    except SystemExit as e:  # argparse: --help (0), a bad argument (2, its message printed)
        if e.code is not None and not isinstance(e.code, int):
            raise
        code = e.code or 0
    except BrokenPipeError:
        # The reader of stdout left (`gradtune config | head`): end quietly, with the status a
        # process killed by SIGPIPE has; stdout goes to /dev/null so the exit's flush cannot raise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + signal.SIGPIPE
    return leave(code)


def leave(code: int) -> int:
    """End the process with ``code`` without the interpreter's teardown, which frees every module
    and object one at a time: ~0.4 s once torch is imported, a fifth of a short command and paid
    again by every torchrun worker. Nothing of gradtune's needs it (every output is written, closed
    and renamed before main returns); what it would still do that matters is done here, in its
    order: wait for non-daemon threads, run the atexit handlers (trackers, logging,
    multiprocessing), flush stdout and stderr. Under a profiler, tracer or coverage tool the normal
    exit is kept (returns ``code``), so that it can write its results. So it is for a rank of a
    torchrun job that fails: torchrun stops the other ranks the moment one exits, and they may
    not yet have said why they stop (a full disk fails every rank's checkpoint write at once);
    the teardown's time is theirs to say it, as it always was."""
    if sys.getprofile() is not None or sys.gettrace() is not None or (code != 0 and distributed.launched()):
        return code
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe: nothing left to save
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(entry())
