"""Loading a run configuration: YAML file + ``key=value`` overrides -> a validated ``Config``.

Why strict: a typo such as ``learning_rate: 0.1`` silently ignored is the most expensive bug in
training; here it is an error with a suggestion. Layers, later ones winning: the schema's
defaults, the model family's defaults, the YAML file, the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import sys
import types
import typing
from typing import Any, Literal, Optional, Union

from gradtune.config import yaml_reader
from gradtune.config.checks import RANGES, check_combinations, check_method
from gradtune.config.defaults import MODEL_DEFAULTS, is_pretrained, pretrained_lr
from gradtune.config.schema import Config
from gradtune.runtime.errors import GradtuneError

# Settings renamed since they were introduced: old key -> new key.
RENAMED = {
    "gpt.checkpointing": "gpt.activation_checkpointing",
    "finetune.checkpointing": "finetune.activation_checkpointing",
}


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise GradtuneError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except GradtuneError as e:
                if "finite" in str(e):  # a number, just not a usable one: say so, not "expected float"
                    raise
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and inner is not str:
            value = [value]  # hidden=5 means [5]
        if isinstance(value, str) and inner is str:
            value = [v for v in value.split(",") if v]
        if isinstance(value, list):
            return [_coerce(v, inner, key) for v in value]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-9 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and not math.isfinite(number):
            raise GradtuneError(f"config key '{key}': must be a finite number, got {value!r}")
        if number is not None:
            return number
    elif tp is dict:  # a free-form mapping (a callback's spec); its keys are checked where used
        if isinstance(value, dict):
            return value
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise GradtuneError(f"config key '{key}': expected {_type_name(tp)}, got {reprlib.repr(value)}")


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _apply(obj: Any, values: dict[str, Any], prefix: str, source: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        full = f"{prefix}{key}"
        if full in RENAMED:  # an older name still works, with a warning naming the new one
            key = RENAMED[full].rsplit(".", 1)[-1]
            print(f"gradtune: warning: {source}: '{full}' is now '{RENAMED[full]}'", file=sys.stderr)
            full = f"{prefix}{key}"
        if key not in names:
            known = [f"{prefix}{n}" for n in names]
            raise GradtuneError(f"{source}: unknown config key '{full}'{_suggest(full, known)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise GradtuneError(f"{source}: config key '{full}' is a section; give a mapping")
            _apply(current, value, f"{full}.", source)
            continue
        coerced = _coerce(value, hints[key], full)
        check = RANGES.get(full)
        if check and not check[0](coerced):
            raise GradtuneError(f"config key '{full}' must be {check[1]}, got {reprlib.repr(value)}")
        setattr(obj, key, coerced)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise GradtuneError(f"override '{item}' is not of the form key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml_reader.parse(raw, f"command line: {key.strip()}") if raw != "" else ""
    except GradtuneError as e:
        if "invalid YAML" not in str(e):
            raise
        value = raw  # not YAML: the text as it is (a path with a colon, say)
    return key.strip(), value


def _nest(key: str, value: Any) -> dict[str, Any]:
    parts = key.split(".")
    out: dict[str, Any] = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        out = {p: out}
    return out


def load_config(
    path: Optional[str] = None, overrides: Optional[list[str]] = None, base: Optional[dict[str, Any]] = None
) -> Config:
    """Defaults <- the model family's defaults <- ``base`` <- YAML file <- ``key=value`` overrides,
    validated at each layer."""
    cfg = Config()
    file_values = yaml_reader.read(path) if path is not None else {}
    pairs = [_parse_override(item) for item in overrides or []]
    model = next((v for k, v in reversed(pairs) if k == "model"), file_values.get("model", cfg.model))
    family = MODEL_DEFAULTS.get("pretrained" if is_pretrained(str(model)) else str(model))
    if family:
        _apply(cfg, family, "", f"defaults for model={model}")
    if is_pretrained(str(model)):
        method = next((v for k, v in reversed(pairs) if k == "method"), file_values.get("method", cfg.method))
        cfg.lr = pretrained_lr(str(method))  # the file and the command line still override it
    if base:
        _apply(cfg, base, "", "defaults")
    if path is not None:
        _apply(cfg, file_values, "", str(path))
    for key, value in pairs:
        _apply(cfg, _nest(key, value), "", "command line")
    check_combinations(cfg)
    check_method(cfg)
    _warn_disabled(cfg, file_values, [_nest(k, v) for k, v in pairs])
    return cfg


def _warn_disabled(cfg: Config, file_values: dict[str, Any], overrides: list[dict[str, Any]]) -> None:
    """Settings given for a section left disabled (``enabled: false``) would do nothing: one
    warning line, not silence. The section is not switched on for them: a leftover key must not
    change what a run trains. Counted: every key given on the command line, and a file's keys
    whose value differs from the default (a saved config.yaml lists every key at its value).
    The plateau schedule reads ``early_stopping.monitor`` / ``mode`` whether or not early
    stopping is on."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(section) or getattr(section, "enabled", True) is not False:
            continue
        default = type(section)()
        keys = {k for g in overrides if isinstance(g.get(f.name), dict) for k in g[f.name]}
        in_file = file_values.get(f.name) if isinstance(file_values.get(f.name), dict) else {}
        keys |= {k for k, v in in_file.items() if getattr(default, k, v) != getattr(section, k, v)}
        keys = sorted(keys - {"enabled"})
        if f.name == "early_stopping" and cfg.schedule == "plateau":
            keys = [k for k in keys if k not in ("monitor", "mode")]
        if keys:
            named = ", ".join(f"{f.name}.{k}" for k in keys)
            print(
                f"gradtune: warning: {named} given but {f.name}.enabled is false: ignored "
                f"(add {f.name}.enabled=true to use it)",
                file=sys.stderr,
            )
