"""Reward functions for GRPO (``rl.rewards``): your own, named ``package.module:func``, and two
built-ins for checkable answers.

    rewards: [{fn: format}, {fn: exact_answer, weight: 2.0}, {fn: mypkg.rewards:length, args: {n: 50}}]

A reward function is called once per micro-batch with every completion of its prompts:

    fn(prompts, completions, **columns, **args) -> list[float]       one float per completion

``prompts[i]`` is the prompt (as the file gives it: a string or messages) that ``completions[i]``
answers; each other column of the prompt file arrives as a list aligned with ``completions``
(TRL's convention). The weighted sum of the functions is the completion's reward.

Built-ins:
    format         1.0 when the whole completion matches ``rl.format_pattern`` (re.DOTALL), else 0.0
    exact_answer   1.0 when the text inside the last <answer>...</answer> equals the row's answer
                   column (``rl.answer_column``, compared as stripped strings), else 0.0
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from gradtune.runtime.errors import GradtuneError

RewardFn = Callable[..., Any]
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def format_reward(prompts: list[Any], completions: list[str], pattern: str = "", **_: Any) -> list[float]:
    """1.0 per completion that matches ``pattern`` as a whole (re.DOTALL)."""
    rx = re.compile(pattern, re.DOTALL)
    return [1.0 if rx.fullmatch(c) else 0.0 for c in completions]


def exact_answer(prompts: list[Any], completions: list[str], column: str = "answer", **columns: Any) -> list[float]:
    """1.0 per completion whose last <answer>...</answer> holds the row's answer."""
    if column not in columns:
        raise GradtuneError(
            f"rl.rewards: exact_answer needs an {column!r} column in the prompts file (rl.answer_column)"
        )
    answers = columns[column]
    out = []
    for c, a in zip(completions, answers):
        found = ANSWER.findall(c)
        out.append(1.0 if found and a is not None and found[-1].strip() == str(a).strip() else 0.0)
    return out


BUILTINS: dict[str, RewardFn] = {"format": format_reward, "exact_answer": exact_answer}


@dataclass
class Reward:
    name: str  # as logged: the built-in's name or the function's
    fn: RewardFn
    weight: float


def _import(target: str) -> RewardFn:
    module_name, _, name = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise GradtuneError(f"config: rl.rewards: cannot import {target} ({e})") from None
    except Exception as e:  # the module itself fails while importing
        raise GradtuneError(f"config: rl.rewards: importing {target} failed: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise GradtuneError(f"config: rl.rewards: {target} is not callable")
    try:
        inspect.signature(fn).bind([], [])
    except TypeError:
        raise GradtuneError(f"config: rl.rewards: {target} must take (prompts, completions, **columns)") from None
    except ValueError:  # builtins without a signature: trust the call
        pass
    return fn


def load(specs: list[dict[str, Any]], format_pattern: str, answer_column: str) -> list[Reward]:
    """The reward functions ``rl.rewards`` names, imported now (before anything is written)."""
    out = []
    for spec in specs:
        target, args = spec["fn"], dict(spec.get("args") or {})
        if target in BUILTINS:
            defaults = {"format": {"pattern": format_pattern}, "exact_answer": {"column": answer_column}}[target]
            fn, name = BUILTINS[target], target
            args = {**defaults, **args}
        elif ":" in target:
            fn, name = _import(target), target.partition(":")[2]
        else:
            raise GradtuneError(
                f"config: rl.rewards: unknown reward {target!r} (built-ins: {', '.join(BUILTINS)}; "
                f"or 'package.module:func')"
            )
        if names := [r.name for r in out if r.name == name]:
            name = f"{name}_{len(names) + 1}"
        out.append(Reward(name, functools.partial(fn, **args) if args else fn, float(spec.get("weight", 1.0))))
    return out


def score(reward: Reward, prompts: list[Any], completions: list[str], columns: dict[str, list[Any]]) -> list[float]:
    """The function's rewards (one float per completion), checked: the right length, numbers,
    finite. A failure is bad input (exit 2), named after the function."""
    try:
        got = reward.fn(prompts, completions, **columns)
    except GradtuneError:
        raise
    except Exception as e:
        raise GradtuneError(f"rl.rewards: {reward.name} raised {type(e).__name__}: {e}") from None
    try:
        values = [float(v) for v in got]
    except (TypeError, ValueError):
        raise GradtuneError(f"rl.rewards: {reward.name} must return a list of numbers, got {got!r:.80}") from None
    if len(values) != len(completions):
        raise GradtuneError(
            f"rl.rewards: {reward.name} returned {len(values)} rewards for {len(completions)} completions"
        )
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise GradtuneError(
            f"rl.rewards: {reward.name} returned {values[bad[0]]} for completion {bad[0]} "
            f"({completions[bad[0]]!r:.60}); rewards must be finite"
        )
    return values
