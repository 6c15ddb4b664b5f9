"""Loading a run configuration: YAML file + ``key=value`` overrides -> a validated ``Config``.

Why strict: a typo such as ``learning_rate: 0.1`` silently ignored is the most expensive bug in
training; here it is an error with a suggestion. Layers, later ones winning: the schema's
defaults, the model family's defaults, the YAML file, the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import reprlib
import sys
import types
import typing
from typing import Any, Literal, Optional, Union

from gradtune.config import yaml_reader
from gradtune.config.checks import RANGES, check_combinations, check_method
from gradtune.config.defaults import BUDGET_KEYS, CONVERGENCE_EPOCHS, MODEL_DEFAULTS, is_pretrained, pretrained_lr
from gradtune.config.durations import parse_duration
from gradtune.config.schema import Config
from gradtune.config.suggestions import other_name
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
    theirs = other_name(key)  # another tool's name for one of ours: learning_rate -> lr
    if theirs:
        return theirs
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


def _given(values: dict[str, Any], prefix: str = "") -> set[str]:
    """Every key (dotted for sections) a layer sets."""
    out: set[str] = set()
    for k, v in values.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _given(v, f"{prefix}{k}.")
    return out


def _budget_defaults(cfg: Config, given: set[str]) -> None:
    """A budget the user gave replaces the family's: ``model=gpt max_steps=200`` runs 200 steps,
    not the recipe's 10 minutes; a convergence run (tol) with no budget is not cut by the default
    epochs; fine-tuning's minimum step count yields to any explicit budget."""
    if given & set(BUDGET_KEYS):
        if "max_time" not in given:
            cfg.max_time = None
        if "finetune.min_steps" not in given and is_pretrained(cfg.model):
            cfg.finetune.min_steps = 0
    elif cfg.tol > 0:
        cfg.epochs = CONVERGENCE_EPOCHS


def scale_budget(cfg: Config, scale_text: Optional[str] = None) -> Optional[str]:
    """``GRADTUNE_BUDGET_SCALE=S`` (0 < S <= 1; the README harness): max_time, max_steps, epochs
    and finetune.min_steps multiplied by S (at least 1 step / epoch), and a language model's final
    evaluation on its eval_tokens sample (``eval_final=sample``: a full pass of a large validation
    set would outlast the scaled run), so a long command runs as written on a smaller budget.
    Returns the line that says so, or None."""
    scale_text = scale_text if scale_text is not None else os.environ.get("GRADTUNE_BUDGET_SCALE")
    if not scale_text:
        return None
    try:
        scale = float(scale_text)
    except ValueError:
        scale = float("nan")
    if not 0 < scale <= 1:
        raise GradtuneError(f"GRADTUNE_BUDGET_SCALE={scale_text!r}: must be a number in (0, 1]")
    if cfg.max_time is not None:
        cfg.max_time = f"{parse_duration(cfg.max_time) * scale:.3g}s"
    if cfg.max_steps is not None:
        cfg.max_steps = max(1, math.ceil(cfg.max_steps * scale))
    cfg.epochs = max(1, math.ceil(cfg.epochs * scale))
    cfg.finetune.min_steps = math.ceil(cfg.finetune.min_steps * scale)
    sampled = ""
    if cfg.eval_tokens:
        cfg.eval_final, sampled = "sample", " eval_final=sample"
    return (
        f"gradtune: GRADTUNE_BUDGET_SCALE={scale:g}: budget scaled to epochs={cfg.epochs} max_steps={cfg.max_steps} "
        f"max_time={cfg.max_time} finetune.min_steps={cfg.finetune.min_steps}{sampled}"
    )


def load_config(
    path: Optional[str] = None, overrides: Optional[list[str]] = None, base: Optional[dict[str, Any]] = None
) -> Config:
    """Defaults <- the model family's defaults <- ``base`` <- YAML file <- ``key=value`` overrides,
    validated at each layer; then the budget rules (``_budget_defaults``)."""
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
    given: set[str] = set()
    if base:
        _apply(cfg, base, "", "defaults")
        given |= _given(base)
    if path is not None:
        _apply(cfg, file_values, "", str(path))
        given |= _given(file_values)
    for key, value in pairs:
        _apply(cfg, _nest(key, value), "", "command line")
        given.add(key)
    if cfg.gpt.family == "gpt2" and "gpt.n_kv_head" not in given:
        cfg.gpt.n_kv_head = None  # the recipe's grouped-query attention is a Llama-family default
    _budget_defaults(cfg, given)
    check_combinations(cfg)
    check_method(cfg)
    _warn_disabled(cfg, file_values, [_nest(k, v) for k, v in pairs])
    if cfg.eval_final == "sample" and not cfg.eval_tokens:  # nothing to sample: it would do nothing
        print(
            "gradtune: warning: eval_final=sample given without eval_tokens: the final evaluation is full",
            file=sys.stderr,
        )
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
