"""Features as components on the loop's events: the time budget, noise scale, plateau schedule,
early stopping, progress, throughput, TensorBoard, the MLflow / W&B trackers, the allocator
policy, the fine-tuning audit and the test probe are each one ``Component``, a ``Callback`` (the
interface users get) that may also read and steer a little more of the loop through a ``LoopView``.

Events, in the order a step meets them (``Events`` dispatches each to the components that
override it, so an event nobody listens to costs one empty loop):

    attach(view)                 once, when the loop is built
    on_train_begin(control)      once, before the first step (Callback)
    on_step_begin()              before the step's batch is sampled
    loss_scale()                 the factor the loss sums are multiplied by before backward
                                 (fp16's loss scale); the loop divides it out with the count
    hold_update(grads)           the batch's mean gradient: True withholds this step's update
                                 (fp16 overflow); the step still counts, the guard never hears it
    on_gradients(grads, norm, count, first)   the batch's mean gradient, guard passed, before
                                 clipping; ``first``: [|grad of the first micro-batch's sum|², its
                                 count] when ``wants_first`` (else None)
    on_update(before)            just before (True) / after (False) the optimizer step: on
                                 steps that close an evaluation period, or on every step for
                                 a component with ``update_every_step``
    on_step_end(step, loss, lr)  the step applied (Callback); a string stops the run
    on_measure(row)              an evaluation's training-side fields, before validation
    on_evaluate(step, row)       the evaluation row as logged (Callback); a string stops
    on_checkpoint(path)          a chain checkpoint is in place (Callback)
    on_step_done()               after the step's checkpoint: the budget re-plans here
    on_run_end()                 the loop is done (summaries into job.info); on_close() always
    on_train_end(result)         the Result is built (Callback)

A component's state goes into every checkpoint under its ``key`` (``state_dict`` /
``load_state_dict``, as for callbacks), so a resumed run is bitwise the uninterrupted one.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, ClassVar, Optional, Protocol

import torch

from gradtune.jobs.job import Job
from gradtune.loop.callbacks import Callback, CallbackError
from gradtune.runtime.errors import GradtuneError


class LoopView(Protocol):
    """The loop state an internal component may read (and the few things it may set).

    Read: ``job``, ``cfg``, ``model`` (as the loop calls it), ``opt``, ``device``, ``amp``,
    ``step`` (applied steps), ``total`` (the step budget), ``eval_every``, ``steps_per_epoch``,
    ``batch`` (the current ``Step``), ``count`` (its samples or tokens), ``log`` (metrics.jsonl),
    ``phases`` (seconds spent evaluating / checkpointing), ``chained`` (checkpoints written every
    ``checkpoint_every`` steps), ``eval_set`` / ``final_set`` (what evaluations run on),
    ``eval_batch``, ``run_count`` (samples or tokens since the last evaluation),
    ``evaluate_on(data)`` (one evaluation pass with the run's model and settings).
    Set: ``set_total(total, span)`` (the budget), ``warmup`` (steps), ``final_set``;
    ``note(line)`` prints through the progress display."""

    job: Job
    step: int
    total: int

    def set_total(self, total: int, span: Optional[int] = None) -> None: ...

    def note(self, line: str) -> None: ...


class ScalarState:
    """Base of the small rules a component drives (plateau, noise scale, loss scale) whose state
    is a few scalar attributes: ``saved`` names them, each with the type it is read back as
    (state.json holds plain JSON numbers)."""

    saved: ClassVar[dict[str, type]] = {}

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.saved}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, kind in self.saved.items():
            setattr(self, name, kind(state[name]))


class Component(Callback):
    """Base of the internal components: the Callback events plus those above (no-ops)."""

    all_ranks = True  # features act on every rank (their decisions must agree); output is rank 0's
    key: Optional[str] = None  # its state's key in state.json; None: no state
    wants_first = False  # on_gradients needs the first micro-batch's gradient norm
    update_every_step = False  # on_update on every step, not only at evaluation points

    def __init__(self) -> None:
        self.view: Any = None

    def attach(self, view: LoopView) -> None:
        self.view = view

    def describe(self) -> str:
        """One line for ``--dry-run`` and run.json: the component and its settings."""
        return type(self).__name__

    def on_step_begin(self) -> None:
        pass

    def loss_scale(self) -> float:
        """A multiplier of the loss sums before backward (fp16's dynamic loss scale)."""
        return 1.0

    def hold_update(self, grads: list[torch.Tensor]) -> bool:
        """True: no optimizer update this step (its gradients overflowed), though the step counts."""
        return False

    def on_gradients(self, grads: list[torch.Tensor], gnorm: Any, count: float, first: Optional[list]) -> None:
        pass

    def on_update(self, before: bool) -> None:
        pass

    def on_measure(self, row: dict[str, Any]) -> None:
        pass

    def on_step_done(self) -> None:
        pass

    def on_run_end(self) -> None:
        pass

    def on_close(self) -> None:
        pass

    def schedule(self, step: float, total: int) -> tuple[float, int]:
        """(step, total) the lr schedule is computed at (the budget maps a re-planned run)."""
        return step, total

    def lr_factor(self) -> float:
        """A multiplier of the scheduled lr (the plateau schedule's cuts)."""
        return 1.0


EVENTS = (
    "on_train_begin",
    "on_step_begin",
    "loss_scale",
    "hold_update",
    "on_gradients",
    "on_update",
    "on_step_end",
    "on_measure",
    "on_evaluate",
    "on_checkpoint",
    "on_step_done",
    "on_run_end",
    "on_close",
    "on_train_end",
    "schedule",
    "lr_factor",
)


def _overrides(obj: Any, name: str) -> bool:
    base = Component if isinstance(obj, Component) else Callback
    mine = getattr(type(obj), name, None)
    return mine is not None and mine is not getattr(base, name, None)


def _reraise(obj: Any, event: str, e: Exception) -> None:
    """Raise again what ``obj.event`` raised: a user callback's error becomes one line naming it
    and the event (``CallbackError``, exit 1; the traceback on stderr with GRADTUNE_DEBUG=1);
    gradtune's own errors and components' bugs pass as they are."""
    if isinstance(obj, Component) or isinstance(e, GradtuneError):
        raise e
    if os.environ.get("GRADTUNE_DEBUG") == "1":
        traceback.print_exception(e, file=sys.stderr)
    raise CallbackError(f"callback {type(obj).__name__}.{event} raised {type(e).__name__}: {e}") from None


class Events:
    """The run's components then the user's callbacks, in order; per event, only those that
    override it (``self.on[name]``). Under torchrun a callback runs on rank 0 only unless it sets
    ``all_ranks``; components run everywhere."""

    def __init__(self, items: list[Callback], main: bool = True) -> None:
        self.all = [c for c in items if main or c.all_ranks]
        self.on: dict[str, list[Any]] = {e: [c for c in self.all if _overrides(c, e)] for e in EVENTS}
        self.wants_first = any(getattr(c, "wants_first", False) for c in self.all)
        self.every_step_update = [c for c in self.on["on_update"] if c.update_every_step]
        # Anything that reads the step's gradients before the update, on any rank (a rank-0-only
        # callback counts everywhere, so that every rank scales its gradients alike).
        self.reads_grads = any(_overrides(c, e) for c in items for e in ("on_gradients", "hold_update"))

    @property
    def callbacks(self) -> list[Callback]:
        """The user's callbacks and early stopping: saved as a list under state.json 'callbacks'."""
        return [c for c in self.all if not isinstance(c, Component)]

    def describe(self) -> list[str]:
        return [c.describe() if isinstance(c, Component) else f"callback {type(c).__name__}" for c in self.all]

    def emit(self, event: str, *args: Any) -> None:
        for c in self.on[event]:
            try:
                getattr(c, event)(*args)
            except Exception as e:
                _reraise(c, event, e)

    def ask(self, event: str, *args: Any) -> Optional[str]:
        """An event whose listeners may return a reason to stop: every listener hears it; the
        first reason wins."""
        stop = None
        for c in self.on[event]:
            try:
                why = getattr(c, event)(*args)
            except Exception as e:
                _reraise(c, event, e)
            stop = stop or why
        return stop

    def loss_scale(self) -> float:
        """The product of the components' loss scales (1.0: none)."""
        scale = 1.0
        for c in self.on["loss_scale"]:
            scale *= c.loss_scale()
        return scale

    def hold_update(self, grads: list[torch.Tensor]) -> bool:
        """Does a component withhold this step's update? Every listener hears the gradients."""
        held = False
        for c in self.on["hold_update"]:
            held = c.hold_update(grads) or held
        return held

    def step_end(self, step: int, loss: float, lr: float) -> Optional[str]:
        """The per-step event (a ``try`` costs nothing until something raises)."""
        for c in self.on["on_step_end"]:
            try:
                why = c.on_step_end(step, loss, lr)
            except Exception as e:
                _reraise(c, "on_step_end", e)
            if why:
                return why
        return None

    def close(self) -> None:
        for c in self.on["on_close"]:
            c.on_close()

    def state_dict(self) -> dict[str, Any]:
        """Each keyed component's state under its key; the callbacks' as one list."""
        out: dict[str, Any] = {c.key: c.state_dict() for c in self.all if isinstance(c, Component) and c.key}
        out["callbacks"] = [c.state_dict() for c in self.callbacks]
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for c in self.all:
            if isinstance(c, Component) and c.key and state.get(c.key) is not None:
                c.load_state_dict(state[c.key])
        saved = state.get("callbacks")
        if saved is None:
            return
        mine = self.callbacks
        if len(saved) != len(mine):
            raise GradtuneError(f"checkpoint: saved with {len(saved)} callbacks, the run now has {len(mine)}")
        for cb, s in zip(mine, saved):
            if s is not None:
                cb.load_state_dict(s)
