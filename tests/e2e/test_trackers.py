"""``log_to: [mlflow, wandb]``: the tracker runs hold metrics.jsonl's numbers.

Oracles: metrics.jsonl (every numeric field of every row, at its step, as the tracker reads it
back: ``mlflow.search_runs`` / ``get_metric_history`` on the SQLite store, the offline ``.wandb``
file's history records); the uninterrupted run (a run killed after its checkpoint and resumed is
ONE MLflow run whose history equals it, the killed process's values after the checkpoint gone;
the W&B run continues from the checkpoint's step with W&B's rewind).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from gradtune.cli import main
from gradtune.runtime import testhooks
from gradtune.telemetry.trackers import numbers
from tests import hooks

pytestmark = pytest.mark.xdist_group("trackers")  # one worker: the uninterrupted run is made once
mlflow = pytest.importorskip("mlflow")
pytest.importorskip("sqlalchemy")
pytest.importorskip("wandb")

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["model=linear", "data=diabetes", "max_steps=30", "log_every=1", "checkpoint_every=10", "progress=off"]
CHECKPOINT, KILLED_AT = 20, 24  # the raise comes before step 25: steps 21..24 are logged, then recomputed


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def _train(out: Path, *extra: str) -> int:
    return main(["train", *ARGS, "log_to=[mlflow, wandb]", f"out_dir={out}", *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, both trackers on, default stores (under out_dir)."""
    out = tmp_path_factory.mktemp("trackers") / "ref"
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("WANDB_MODE", raising=False)
    try:
        assert _train(out) == 0
    finally:
        mp.undo()
    return out


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _expected(out: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as key -> [(step, value)], ``<kind>/<field>`` as the trackers tag it."""
    want: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in _rows(out):
        for key, value in numbers(row).items():
            want[key].append((row["step"], value))
    return dict(want)


def _store(out: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")


def _history(client: Any, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    got = {}
    for key in keys:
        points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        got[key] = [(m.step, m.value) for m in points]
    return got


def _one_run(out: Path) -> Any:
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    try:
        runs = mlflow.search_runs(experiment_names=["gradtune"], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_mlflow_run_holds_every_metric_param_and_artifact(reference: Path) -> None:
    run = _one_run(reference)
    assert run.info.status == "FINISHED"
    want = _expected(reference)
    assert {"step/loss", "step/lr", "eval/loss", "eval/val_loss", "eval/grad_norm"} <= set(want)
    assert _history(_store(reference), run.info.run_id, sorted(want)) == want
    assert set(run.data.metrics) == set(want)  # search_runs' latest values: nothing more, nothing less
    last = {key: points[-1][1] for key, points in want.items()}
    assert run.data.metrics == last
    assert run.data.params["model"] == "linear" and run.data.params["max_steps"] == "30"
    assert run.data.params["guard.enabled"] == "true" and run.data.params["log_to"] == '["mlflow", "wandb"]'
    artifacts = {a.path for a in _store(reference).list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "report.html"} <= artifacts
    stored = reference / "mlartifacts" / run.info.run_id / "artifacts" / "config.yaml"
    assert stored.read_bytes() == (reference / "config.yaml").read_bytes()  # the store is in out_dir
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["job"]["trackers"]["mlflow"]["run_id"] == run.info.run_id


# --- W&B's offline file: a LevelDB-style log of protobuf records ---------------------------------------

BLOCK, HEADER = 32768, 7  # the log's block size and per-chunk header (crc32, length, type)


def _records(path: Path) -> list[Any]:
    """Every record of an offline ``run-<id>.wandb`` file (W&B's format: a 7-byte file header
    ':W&B' + magic + version, then LevelDB log chunks: FULL=1, FIRST=2, MIDDLE=3, LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    out, pos, part = [], 7, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            break
        part += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def _wandb_file(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))


def _wandb_history(path: Path) -> dict[int, dict[str, float]]:
    rows = {}
    for record in _records(path):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            rows[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return rows


def _by_step(out: Path, since: int = 0, resume: bool = False) -> dict[int, dict[str, float]]:
    """metrics.jsonl as W&B's history rows: step -> every value logged at it (the resume row, at
    the checkpoint's step, only where W&B takes that step: a new run, not a rewound one)."""
    want: dict[int, dict[str, float]] = defaultdict(dict)
    for row in _rows(out):
        if row["step"] >= since and (resume or row["kind"] != "resume"):
            want[row["step"]].update(numbers(row))
    return dict(want)


def test_wandb_offline_run_holds_every_metric(reference: Path) -> None:
    (path,) = _wandb_file(reference)
    assert _wandb_history(path) == _by_step(reference)
    run = next(r.run for r in _records(path) if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["model"] == "linear" and config["max_steps"] == 30 and config["guard.enabled"] is True
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["job"]["trackers"]["wandb"]["run_id"] == run.run_id == path.stem.removeprefix("run-")


def test_killed_and_resumed_run_is_one_tracker_run_equal_to_the_uninterrupted_one(
    reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    testhooks.configure(f"step.begin@{KILLED_AT + 1}=RAISE")
    try:
        with pytest.raises(RuntimeError):
            _train(out)
    finally:
        testhooks.configure("")
    run = _one_run(out)
    killed = _history(_store(out), run.info.run_id, ["step/loss"])["step/loss"]
    assert killed[-1][0] == KILLED_AT and run.info.status == "KILLED"  # the orphans are there to drop
    assert _train(out) == 0
    resumed = _one_run(out)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    # The resumed run's history is its metrics.jsonl (the resume row included) ...
    want = _expected(out)
    client = _store(out)
    assert _history(client, run.info.run_id, sorted(want)) == want
    # ... and, but for wall-clock times and the resume row, the uninterrupted run's.
    ref = {k: v for k, v in _expected(reference).items() if not k.endswith("/time")}
    assert _history(client, run.info.run_id, sorted(ref)) == ref
    assert set(resumed.data.metrics) - set(ref) == {"eval/time", "step/time", "resume/time"}
    # W&B: the same run id, continued from the checkpoint's step; the recomputed steps are logged.
    first, second = _wandb_file(out)
    assert first.name == second.name
    (branch,) = [r.run.branch_point for r in _records(second) if r.WhichOneof("record_type") == "run"]
    assert (branch.run, branch.value) == (first.stem.removeprefix("run-"), CHECKPOINT)
    assert max(_wandb_history(first)) == KILLED_AT
    assert _wandb_history(second) == _by_step(out, since=CHECKPOINT + 1)


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_is_one_mlflow_run_equal_to_its_log(tmp_path: Path) -> None:
    """A real SIGKILL two steps after the checkpoint at step 20, before the next evaluation: no
    close, no flush at the end. The step rows since the evaluation at 12, which the checkpoint had
    seen, were sent before it was written (else they would be lost: the resume starts after them);
    steps 21 and 22 die with the process and are recomputed."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), hooks.FAULTS: f"step.begin@{CHECKPOINT + 3}"}
    args = [sys.executable, "-m", "gradtune", "train", *ARGS, "log_to=[mlflow]", f"out_dir={out}"]
    killed = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = _one_run(out)
    sent = _history(_store(out), run.info.run_id, ["step/loss", "eval/loss"])
    assert [s for s, _ in sent["step/loss"]] == list(range(1, CHECKPOINT + 1)) and run.info.status == "RUNNING"
    assert [s for s, _ in sent["eval/loss"]] == [12]
    assert _train(out) == 0
    resumed = _one_run(out)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    want = _expected(out)
    assert _history(_store(out), run.info.run_id, sorted(want)) == want


@pytest.mark.slow
def test_a_tracker_added_on_resume_gets_the_rows_before_the_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", *ARGS, "max_steps=20", f"out_dir={out}"]) == 0  # no tracker
    assert main(["train", *ARGS, "log_to=[mlflow, wandb]", f"out_dir={out}"]) == 0  # extended to 30 steps
    run = _one_run(out)
    want = _expected(out)
    assert want["step/loss"][0][0] == 1 and "resume/time" in want
    assert _history(_store(out), run.info.run_id, sorted(want)) == want
    (path,) = _wandb_file(out)
    assert _wandb_history(path) == _by_step(out, resume=True)
