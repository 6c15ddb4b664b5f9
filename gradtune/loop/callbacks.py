"""Your code in the loop, without forking it: a small, typed callback API.

    class PrintBest(Callback):
        def on_evaluate(self, step, metrics):
            if metrics.get("val_accuracy", 0) > 0.99:
                return "val_accuracy above 0.99"      # a string stops the run, with that reason

    fit(job, cfg, out_dir, callbacks=[PrintBest()])
    # or in YAML:  callbacks: [{class: mypkg.mod:PrintBest, args: {}}]

Events, in order: ``on_train_begin(control)`` once; ``on_step_end(step, loss, lr)`` after each
applied optimizer step (``step`` counts applied steps, ``loss`` is that step's mean loss);
``on_evaluate(step, metrics)`` after each evaluation (the row written to metrics.jsonl);
``on_checkpoint(path)`` after each checkpoint folder is in place; ``on_train_end(result)``.
``on_step_end`` and ``on_evaluate`` may return a reason to stop. A callback with state that must
survive a resume implements ``state_dict`` / ``load_state_dict`` (plain JSON-able values and
tensors); it is saved in every checkpoint. Under torchrun callbacks run on rank 0 only, unless
the class sets ``all_ranks = True``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from gradtune.runtime.errors import GradtuneError


@dataclass
class Control:
    """What a callback may use of the run (given at ``on_train_begin``)."""

    out_dir: Optional[Path]
    total_steps: int
    save_state: Callable[[Path], Path]  # a verified checkpoint of the current state under this root folder
    load_weights: Callable[[Path], None]  # the newest checkpoint's weights under a root folder -> the model
    snapshot: Callable[[], Any]  # the weights, copied to host memory
    restore: Callable[[Any], None]  # a snapshot -> the model


class Callback:
    """Base class: override the events you need; the defaults do nothing."""

    all_ranks = False  # run on every rank under torchrun (default: rank 0 only)

    def on_train_begin(self, control: Control) -> None:
        pass

    def on_step_end(self, step: int, loss: float, lr: float) -> Optional[str]:
        return None

    def on_evaluate(self, step: int, metrics: dict[str, Any]) -> Optional[str]:
        return None

    def on_checkpoint(self, path: Path) -> None:
        pass

    def on_train_end(self, result: Any) -> None:
        pass

    def state_dict(self) -> Optional[dict[str, Any]]:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _overrides(cb: Callback, name: str) -> bool:
    return getattr(type(cb), name) is not getattr(Callback, name)


class Callbacks:
    """The run's callbacks, dispatched in order. Per-step dispatch only visits callbacks that
    override ``on_step_end``, so a run without them pays nothing per step."""

    def __init__(self, callbacks: list[Callback], main: bool = True) -> None:
        self.all = [cb for cb in callbacks if main or cb.all_ranks]
        self.per_step = [cb for cb in self.all if _overrides(cb, "on_step_end")]

    def begin(self, control: Control) -> None:
        for cb in self.all:
            cb.on_train_begin(control)

    def step_end(self, step: int, loss: float, lr: float) -> Optional[str]:
        for cb in self.per_step:
            why = cb.on_step_end(step, loss, lr)
            if why:
                return why
        return None

    def evaluate(self, step: int, metrics: dict[str, Any]) -> Optional[str]:
        stop = None
        for cb in self.all:  # every callback sees the evaluation, even after one asked to stop
            why = cb.on_evaluate(step, metrics)
            stop = stop or why
        return stop

    def checkpoint(self, path: Path) -> None:
        for cb in self.all:
            cb.on_checkpoint(path)

    def end(self, result: Any) -> None:
        for cb in self.all:
            cb.on_train_end(result)

    def state_dict(self) -> list[Optional[dict[str, Any]]]:
        return [cb.state_dict() for cb in self.all]

    def load_state_dict(self, states: list[Optional[dict[str, Any]]]) -> None:
        if len(states) != len(self.all):
            raise GradtuneError(f"checkpoint: saved with {len(states)} callbacks, the run now has {len(self.all)}")
        for cb, state in zip(self.all, states):
            if state is not None:
                cb.load_state_dict(state)


def from_spec(spec: dict[str, Any]) -> Callback:
    """A callback from a config entry ``{class: "package.module:Class", args: {...}}``."""
    target = spec.get("class")
    if not isinstance(target, str) or ":" not in target:
        raise GradtuneError(f"config: callbacks entry {spec!r}: 'class' must be 'package.module:Class'")
    module_name, _, name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise GradtuneError(f"config: callbacks: cannot import {target} ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Callback)):
        raise GradtuneError(f"config: callbacks: {target} is not a gradtune.loop.callbacks.Callback subclass")
    args = spec.get("args") or {}
    try:
        return cls(**args)
    except TypeError as e:
        raise GradtuneError(f"config: callbacks: {target}({', '.join(args)}): {e}") from None
