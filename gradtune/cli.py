"""The ``gradtune`` command: train, lr-find, demo (and the commands other modules register).

Every bad input ends as one line on stderr and exit code 2, never a traceback. A checkpoint
that cannot be written exits 74 (EX_IOERR); a run stopped by SIGTERM/SIGINT after writing its
checkpoint exits 75 (EX_TEMPFAIL: run the same command again to resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

from gradtune.errors import GradtuneError

EXIT_BAD_INPUT = 2


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                   help="an optional YAML config file, then settings that override it")


def _split(items: list[str]) -> tuple[Optional[str], list[str]]:
    """First item is the config file unless it is a key=value override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    for item in items:
        if "=" not in item:
            raise GradtuneError(f"'{item}': the config file must come first; settings are key=value")
    return None, items


def cmd_train(args: argparse.Namespace) -> int:
    from gradtune.config import load_config
    from gradtune.train import train

    path, overrides = _split(args.items)
    cfg = load_config(path, overrides)
    r = train(cfg)
    from gradtune.distributed import is_main

    if not is_main():  # one summary per job, from rank 0
        return 0
    metrics = " ".join(f"{k}={v:.6g}" for k, v in r.metrics.items() if isinstance(v, float))
    print(f"done: {r.steps} steps ({r.epochs:.3g} epochs) in {r.wall_time:.2f}s; stopped: {r.stop_reason}")
    print(f"final: {metrics}")
    print(f"outputs: {cfg.out_dir}/ (model.safetensors, metrics.jsonl, summary.json{', loss.png' if cfg.plot else ''})")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from gradtune import lrfind
    from gradtune.config import load_config

    path, overrides = _split(args.items)
    cfg = load_config(path, overrides)
    if not 0 < args.min_lr < args.max_lr:
        raise GradtuneError(f"lr-find: need 0 < --min-lr ({args.min_lr}) < --max-lr ({args.max_lr})")
    r = lrfind.lr_find(cfg, args.min_lr, args.max_lr, args.steps)
    out = Path(cfg.out_dir) / "lr_find.png"
    lrfind.plot(r, out, f"lr range test: {cfg.model} on {Path(cfg.data).name}, batch_size={cfg.batch_size}")
    end = "stopped at divergence" if r.stopped_early else "reached --max-lr"
    print(f"lr-find: {len(r.lrs)} steps from {args.min_lr:g} ({end}); suggested lr = {r.suggestion:.3g}")
    print(f"plot: {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gradtune.demo import run_demo

    run_demo(args.out_dir)
    return 0


# Subcommands other modules add (generate, export, eval...): name -> (help, setup, handler).
EXTRA: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def _register_builtin() -> None:
    from gradtune import sample

    EXTRA.setdefault("generate", ("sample text from a trained language model", sample.setup, sample.run))
    from gradtune import finetune_cli as ft  # light: transformers loads inside the handlers

    EXTRA.setdefault("export", ("write a fine-tuning run as a PEFT adapter and/or a merged HF folder",
                                ft.setup_export, ft.run_export))
    EXTRA.setdefault("eval", ("evaluate a fine-tuning run on a labelled file", ft.setup_eval, ft.run_eval))


def parser() -> argparse.ArgumentParser:
    _register_builtin()
    p = argparse.ArgumentParser(prog="gradtune", description="Gradient descent, visible: from a line to large models.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model from a config and key=value settings")
    _config_args(t)
    t.set_defaults(func=cmd_train)
    f = sub.add_parser("lr-find", help="learning-rate range test: plot loss against lr, suggest one")
    _config_args(f)
    f.add_argument("--min-lr", type=float, default=1e-6)
    f.add_argument("--max-lr", type=float, default=10.0)
    f.add_argument("--steps", type=int, default=100)
    f.set_defaults(func=cmd_lr_find)
    d = sub.add_parser("demo", help="the classic tutorial on the embedded diabetes data (under a minute)")
    d.add_argument("--out-dir", default="runs/demo")
    d.set_defaults(func=cmd_demo)
    for name, (help_text, setup, handler) in EXTRA.items():
        e = sub.add_parser(name, help=help_text)
        setup(e)
        e.set_defaults(func=handler)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except GradtuneError as e:
        from gradtune.distributed import where
        from gradtune.preempt import Preempted

        # 2: bad input; 74: a checkpoint could not be written; 75: preempted, checkpoint saved.
        kind = "preempted" if isinstance(e, Preempted) else "error"
        who = where()  # under torchrun: which rank said it
        print(f"gradtune: {kind}{' on ' + who if who else ''}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("gradtune: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from gradtune.distributed import describe, launched

        if not launched():
            raise
        # One line naming the rank, then the traceback (torchrun's summary names the first failure).
        print(f"gradtune: error on {describe(e)}", file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":
    raise SystemExit(main())
