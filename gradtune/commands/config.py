"""``gradtune config [SECTION]``: every setting, its default and what it means, from the schema
(the README's settings table, for the terminal)."""

from __future__ import annotations

import argparse
import difflib
import shutil
import textwrap

from gradtune.config import Config, load_config
from gradtune.config.table import field_docs, sections
from gradtune.runtime.errors import GradtuneError

HELP = "list the settings (key=value) with their defaults and meanings: gradtune config [SECTION]"


def setup(p: argparse.ArgumentParser) -> None:
    names = ", ".join(sections())
    p.add_argument(
        "section", nargs="?", default=None, help=f"one section ({names}); none: the top-level settings and the sections"
    )
    p.add_argument(
        "--model",
        default=None,
        help="show the defaults a model starts from (gpt: the recipe; a path: fine-tuning's); none: the plain defaults",
    )


def _rows(rows: list[tuple[str, str, str]]) -> None:
    width = shutil.get_terminal_size((120, 24)).columns
    key_w = max(len(k) for k, _, _ in rows)
    def_w = min(24, max(len(d) for _, d, _ in rows))
    indent = key_w + def_w + 4
    for key, default, meaning in rows:
        lines = textwrap.wrap(meaning, max(30, width - indent)) or [""]
        print(f"{key.ljust(key_w)}  {default.ljust(def_w)}  {lines[0]}")
        for more in lines[1:]:
            print(" " * indent + more)


def run(args: argparse.Namespace) -> int:
    # The gpt section only matters for model=gpt, whose defaults are the recipe's.
    model = args.model or ("gpt" if args.section == "gpt" else None)
    cfg = load_config(None, [f"model={model}"]) if model else Config()
    known = sections()
    if args.section is None:
        rows = [(k, d, m) for k, d, m in field_docs(Config, cfg) if k not in known]
        _rows(rows)
        print()
        print("sections (gradtune config SECTION lists one; set as section.key=value, e.g. gpt.n_layer=6):")
        _rows([(f"{name}.*", "", doc) for name, (_, doc) in known.items()])
        if not args.model:
            print("\nmodel=gpt and pretrained models start from their own defaults: gradtune config --model gpt")
        return 0
    name = args.section.rstrip(".*")
    if name not in known:
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (sections: {', '.join(known)})"
        raise GradtuneError(f"config: no section '{args.section}'{hint}")
    cls, doc = known[name]
    print(f"{name}: {doc}")
    _rows([(f"{name}.{k}", d, m) for k, d, m in field_docs(cls, getattr(cfg, name))])
    return 0
