"""The ``gradtune`` command: one table of subcommands, each a file in ``gradtune/commands``.

Every bad input ends as one line on stderr and exit code 2, never a traceback. A checkpoint
that cannot be written exits 74 (EX_IOERR); a run stopped by SIGTERM/SIGINT after writing its
checkpoint exits 75 (EX_TEMPFAIL: run the same command again to resume); Ctrl-C anywhere else,
start-up included, exits 130 with one line.
"""

from __future__ import annotations

import argparse
import errno
import importlib.metadata
import os
import platform
import signal
import sys
import threading
from types import ModuleType
from typing import Any, Optional


def _interrupted_while_starting(signum: int, frame: Any) -> None:
    # Importing torch and the commands takes seconds. A KeyboardInterrupt raised inside an import
    # has no try block around it (main is not running yet) and prints a traceback; nothing has
    # been read or written yet, so leave at once, with the line main prints for Ctrl-C.
    print("gradtune: interrupted", file=sys.stderr, flush=True)
    os._exit(130)


# Installed before the heavy imports below, put back after them (an importing test runner keeps
# its own Ctrl-C). signal.signal works in the main thread only.
_STARTING = threading.current_thread() is threading.main_thread()
_BEFORE = signal.signal(signal.SIGINT, _interrupted_while_starting) if _STARTING else None

import torch  # noqa: E402

from gradtune.commands import compare, demo, export, generate, lr_find, predict, train  # noqa: E402
from gradtune.commands import config as config_cmd  # noqa: E402
from gradtune.commands import eval as eval_cmd  # noqa: E402
from gradtune.runtime import distributed  # noqa: E402
from gradtune.runtime.errors import GradtuneError  # noqa: E402
from gradtune.state.preempt import Preempted, command_scope  # noqa: E402

if _STARTING:
    signal.signal(signal.SIGINT, _BEFORE)

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


def main(argv: Optional[list[str]] = None) -> int:
    try:
        # command_scope: once a preemption checkpoint is written, later signals cannot change 75.
        with command_scope():
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


if __name__ == "__main__":
    raise SystemExit(main())
