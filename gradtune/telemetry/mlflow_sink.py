"""MLflow run mirroring metrics.jsonl (``log_to: [mlflow]``), through MLflow's own client.

One MLflow run per gradtune run: its params are the resolved config (``section.key``), its metrics
every numeric field of every metrics.jsonl row, tagged ``<kind>/<field>`` as in TensorBoard
(``step/loss``, ``eval/val_loss``) at the row's ``step``; at the end config.yaml, summary.json and
the report are its artifacts (``upload``). The store is ``MLFLOW_TRACKING_URI`` when set (a
server, a database), else SQLite in the run's own folder: ``out_dir/mlflow.db``, artifacts under
``out_dir/mlartifacts``, so nothing is written outside out_dir and ``mlflow ui --backend-store-uri
sqlite:///out_dir/mlflow.db`` shows it. The experiment is ``MLFLOW_EXPERIMENT_NAME`` or ``gradtune``.

A resumed run continues the same MLflow run (its id is kept in the checkpoint): the values the
interrupted process logged after the checkpoint's step are deleted first (mlflow_rewind.py), so
the history equals the uninterrupted run's, as metrics.jsonl's does. ``gradtune export`` of the
finished run adds what it wrote to the same MLflow run (``log_export``: ``export/hf``,
``export/gguf``...), found through summary.json's ``job.trackers.mlflow``.

Rows are sent in batches (one store transaction each): at every row that is not a step row, when
``BATCH`` values wait, at ``flush`` (before each checkpoint: every row it has seen is in the store)
and at ``close``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from gradtune.runtime.errors import GradtuneError
from gradtune.telemetry.mlflow_rewind import rewind
from gradtune.telemetry.trackers import flat_params, installed, numbers

MISSING = "log_to: mlflow needs the mlflow package (pip install mlflow)"
STORE = "mlflow.db"  # the default store, in out_dir
ARTIFACTS = "mlartifacts"  # the default store's artifact root, in out_dir
ARTIFACT_FILES = ("config.yaml", "summary.json", "report.html", "loss.png")
BATCH = 1000  # MLflow's limit of metrics in one log_batch call
RETRY_S = 30.0  # a failing store is tried again this long after (checkpoints and the end try at once)
KEEP = 100_000  # values held while the store fails (about 10 MB); older ones are dropped
EXPERIMENT = "gradtune"


def tracking_uri(out_dir: Path) -> str:
    """The user's store if MLFLOW_TRACKING_URI is set, else SQLite in out_dir."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(out_dir) / STORE).resolve()}"


def _client(uri: str) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise GradtuneError(MISSING) from None
    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """MLflow and alembic log each schema migration of a new SQLite store at INFO: not the run's news.
    (Importing mlflow sets its logger's level, so the import comes first.)"""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise GradtuneError(MISSING) from None
    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _warn(line: str) -> None:
    print(f"gradtune: warning: {line}", file=sys.stderr, flush=True)


def _metric(key: str, value: float, step: int) -> Any:
    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), step)


class MLflowSink:
    """A MetricsLog sink logging each row to one MLflow run (``run_id``: continue that one,
    dropping what it logged after ``resume_step``)."""

    def __init__(
        self, out_dir: Path, config: dict[str, Any], run_id: Optional[str] = None, resume_step: Optional[int] = None
    ) -> None:
        params = flat_params(config)
        self.out_dir = Path(out_dir)
        self.uri = tracking_uri(self.out_dir)
        with _quiet():
            self.client = _client(self.uri)
            try:
                found = self._existing(run_id)
                self.fresh = found is None  # a new MLflow run (none to continue, or not in this store)
                if found is None:
                    self.run_id = self._create(params)
                else:
                    self.run_id = found.info.run_id
                    self._continue(found, params, resume_step)
            except Exception as e:  # a store that cannot be reached or opened: one line before the first step
                raise GradtuneError(f"log_to: mlflow: {self.uri}: {type(e).__name__}: {e}") from None
        self.pending: list[Any] = []
        self.step = 0  # the last row's step, for a row without one
        self.done = False  # the loop finished (not killed, failed or preempted)
        self.backfill = False  # the Tracker sets it: resume.open_log replays metrics.jsonl's kept rows first
        self.closed = False
        self.failing = False  # the last send failed (warned once until one succeeds)
        self.retry_at = 0.0

    def _existing(self, run_id: Optional[str]) -> Any:
        if not run_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException:
            print(f"gradtune: warning: MLflow run {run_id} is not in {self.uri}; logging to a new run", file=sys.stderr)
            return None

    def _experiment(self) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        # The default store keeps artifacts in out_dir too (MLflow's default is ./mlruns under the cwd).
        location = None if os.environ.get("MLFLOW_TRACKING_URI") else (self.out_dir / ARTIFACTS).resolve().as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def _create(self, params: dict[str, str]) -> str:
        from mlflow.entities import Param

        tags = {"mlflow.source.name": "gradtune", "gradtune.out_dir": str(self.out_dir.resolve())}
        run = self.client.create_run(self._experiment(), tags=tags, run_name=self.out_dir.name)
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's limit of params in one batch
            self.client.log_batch(run.info.run_id, params=items[i : i + 100])
        return run.info.run_id

    def _continue(self, run: Any, params: dict[str, str], resume_step: Optional[int]) -> None:
        """The same run again: the interrupted process's values after the checkpoint go; params
        not logged yet are added (a setting that may change on resume keeps its first value:
        MLflow refuses to change a param; config.yaml, an artifact, holds the final one)."""
        from mlflow.entities import Param

        if resume_step is not None:
            note = rewind(self.client, self.run_id, resume_step)
            if note:
                _warn(note)
        new = [Param(k, v) for k, v in params.items() if k not in run.data.params]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])
        self.client.update_run(self.run_id, status="RUNNING")

    def write(self, row: dict[str, Any]) -> None:
        if self.closed:  # like MetricsLog, a late row is not an error
            return
        step = row.get("step")
        self.step = int(step) if isinstance(step, (int, float)) and math.isfinite(step) else self.step
        self.pending.extend(_metric(k, v, self.step) for k, v in numbers(row).items())
        del self.pending[: max(0, len(self.pending) - KEEP)]  # a store failing for long: the oldest go
        if row.get("kind") != "step" or len(self.pending) >= BATCH:
            self._send(force=False)

    def flush(self) -> None:
        """Send what waits now (a checkpoint is being written: what it has seen goes first)."""
        self._send(force=True)

    def _send(self, force: bool) -> None:
        """A store that fails (a server away, a locked database) does not stop the training: one
        warning, and the values wait (at most ``KEEP``) for a row ``RETRY_S`` later, a checkpoint
        or the end."""
        if self.failing and not force and time.monotonic() < self.retry_at:
            return
        while self.pending and not self.closed:
            try:
                self.client.log_batch(self.run_id, metrics=self.pending[:BATCH])
            except Exception as e:  # MLflow raises its own, requests' and SQLAlchemy's errors
                if not self.failing:
                    _warn(f"MLflow {self.uri}: {type(e).__name__}: {e}; the values wait for the next try")
                self.failing, self.retry_at = True, time.monotonic() + RETRY_S
                return
            del self.pending[:BATCH]
            self.failing = False

    def info(self) -> dict[str, str]:
        """Where the run is (summary.json's ``job.trackers.mlflow``; ``upload`` reads it)."""
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def close(self) -> None:
        """Send what is pending and mark the run FINISHED (the loop ended) or KILLED (it failed or
        was preempted: a resume reopens it); closing twice is harmless."""
        if self.closed:
            return
        self._send(force=True)
        self.closed = True
        try:
            self.client.set_terminated(self.run_id, "FINISHED" if self.done else "KILLED")
        except Exception as e:  # the training is done: a store failing now is worth a line, not the run
            _warn(f"MLflow {self.uri}: {type(e).__name__}: {e}; run {self.run_id} not marked ended")


def upload(out_dir: Path, info: dict[str, str]) -> None:
    """The finished run's files as the MLflow run's artifacts (after save_outputs wrote them); a
    store failing now is one warning: the run's own files are in out_dir whatever happens."""
    with _quiet():
        client = _client(info["tracking_uri"])
        for name in ARTIFACT_FILES:
            path = Path(out_dir) / name
            if not path.is_file():
                continue
            try:
                client.log_artifact(info["run_id"], str(path))
            except Exception as e:
                _warn(f"MLflow {info['tracking_uri']}: {name} not stored: {type(e).__name__}: {e}")
                return


def _store_file(uri: str) -> Optional[Path]:
    """The SQLite file of a ``sqlite:///`` URI (None for any other store)."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def log_export(info: dict[str, str], exported: list[tuple[str, Path]]) -> Optional[str]:
    """An export of a finished run as artifacts of that run's MLflow run (``info``: summary.json's
    ``job.trackers.mlflow``), each under ``export/<kind>`` (``kind``: hf, merged, adapter, gguf; a
    folder's files, or a file). Returns the line to print; None without the mlflow package (the
    export needs no tracker). A store that is gone or fails is one warning: the export is written
    whatever happens. The run is addressed by id through the client: its status is left as the
    training ended it."""
    if not exported or not installed("mlflow"):
        return None
    uri, run_id = info["tracking_uri"], info["run_id"]
    store = _store_file(uri)
    if store is not None and not store.is_file():  # the client would create an empty database there
        _warn(f"MLflow store {uri} is gone; the export is not logged to run {run_id}")
        return None
    names = []
    with _quiet():
        client = _client(uri)
        for kind, path in exported:
            name = f"export/{kind}"
            try:
                if Path(path).is_dir():
                    client.log_artifacts(run_id, str(path), artifact_path=name)
                else:
                    client.log_artifact(run_id, str(path), artifact_path=name)
            except Exception as e:  # MLflow raises its own, requests' and SQLAlchemy's errors
                _warn(f"MLflow {uri}: {name} not stored: {type(e).__name__}: {e}")
                continue
            names.append(name)
    return f"mlflow: {', '.join(names)} logged as artifacts of run {run_id} in {uri}" if names else None
