"""``precision: fp16``'s dynamic loss scale: torch.amp.GradScaler's rule, written here.

fp16 keeps about 3 decimal digits between 6e-8 and 65504: small gradients flush to zero, large
ones overflow. So the loss sums are multiplied by ``scale`` (a power of two) before backward, and
the loop divides the gradients by ``count * scale`` in its one division (exact: a power of two
moves no bits). Parameters and optimizer state stay float32 (master weights). Then

    any gradient inf or nan?   the update is skipped, scale *= 0.5, clean steps = 0
    else                       clean steps += 1; at GROWTH_INTERVAL: scale *= 2, clean steps = 0

(GradScaler's defaults: init_scale 65536, growth_factor 2, backoff_factor 0.5, growth_interval
2000; a scale whose growth would leave float32 is kept, as GradScaler keeps it.)

An overflowing step still COUNTS, as in a loop driven by GradScaler (``scaler.step`` skips the
optimizer, the loop's iteration and its data go on; HF Trainer's global step too): the step
counter, the sampler and the lr schedule advance, the step's loss is logged, so ``max_steps`` and
epochs mean the data seen and a resumed run lines up with the uninterrupted one. Overflows are
the scale calibrating itself (a few at the start, one every ~2000 steps after a growth), not
divergence: each is a metrics.jsonl row ``{"kind": "overflow", "step", "scale"}`` (``step`` as in
the step rows; ``scale`` the halved one) and the count goes to summary.json (``job.loss_scale``).
The divergence guard does not hear an overflowed gradient; it still judges the step's loss,
which is computed in float32 terms, so a non-finite loss is divergence as in fp32. A scale
halved below FLOOR (overflows whatever the scale: the gradients themselves are inf/nan) stops the
run as diverged.

The scale, the clean-step count and the overflow count are this component's state (``key``
``loss_scale`` in state.json): a resumed run scales, skips and grows at the very same steps.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from gradtune.loop import gradient
from gradtune.loop.components import Component, ScalarState
from gradtune.runtime import testhooks

INIT_SCALE = 2.0**16
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
GROWTH_INTERVAL = 2000  # clean steps between doublings
FLOOR = 1.0  # a scale halved below this: the gradients are non-finite unscaled, the run diverged
_FP32_MAX = torch.finfo(torch.float32).max  # GradScaler keeps its scale in a float32 tensor


class DynamicScale(ScalarState):
    """The scale and its clean-step counter (``update`` = ``GradScaler.update`` given found_inf)."""

    saved = {"scale": float, "clean": int, "overflows": int}

    def __init__(self, init: float = INIT_SCALE, growth_interval: int = GROWTH_INTERVAL) -> None:
        self.scale, self.growth_interval = float(init), growth_interval
        self.clean = 0  # clean steps since the last growth or overflow (GradScaler's growth tracker)
        self.overflows = 0

    def update(self, found_inf: bool) -> float:
        """The scale after a step whose gradients did (True) or did not overflow."""
        if found_inf:
            self.scale *= BACKOFF_FACTOR
            self.clean = 0
            self.overflows += 1
            return self.scale
        self.clean += 1
        if self.clean == self.growth_interval:
            grown = self.scale * GROWTH_FACTOR
            if grown <= _FP32_MAX:
                self.scale = grown
            self.clean = 0
        return self.scale


class LossScaler(Component):
    """The loss scale on the loop's events: ``loss_scale`` (the factor of the loss sums before
    backward), ``hold_update`` (the unscaled gradients overflowed: no update this step),
    ``on_step_end`` (stop when the scale fell under FLOOR), ``on_run_end`` (the count into
    summary.json)."""

    key = "loss_scale"

    def __init__(self, init: Optional[float] = None, growth_interval: Optional[int] = None) -> None:
        super().__init__()
        # None: the module's constants, read now (tests shorten GROWTH_INTERVAL)
        self.s = DynamicScale(init or INIT_SCALE, growth_interval or GROWTH_INTERVAL)
        self.stop: Optional[str] = None

    def describe(self) -> str:
        return f"LossScaler(fp16, scale {self.s.scale:g}, x2 after {self.s.growth_interval} clean steps)"

    def loss_scale(self) -> float:
        return self.s.scale

    def hold_update(self, grads: list[torch.Tensor]) -> bool:
        if testhooks.hit("grads") and grads:  # tests: this step's gradients overflowed
            grads[0].view(-1)[0] = math.inf
        found = not gradient.all_finite(grads)
        scale = self.s.update(found)
        if found:
            v = self.view
            v.log.write({"kind": "overflow", "step": v.step + 1, "scale": scale})
            if scale < FLOOR:
                self.stop = (
                    f"diverged: non-finite gradients even at loss scale {scale:g} "
                    f"({self.s.overflows} fp16 overflows) at step {v.step + 1}"
                )
        return found

    def on_step_end(self, step: int, loss: float, lr: float) -> Optional[str]:
        return self.stop

    def on_run_end(self) -> None:
        self.view.job.info["loss_scale"] = {"overflow_steps": self.s.overflows, "final_scale": self.s.scale}

    def state_dict(self) -> dict[str, Any]:
        return self.s.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.s.load_state_dict(state)
