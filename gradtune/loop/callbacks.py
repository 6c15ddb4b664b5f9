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
the class sets ``all_ranks = True``. A callback that raises ends the run with one line naming
it and the event (``CallbackError``, exit 1; the traceback with GRADTUNE_DEBUG=1); the last
checkpoint stays as it was. gradtune's own features are components on the same events
(loop/components.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from gradtune.runtime.errors import GradtuneError


class CallbackError(GradtuneError):
    """A user callback raised: the run ends with one line naming it and the event, exit 1."""

    exit_code = 1


@dataclass
class Control:
    """What a callback may use of the run (given at ``on_train_begin``)."""

    out_dir: Optional[Path]
    total_steps: int
    save_state: Callable[[Path], Path]  # a verified checkpoint of the current state under this root folder
    load_weights: Callable[[Path], None]  # the newest checkpoint's weights under a root folder -> the model
    snapshot: Callable[[], Any]  # the weights, copied to host memory
    restore: Callable[[Any], None]  # a snapshot -> the model
    # The loop's torch.optim.Optimizer (its param_groups' lr, state): read it, or carry its
    # state_dict elsewhere (the scikit-learn estimators' partial_fit does); None when nothing trains.
    optimizer: Any = None


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
