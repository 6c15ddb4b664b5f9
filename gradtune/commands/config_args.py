"""The arguments every config-driven command takes: ``[CONFIG.yaml] [key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from gradtune.config import Config, load_config
from gradtune.config.loading import scale_budget
from gradtune.runtime.errors import GradtuneError


def add(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "items",
        nargs="*",
        metavar="[CONFIG.yaml] [key=value ...]",
        help="an optional YAML config file, then settings that override it",
    )


def split(items: list[str]) -> tuple[Optional[str], list[str]]:
    """First item is the config file unless it is a key=value override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    for item in items:
        if "=" not in item:
            raise GradtuneError(f"'{item}': the config file must come first; settings are key=value")
    return None, items


def config(args: argparse.Namespace) -> Config:
    path, overrides = split(args.items)
    cfg = load_config(path, overrides)
    said = scale_budget(cfg)  # GRADTUNE_BUDGET_SCALE: the README harness runs long commands as written, shorter
    if said:
        print(said, file=sys.stderr)
    return cfg
