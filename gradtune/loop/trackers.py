"""``log_to: [mlflow, wandb]``: every metrics.jsonl row also to an experiment tracker's run
(telemetry/mlflow_sink.py, telemetry/wandb_sink.py), on rank 0 only.

The tracker's run id is this component's state (state.json under ``mlflow`` / ``wandb``), so a
resumed run continues the same tracker run from the checkpoint's step, the values logged after it
by the interrupted process dropped, as metrics.jsonl drops its rows. Pending rows are sent before
each checkpoint is written (``state_dict``): what a checkpoint has seen is in the tracker. At the
end the run's ids go to ``job.info["trackers"]`` (summary.json), where save_outputs finds the
MLflow run to attach the finished run's files to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from gradtune.config import Config
from gradtune.loop.components import Component
from gradtune.telemetry.mlflow_sink import MLflowSink, tracking_uri
from gradtune.telemetry.wandb_sink import WandbSink

SINKS = {"mlflow": MLflowSink, "wandb": WandbSink}
NAMES = {"mlflow": "MLflow", "wandb": "W&B"}


class Tracker(Component):
    """One tracker of ``log_to`` (``name``: mlflow | wandb); its sink is opened with the log."""

    def __init__(self, name: str, out_dir: Path, cfg: Config) -> None:
        super().__init__()
        self.key = name
        self.out_dir = Path(out_dir)
        self.config = cfg.to_dict()  # each tracker flattens it its own way
        self.run_id: Optional[str] = None  # restored from a checkpoint, else the sink's new run
        self.sink: Any = None

    def describe(self) -> str:
        where = tracking_uri(self.out_dir) if self.key == "mlflow" else str(self.out_dir / "wandb")
        return f"{NAMES[self.key]}({where})"

    def log_sink(self) -> Any:
        """Opened by fit() once out_dir is claimed and the checkpoint restored (the loop's step is
        then the checkpoint's); closed with metrics.jsonl."""
        resume_step = self.view.step if self.run_id else None
        self.sink = SINKS[self.key](self.out_dir, self.config, self.run_id, resume_step)
        # A resumed run that starts a new tracker run (log_to grew on resume; MLflow: the run is not
        # in this store): open_log fills it with metrics.jsonl's rows so far.
        self.sink.backfill = self.sink.fresh and self.view.step > 0
        self.run_id = self.sink.run_id
        return self.sink

    def state_dict(self) -> dict[str, Any]:
        if self.sink is not None:
            self.sink.flush()  # a checkpoint is being written: every row it has seen goes first
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        run_id = state.get("run_id")
        self.run_id = run_id if isinstance(run_id, str) and run_id else None

    def on_run_end(self) -> None:
        if self.sink is not None:
            self.sink.done = True
            self.view.job.info.setdefault("trackers", {})[self.key] = self.sink.info()
