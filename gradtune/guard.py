"""Divergence guard: is this step healthy? Decided before the update touches anything.

A non-finite loss, or a loss spike (robust z-score of the loss against the median and MAD of a
running window of recent healthy steps), triggers the configured policy: ``skip`` the step,
``rollback`` to the last good checkpoint, or ``stop``. A non-finite gradient norm counts as a
non-finite loss. Decisions depend only on the loss history, so a rerun makes the same ones.

Rollback reloads weights, optimizer, guard window and random states from the newest checkpoint,
multiplies the lr by ``lr_factor`` and keeps the data position where it is: the window of data
from that checkpoint to the offending batch is skipped (PaLM's recipe for loss spikes). After
``max_rollbacks`` the run stops and suggests a learning rate.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Optional

from gradtune.config import GuardConfig


class Guard:
    def __init__(self, cfg: GuardConfig) -> None:
        self.cfg = cfg
        self.window: deque[float] = deque(maxlen=cfg.spike_window)
        self.rollbacks = 0

    def state(self) -> dict:
        return {"window": list(self.window), "rollbacks": self.rollbacks}

    def load_state(self, state: dict) -> None:
        self.window = deque((float(v) for v in state["window"]), maxlen=self.cfg.spike_window)
        self.rollbacks = int(state["rollbacks"])

    def zscore(self, loss: float) -> Optional[float]:
        if len(self.window) < max(5, self.window.maxlen // 2):
            return None
        ordered = sorted(self.window)
        med = ordered[len(ordered) // 2]
        mad = sorted(abs(v - med) for v in ordered)[len(ordered) // 2]
        # 1.4826 * MAD estimates the standard deviation for normal data; the floor keeps a flat
        # window (a converged loss) from calling every tiny wiggle a spike.
        scale = max(1.4826 * mad, 1e-3 * abs(med), 1e-12)
        return (loss - med) / scale

    def check(self, loss: float, grad_norm: Optional[float] = None) -> tuple[str, str]:
        """(action, reason): action is "ok" or the policy to apply."""
        if not self.cfg.enabled:
            return ("ok", "") if math.isfinite(loss) else ("stop", "non-finite loss (guard disabled)")
        if not math.isfinite(loss):
            return self.cfg.policy, f"non-finite loss {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return self.cfg.policy, f"non-finite gradient (norm {grad_norm})"
        z = self.zscore(loss) if self.cfg.spike_zscore > 0 else None
        if z is not None and z > self.cfg.spike_zscore:
            return self.cfg.policy, f"loss spike {loss:.6g} (robust z {z:.1f} > {self.cfg.spike_zscore:g})"
        self.window.append(loss)
        return "ok", ""


def handle(loop: Any, action: str, why: str, step: Any) -> Optional[str]:
    """Apply the decision to ``loop`` for a step (variants.Step) whose update was not made;
    return why to stop, or None. The step counter does not advance (the schedule stays put)
    and the batch is dropped; the decision is written to metrics.jsonl with the sample ids."""
    import torch

    for p in loop.params:
        p.grad = None
    loop.skipped += 1
    row: dict[str, Any] = {"kind": "guard", "step": loop.step, "action": action, "reason": why,
                           "epoch": step.epoch, "index": step.index,
                           "sample_ids": torch.cat(step.micro).tolist()[:64]}
    stop = None
    if action == "rollback":
        stop = rollback(loop, row)
    elif action == "stop":
        stop = f"diverged: {why} at step {loop.step}"
    elif loop.skipped > max(10, loop.total // 10):
        stop = f"diverged: {why} ({loop.skipped} steps skipped)"
    loop.log.write(row)
    loop.progress.note(f"guard: step {loop.step}: {why} -> {action}")
    return stop


def rollback(loop: Any, row: dict[str, Any]) -> Optional[str]:
    """Roll ``loop`` back to its newest good checkpoint with a lower lr; why to stop, or None.

    ``row`` (the guard's metrics record of the bad step) gains what was done.
    """
    from gradtune import resume

    g = loop.guard
    lr_now = loop.cfg.lr * loop.lr_scale
    if g.rollbacks >= g.cfg.max_rollbacks:
        suggestion = lr_now * g.cfg.lr_factor
        return (f"diverged: the loss kept exploding after {g.rollbacks} rollbacks (guard.max_rollbacks) "
                f"at lr {lr_now:.3g}; try lr={suggestion:.3g} or lower (`gradtune lr-find` suggests one)")
    found = resume.latest(loop.ckpt_root)
    if found is None:
        return "diverged: no checkpoint to roll back to"
    position, skipped = loop.sampler.state(), loop.skipped
    rollbacks, scale = g.rollbacks + 1, loop.lr_scale * g.cfg.lr_factor
    resume.restore(loop, found)
    # Kept from now, not from the checkpoint: the data already passed (the offending window is
    # skipped), the rollback count and the lowered lr.
    loop.sampler.load_state(position)
    g.rollbacks, loop.lr_scale, loop.skipped = rollbacks, scale, skipped
    loop.finished = None
    row.update({"rollback_to": found.folder.name, "resume_step": loop.step, "lr_scale": scale,
                "rollbacks": rollbacks})
    return None
