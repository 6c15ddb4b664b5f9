"""Components for the process rather than the model: the host allocator policy, the
fine-tuning audit and the test probe. Each acts right after the optimizer step or at the step's
end; none changes a number the run computes."""

from __future__ import annotations

from typing import Optional

import torch

from gradtune.loop.callbacks import Control
from gradtune.loop.components import Component
from gradtune.runtime import allocator, testhooks


class AllocatorPolicy(Component):
    """Host memory (runtime/allocator.py): once batch lengths are seen to vary, trim the heap
    after steps so that varying shapes do not fragment it. Sequence jobs on an armed CPU only."""

    update_every_step = True

    def __init__(self, lengths: torch.Tensor, pad_multiple: int) -> None:
        super().__init__()
        self.memory = allocator.Adaptive(lengths, pad_multiple)

    def on_update(self, before: bool) -> None:
        if not before:
            self.memory.after_step(self.view.batch.micro)


class Audit(Component):
    """Fine-tuning audit (``finetune.audit``): the job fingerprints its weights when the loop
    starts (after distributed wrapping: DDP's broadcast rewrites them in place) and checks, right
    after the first optimizer step of a fresh run, that exactly the right weights moved."""

    update_every_step = True

    def on_train_begin(self, control: Control) -> None:
        if self.view.job.at_start is not None:
            self.view.job.at_start(self.view.job.model)

    def on_update(self, before: bool) -> None:
        job = self.view.job
        if not before and self.view.step == 0 and job.after_first_step is not None:
            job.after_first_step(job.model)


class TestProbe(Component):
    """``GRADTUNE_TEST_PROBE``: each applied step's sample ids to a file (runtime/testhooks.py),
    to prove no sample is seen twice or skipped across kills and ranks. Rank 0, tests only."""

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        super().__init__()
        self.probe: Optional[testhooks.Probe] = None

    def on_train_begin(self, control: Control) -> None:
        self.probe = testhooks.Probe()

    def on_step_end(self, step: int, loss: float, lr: float) -> Optional[str]:
        if self.probe is not None:
            self.probe.record(step, torch.cat(self.view.batch.micro).tolist())
        return None

    def on_run_end(self) -> None:
        self.on_close()

    def on_close(self) -> None:
        if self.probe is not None:
            self.probe.close()
