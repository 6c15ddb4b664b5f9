"""TensorBoard event files mirroring metrics.jsonl (``log_to: [tensorboard]``).

Every numeric field of every row becomes a scalar tagged ``<kind>/<field>`` (``step/loss``,
``eval/val_loss``, ``guard/rollbacks``) at the row's ``step``; rows that are events rather than
measurements (a guard decision, a resume: every kind but ``step`` and ``eval``) are also written
as a text summary tagged by their kind, so the decision and its reason show beside the curves.

Only the ``tensorboard`` package is used (its own event-file writer and protos), not TensorFlow
or ``torch.utils.tensorboard``. It is an optional dependency, imported when a sink is made.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gradtune.runtime.errors import GradtuneError

MISSING = "log_to: tensorboard needs the tensorboard package (pip install tensorboard)"
MEASURES = ("step", "eval")  # row kinds that are measurements; any other kind is an event
AXIS = "step"  # the x axis of every summary, so not a scalar of its own


def _tensorboard() -> dict[str, Any]:
    """The few pieces of the tensorboard package the sink needs; GradtuneError if it is absent."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.plugins.text.summary_v2 import text_pb
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        raise GradtuneError(MISSING) from None
    return {"event_pb2": event_pb2, "summary_pb2": summary_pb2, "text_pb": text_pb, "writer": EventFileWriter}


def _number(value: Any) -> bool:
    # bool counts (0/1 plots a flag); None, strings, lists and dicts have no scalar to plot.
    return isinstance(value, (int, float))


def _markdown(row: dict[str, Any]) -> str:
    """An event row as a markdown list, one field a line (TensorBoard's text plugin renders it)."""
    lines = []
    for key, value in row.items():
        shown = value if isinstance(value, str) else json.dumps(value)
        lines.append(f"- **{key}**: {shown}")
    return "\n".join(lines)


class TensorBoardSink:
    """A MetricsLog sink writing each row to one event file under ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.tb = _tensorboard()
        Path(folder).mkdir(parents=True, exist_ok=True)
        # flush_secs: a step row is flushed within this time even between evaluations.
        self.writer = self.tb["writer"](str(folder), max_queue_size=100, flush_secs=30)
        self.step = 0  # the last row's step, for a row without one

    def write(self, row: dict[str, Any]) -> None:
        if self.writer is None:  # closed: like MetricsLog, a late row is not an error
            return
        kind = str(row.get("kind", "log"))
        step = row.get(AXIS)
        self.step = int(step) if _number(step) else self.step
        summary = self.tb["summary_pb2"].Summary()
        for key, value in row.items():
            if key != AXIS and _number(value):
                summary.value.add(tag=f"{kind}/{key}", simple_value=float(value))
        if summary.value:
            self._add(summary=summary)
        if kind in MEASURES:
            if kind == "eval":  # so a running TensorBoard shows each evaluation as it lands
                self.writer.flush()
            return
        if kind == "resume":
            self._mark_restart()
        self._add(summary=self.tb["text_pb"](kind, _markdown(row)))
        self.writer.flush()  # events are rare and are what one looks for after a failure

    def _mark_restart(self) -> None:
        """A resumed run recomputes the steps after its checkpoint, which the interrupted process
        may already have logged to its own event file. SessionLog START at the first recomputed
        step tells TensorBoard to drop those orphans, as metrics.jsonl cuts them; the checkpoint's
        own step (its evaluation was logged before it was saved) is kept."""
        log = self.tb["event_pb2"].SessionLog(status=self.tb["event_pb2"].SessionLog.START)
        self._add(session_log=log, step=self.step + 1)

    def _add(self, step: int | None = None, **field: Any) -> None:
        event = self.tb["event_pb2"].Event(wall_time=time.time(), step=self.step if step is None else step, **field)
        self.writer.add_event(event)

    def close(self) -> None:
        """Write out everything pending and close the file; closing twice is harmless."""
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
