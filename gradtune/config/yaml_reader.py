"""Reading YAML settings safely: a config file, or the value of one ``key=value`` override.

Refused with one line naming the file and line, instead of a silent surprise or a hang:
  * duplicate keys (YAML would keep the last one silently): both lines are named;
  * aliases that expand to more than MAX_ITEMS values (a "billion laughs" anchor bomb; printing
    or checking such a value would take forever) and nesting deeper than MAX_DEPTH;
  * YAML 1.1 booleans: only true/false are booleans (``progress: off`` stays the string 'off').
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from gradtune.runtime.errors import GradtuneError

MAX_ITEMS = 100_000  # values in a whole config once aliases are expanded; real configs have < 1,000
MAX_DEPTH = 50  # nesting levels; real configs have 3


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and duplicate keys refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise GradtuneError(
                    f"{self.name}:{line}: duplicate key '{key}' (first at line {seen[key]}); "
                    f"YAML would silently keep the last one"
                )
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _Loader.construct_mapping)


def _check_size(value: Any, source: str) -> None:
    """Count the values of ``value`` as if aliases were expanded (each shared object counted once
    per reference, memoised by id, so the count itself is linear in the document)."""
    memo: dict[int, int] = {}

    def size(v: Any, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise GradtuneError(f"{source}: nested more than {MAX_DEPTH} levels deep")
        if not isinstance(v, (list, dict)):
            return 1
        if id(v) in memo:
            return memo[id(v)]
        children = v.values() if isinstance(v, dict) else v
        n = 1 + sum(size(c, depth + 1) for c in children)
        memo[id(v)] = n
        if n > MAX_ITEMS:
            raise GradtuneError(
                f"{source}: the YAML expands to more than {MAX_ITEMS:,} values "
                f"(aliases of aliases?); a config needs far fewer"
            )
        return n

    size(value, 0)


def parse(text: str, source: str) -> Any:
    """The YAML value of ``text``; ``source`` names it in errors (a path, or 'command line')."""
    try:
        value = yaml.load(text, Loader=lambda stream: _named(stream, source))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise GradtuneError(f"{source}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    except RecursionError:
        raise GradtuneError(
            f"{source}: nested too deeply to read (more than {MAX_DEPTH} levels is never a config)"
        ) from None
    _check_size(value, source)
    return value


def _named(stream: str, source: str) -> _Loader:
    loader = _Loader(stream)
    loader.name = source
    return loader


def read(path: str) -> dict[str, Any]:
    """The settings of a YAML config file: a mapping at the top level."""
    p = Path(path)
    if not p.is_file():
        raise GradtuneError(f"config file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GradtuneError(f"{path}: not UTF-8 text (byte {e.start})") from None
    values = parse(text, str(path)) or {}
    if not isinstance(values, dict):
        raise GradtuneError(f"{path}: expected a mapping of settings at the top level")
    return values
