"""The arguments every config-driven command takes: ``[CONFIG.yaml] [key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from gradtune.config import Config, load_config
from gradtune.config.loading import scale_budget
from gradtune.config.table import field_docs, sections
from gradtune.runtime.errors import GradtuneError


def add(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "items",
        nargs="*",
        metavar="[CONFIG.yaml] [key=value ...]",
        help="an optional YAML config file, then settings that override it",
    )


def epilog() -> str:
    """The settings a config-driven command takes, for its --help: the top-level keys and the
    sections, and where their defaults and meanings are listed."""
    known = sections()
    keys = [k for k, _, _ in field_docs() if k not in known]
    lines = ["settings (key=value, or a YAML file of them; `gradtune config` lists each with its default and meaning):"]
    line = " "
    for k in keys:
        if len(line) + len(k) + 2 > 100:
            lines.append(line.rstrip(","))
            line = " "
        line += f" {k},"
    lines.append(line.rstrip(","))
    lines.append("sections (section.key=value; `gradtune config SECTION` lists one):")
    lines += [f"  {name + '.*':<17} {doc}" for name, (_, doc) in known.items()]
    lines.append("examples: gradtune train model=mlp batch_size=1 lr=0.01 epochs=100")
    lines.append("          gradtune train configs/gpt-shakespeare.yaml max_time=2m")
    return "\n".join(lines)


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
