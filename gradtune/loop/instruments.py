"""Components that watch the run and report it: the progress display, training throughput and
MFU, update ratios, TensorBoard. None changes what is trained; none is on the per-step path
unless it must be (progress ticks, throughput marks)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from gradtune.loop.callbacks import Control
from gradtune.loop.components import Component
from gradtune.loop.evaluation import ratio_snapshot, update_ratios
from gradtune.runtime.peak_flops import peak_flops
from gradtune.telemetry.progress import Progress
from gradtune.telemetry.tensorboard import TensorBoardSink


class ProgressDisplay(Component):
    """``progress``: a bar or lines on stderr (telemetry/progress.py), counting the job's unit;
    the loop's notes (guard, plateau) go through it. Not on a run with ``progress: off``."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def describe(self) -> str:
        return f"ProgressDisplay(progress={self.mode})"

    def on_train_begin(self, control: Control) -> None:
        v = self.view
        v.progress = Progress(self.mode, v.total, unit=v.job.unit, start=v.step)

    def on_step_end(self, step: int, loss: float, lr: float) -> Optional[str]:
        self.view.progress.tick(step, loss, lr, self.view.count)
        return None

    def on_evaluate(self, step: int, metrics: dict[str, Any]) -> Optional[str]:
        self.view.progress.report(step, {k: v for k, v in metrics.items() if k not in ("kind", "step")})
        return None

    def on_run_end(self) -> None:
        self.view.progress.close(self.view.step)


class Throughput(Component):
    """tokens_per_s (and MFU where the job knows its FLOPs per token) at each evaluation: the
    training tokens since the previous one over the training seconds, evaluations and
    checkpoints left out. Language models only (``Job.unit`` tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.t_mark = self.other_mark = 0.0
        self.pending = False  # mark again at the next step: the evaluation and its checkpoint are done

    def _mark(self) -> None:
        self.t_mark, self.other_mark, self.pending = time.perf_counter(), self.view.phases.other(), False

    def on_train_begin(self, control: Control) -> None:
        self._mark()

    def on_step_begin(self) -> None:
        if self.pending:
            self._mark()

    def on_measure(self, row: dict[str, Any]) -> None:
        v = self.view
        now = time.perf_counter()
        tps = v.period_count / max(now - self.t_mark - (v.phases.other() - self.other_mark), 1e-9)
        row["tokens_per_s"] = tps
        per_token = v.job.info.get("flops_per_token")
        if per_token is not None:
            bf16 = v.cfg.precision == "bf16" or (v.cfg.precision == "fp16" and v.device.type == "cuda")  # tensor cores
            row["mfu"] = per_token * tps / peak_flops(v.device, bf16)
            if row["mfu"] > 1.0:  # the cached peak was measured at a busy moment: measure again
                row["mfu"] = per_token * tps / peak_flops(v.device, bf16, remeasure=True)
        self.pending = True


class UpdateRatios(Component):
    """||update|| / ||weights|| per parameter group, measured on the step that closes each
    evaluation period (loop/evaluation.update_ratios): update_ratio_g<i> in the row."""

    def __init__(self) -> None:
        super().__init__()
        self.before: Any = None
        self.health: dict[str, float] = {}

    def on_train_begin(self, control: Control) -> None:
        self.health = {}

    def on_update(self, before: bool) -> None:
        if before:
            self.before = ratio_snapshot(self.view.opt)
        else:
            self.health, self.before = update_ratios(self.view.opt, self.before), None

    def on_measure(self, row: dict[str, Any]) -> None:
        row.update(self.health)


class TensorBoard(Component):
    """``log_to: [tensorboard]``: every metrics.jsonl row also to an event file under out_dir/tb
    (telemetry/tensorboard.py), the resume row included (its sink is opened with the log)."""

    def __init__(self, out_dir: Path) -> None:
        super().__init__()
        self.folder = out_dir / "tb"

    def describe(self) -> str:
        return f"TensorBoard({self.folder})"

    def log_sink(self) -> TensorBoardSink:
        """Opened by fit() once out_dir is claimed; closed with metrics.jsonl."""
        return TensorBoardSink(self.folder)
