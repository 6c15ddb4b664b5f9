"""Weights & Biases run mirroring metrics.jsonl (``log_to: [wandb]``), offline by default.

``WANDB_MODE`` is the user's when set; otherwise the run is offline (no network, no account): W&B
writes it under ``out_dir/wandb/offline-run-<time>-<id>/`` and ``wandb sync out_dir/wandb/offline-run-*``
uploads it later. The config is the resolved config (``section.key``); the history gets every
numeric field of every metrics.jsonl row, tagged ``<kind>/<field>`` at the row's ``step`` (a step
row and an evaluation at one step share one history row). The project is ``WANDB_PROJECT`` or
``gradtune``.

A resumed run continues the same W&B run (its id is kept in the checkpoint) with W&B's rewind,
``resume_from=<id>?_step=<checkpoint step>``: the history after the checkpoint's step, which the
interrupted process may have logged, is dropped when the run is synced, and the recomputed steps
take its place. Rows below the step the run continues from (the resume row itself) are not sent:
W&B only takes steps that increase.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

from gradtune.runtime.errors import GradtuneError
from gradtune.telemetry.trackers import flatten, numbers

MISSING = "log_to: wandb needs the wandb package (pip install wandb)"
PROJECT = "gradtune"


def _wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise GradtuneError(MISSING) from None
    return wandb


def _init(wandb: Any, kwargs: dict[str, Any]) -> Any:
    """``wandb.init``; W&B's own errors (a bad WANDB_MODE, a refused login) as one line. A server
    that refuses the rewind (an online run, where it is a feature of the account) is asked for a
    plain resume of the same id instead: it then keeps the interrupted process's values for the
    steps after the checkpoint, and drops the recomputed ones (W&B takes increasing steps only)."""
    try:
        return wandb.init(**kwargs)
    except Exception as e:
        if "resume_from" not in kwargs:
            raise GradtuneError(f"log_to: wandb: {type(e).__name__}: {e}") from None
        run_id = kwargs.pop("resume_from").partition("?")[0]
        print(f"gradtune: warning: W&B refused to rewind run {run_id} ({e}); resuming it as it is", file=sys.stderr)
    return _init(wandb, {**kwargs, "id": run_id, "resume": "allow"})


class WandbSink:
    """A MetricsLog sink logging each row to one W&B run (``run_id``: continue that one from
    ``resume_step``)."""

    def __init__(
        self, out_dir: Path, config: dict[str, Any], run_id: Optional[str] = None, resume_step: Optional[int] = None
    ) -> None:
        wandb = _wandb()
        params = flatten(config)
        self.folder = Path(out_dir) / "wandb"
        self.folder.mkdir(parents=True, exist_ok=True)  # wandb.init wants its dir to exist
        settings = wandb.Settings(silent=True, console="off", save_code=False, disable_git=True)
        kwargs: dict[str, Any] = {
            "dir": str(Path(out_dir).resolve()),  # W&B keeps it in the run: absolute, as MLflow's store
            "project": os.environ.get("WANDB_PROJECT") or PROJECT,
            "name": Path(out_dir).name,
            "settings": settings,
            "mode": None if os.environ.get("WANDB_MODE") else "offline",
        }
        self.floor = 0  # the lowest step the run still takes
        self.fresh = not (run_id and resume_step is not None)  # a new W&B run
        if run_id and resume_step is not None:
            kwargs["resume_from"] = f"{run_id}?_step={resume_step}"
            self.floor = resume_step + 1
        else:
            kwargs["config"] = params
        self.run = _init(wandb, kwargs)
        self.floor = max(self.floor, int(getattr(self.run, "step", 0) or 0))  # a plain resume: the server's next step
        if "config" not in kwargs:
            self.run.config.update(params, allow_val_change=True)
        self.run_id = self.run.id
        self.where = str(Path(self.run.dir).parent)  # out_dir/wandb/offline-run-<time>-<id>
        self.step = self.floor
        self.done = False  # the loop finished (not killed, failed or preempted)
        self.backfill = False  # the Tracker sets it: resume.open_log replays metrics.jsonl's kept rows first

    def write(self, row: dict[str, Any]) -> None:
        if self.run is None:  # closed: like MetricsLog, a late row is not an error
            return
        step = row.get("step")
        self.step = int(step) if isinstance(step, (int, float)) and math.isfinite(step) else self.step
        values = numbers(row)
        if values and self.step >= self.floor:
            self.run.log(values, step=self.step)

    def flush(self) -> None:
        """W&B queues each row to its own process as it is logged: nothing waits here."""

    def info(self) -> dict[str, str]:
        """Where the run is (summary.json's ``job.trackers.wandb``)."""
        return {"run_id": self.run_id, "dir": self.where}

    def close(self) -> None:
        """Finish the run (its files complete); closing twice is harmless."""
        if self.run is not None:
            self.run.finish(exit_code=0 if self.done else 1)
            self.run = None
