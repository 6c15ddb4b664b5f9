"""What the trackers share (telemetry/trackers.py) and the MLflow sink's batching, driven with a
fake client (the store itself is tested end to end in tests/e2e/test_trackers.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from gradtune.runtime.errors import GradtuneError
from gradtune.telemetry import mlflow_sink, trackers, wandb_sink
from gradtune.telemetry.mlflow_sink import MLflowSink


def test_numbers_are_the_numeric_fields_tagged_by_kind():
    row = {"kind": "eval", "step": 3, "loss": 1.5, "ok": True, "note": "x", "ids": [1], "gn": None, "mfu": math.inf}
    assert trackers.numbers(row) == {"eval/loss": 1.5, "eval/ok": 1.0, "eval/mfu": math.inf}


def test_params_are_the_flat_config_as_text():
    tree = {"lr": 0.1, "hidden": [5], "target": None, "guard": {"enabled": True, "policy": "skip"}}
    assert trackers.flatten(tree) == {
        "lr": 0.1,
        "hidden": [5],
        "target": None,
        "guard.enabled": True,
        "guard.policy": "skip",
    }
    assert trackers.flat_params(tree) == {
        "lr": "0.1",
        "hidden": "[5]",
        "target": "null",
        "guard.enabled": "true",
        "guard.policy": "skip",
    }
    assert len(trackers.flat_params({"x": "y" * 10_000})["x"]) == trackers.PARAM_CHARS


def test_require_names_the_package(monkeypatch):
    monkeypatch.setattr(trackers, "installed", lambda m: m != "wandb")
    trackers.require(["tensorboard", "mlflow"])
    with pytest.raises(GradtuneError, match=r"^log_to: wandb needs the wandb package \(pip install wandb\)$"):
        trackers.require(["mlflow", "wandb"])


class FlakyClient:
    """MlflowClient.log_batch that fails while ``down``."""

    def __init__(self):
        self.down, self.sent, self.calls = False, [], 0

    def log_batch(self, run_id, metrics=()):
        self.calls += 1
        if self.down:
            raise ConnectionError("server away")
        self.sent.extend((m.key, m.step, m.value) for m in metrics)

    def set_terminated(self, run_id, status):
        self.status = status


def _sink(client) -> MLflowSink:
    sink = object.__new__(MLflowSink)  # no store: the batching and retry logic alone
    sink.client, sink.uri, sink.run_id = client, "fake://", "r1"
    sink.pending, sink.step, sink.done, sink.closed, sink.failing, sink.retry_at = [], 0, False, False, False, 0.0
    return sink


def test_step_rows_wait_for_an_evaluation_a_checkpoint_or_the_end():
    pytest.importorskip("mlflow")
    client = FlakyClient()
    sink = _sink(client)
    sink.write({"kind": "step", "step": 1, "loss": 2.0})
    assert client.sent == []
    sink.write({"kind": "eval", "step": 1, "val_loss": 1.5})
    assert client.sent == [("step/loss", 1, 2.0), ("eval/val_loss", 1, 1.5)]
    sink.write({"kind": "step", "step": 2, "loss": 1.0})
    sink.flush()  # a checkpoint
    assert client.sent[-1] == ("step/loss", 2, 1.0)
    sink.done = True
    sink.close()
    sink.close()
    sink.write({"kind": "eval", "step": 3, "loss": 0.5})  # after close: ignored
    assert client.status == "FINISHED" and len(client.sent) == 3


def test_a_failing_store_warns_once_and_sends_later(capsys, monkeypatch):
    pytest.importorskip("mlflow")
    client = FlakyClient()
    sink = _sink(client)
    client.down = True
    sink.write({"kind": "eval", "step": 1, "loss": 2.0})
    sink.write({"kind": "eval", "step": 2, "loss": 1.0})  # within RETRY_S: not tried again
    assert client.calls == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("gradtune: warning: MLflow fake://: ConnectionError: server away")
    client.down = False
    sink.flush()  # a checkpoint tries at once
    assert client.sent == [("eval/loss", 1, 2.0), ("eval/loss", 2, 1.0)] and not sink.failing
    monkeypatch.setattr(mlflow_sink, "KEEP", 2)
    client.down = True
    for step in range(3, 6):
        sink.write({"kind": "eval", "step": step, "loss": 0.5})
    assert [m.step for m in sink.pending] == [4, 5]  # bounded: the oldest went
    sink.close()
    assert client.status == "KILLED" and capsys.readouterr().err.count("\n") == 1


class FakeRun:
    def __init__(self, kwargs):
        self.kwargs, self.id, self.dir, self.step, self.logged = kwargs, "abc", "/x/wandb/run-abc/files", 25, []
        self.config = SimpleNamespace(update=lambda values, allow_val_change: None)

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self, exit_code):
        self.exit_code = exit_code


def test_wandb_resume_rewinds_or_falls_back_to_a_plain_resume(tmp_path, monkeypatch, capsys):
    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if "resume_from" in kwargs:
            raise ValueError("rewind is not enabled for this account")
        return FakeRun(kwargs)

    monkeypatch.setattr(wandb_sink, "_wandb", lambda: SimpleNamespace(init=init, Settings=lambda **kw: kw))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    sink = wandb_sink.WandbSink(tmp_path, {"lr": 0.1}, run_id="abc", resume_step=20)
    assert calls[0]["resume_from"] == "abc?_step=20" and calls[0]["mode"] == "offline"
    assert calls[1]["id"] == "abc" and calls[1]["resume"] == "allow" and "resume_from" not in calls[1]
    assert "refused to rewind run abc" in capsys.readouterr().err
    run = sink.run
    sink.write({"kind": "eval", "step": 24, "loss": 1.0})  # the server is at step 25: W&B would drop it
    sink.write({"kind": "eval", "step": 25, "loss": 0.5, "note": "x"})
    sink.close()
    assert run.logged == [(25, {"eval/loss": 0.5})] and run.exit_code == 1  # not done: the loop did not end
    assert sink.info() == {"run_id": "abc", "dir": "/x/wandb/run-abc"}
