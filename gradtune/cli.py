"""The ``gradtune`` command: one table of subcommands, each a file in ``gradtune/commands``.

Every bad input ends as one line on stderr and exit code 2, never a traceback. A checkpoint
that cannot be written exits 74 (EX_IOERR); a run stopped by SIGTERM/SIGINT after writing its
checkpoint exits 75 (EX_TEMPFAIL: run the same command again to resume).
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType
from typing import Optional

from gradtune.commands import demo, eval as eval_cmd, export, generate, lr_find, predict, train
from gradtune.runtime import distributed
from gradtune.runtime.errors import GradtuneError
from gradtune.state.preempt import Preempted

# name -> module with HELP, setup(parser), run(args) -> exit code
COMMANDS: dict[str, ModuleType] = {
    "train": train,
    "lr-find": lr_find,
    "demo": demo,
    "eval": eval_cmd,
    "predict": predict,
    "generate": generate,
    "export": export,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradtune", description="Gradient descent, visible: from a line to large models.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        cmd = sub.add_parser(name, help=module.HELP)
        module.setup(cmd)
        cmd.set_defaults(func=module.run)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
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
    except Exception as e:
        if not distributed.launched():
            raise
        # One line naming the rank, then the traceback (torchrun's summary names the first failure).
        print(f"gradtune: error on {distributed.describe(e)}", file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":
    raise SystemExit(main())
