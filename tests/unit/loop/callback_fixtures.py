"""Callbacks the loop tests load by name from a config's ``callbacks:`` entry."""

from gradtune.loop.callbacks import Callback


class RaiseAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, step, loss, lr):
        if step == self.step:
            raise ValueError(f"step {step} is cursed")
        return None
