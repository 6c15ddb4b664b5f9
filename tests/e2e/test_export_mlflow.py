"""``gradtune export`` of a run logged to MLflow: what it writes becomes artifacts of that same
MLflow run (``export/hf``, ``export/gguf``), said in one line. Oracle: MLflow's own client
listing the run's artifacts, each file byte-identical to the exported one. Without the mlflow
package the export works and says nothing of MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradtune.cli import main
from gradtune.telemetry import mlflow_sink, trackers

TEXT = "the quick brown fox jumps over the lazy dog. " * 40
GPT = ["model=gpt", "gpt.n_layer=1", "gpt.n_embd=32", "gpt.n_head=2", "gpt.block_size=32", "gpt.family=llama"]
GPT += ["text.tokenizer=byte", "batch_size=4", "max_steps=3", "val_fraction=0", "progress=off", "plot=false"]


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)


def _run(tmp_path: Path, *extra: str) -> Path:
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "run"
    assert main(["train", *GPT, f"data={data}", f"out_dir={out}", *extra]) == 0
    return out


def test_the_hf_export_becomes_artifacts_of_the_runs_mlflow_run(tmp_path, capsys):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("transformers")
    out = _run(tmp_path, "log_to=[mlflow]")
    run_id = json.loads((out / "summary.json").read_text())["job"]["trackers"]["mlflow"]["run_id"]
    capsys.readouterr()
    hf = tmp_path / "hf"
    assert main(["export", str(out), "--hf", str(hf)]) == 0
    said = capsys.readouterr().out.strip().splitlines()
    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    assert said[-1] == f"mlflow: export/hf logged as artifacts of run {run_id} in {uri}", said
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "export"}
    listed = {Path(a.path).name for a in client.list_artifacts(run_id, "export/hf")}
    exported = {p.name for p in hf.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= exported and listed == exported
    local = Path(client.download_artifacts(run_id, "export/hf", str(tmp_path / "back")))
    assert all((local / name).read_bytes() == (hf / name).read_bytes() for name in exported)
    assert client.get_run(run_id).info.status == "FINISHED"  # the run's own end, untouched by the export
    # a file export (GGUF and its Modelfile) goes the same way, under export/gguf
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF-bytes")
    line = mlflow_sink.log_export({"run_id": run_id, "tracking_uri": uri}, [("gguf", gguf)])
    assert line == f"mlflow: export/gguf logged as artifacts of run {run_id} in {uri}"
    assert [a.path for a in client.list_artifacts(run_id, "export/gguf")] == ["export/gguf/m.gguf"]
    # a store that is gone: one warning, no new empty database
    gone = {"run_id": run_id, "tracking_uri": f"sqlite:///{tmp_path / 'moved' / 'mlflow.db'}"}
    assert mlflow_sink.log_export(gone, [("gguf", gguf)]) is None
    assert "is gone" in capsys.readouterr().err and not (tmp_path / "moved").exists()


def test_without_mlflow_the_export_says_nothing_of_it(tmp_path, capsys, monkeypatch):
    """A run whose summary names an MLflow run, exported where mlflow is not installed."""
    out = _run(tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    summary["job"]["trackers"] = {"mlflow": {"run_id": "abc", "tracking_uri": f"sqlite:///{out / 'mlflow.db'}"}}
    (out / "summary.json").write_text(json.dumps(summary))
    real = trackers.installed
    monkeypatch.setattr(mlflow_sink, "installed", lambda m: False if m == "mlflow" else real(m))
    capsys.readouterr()
    assert main(["export", str(out), "--hf", str(tmp_path / "hf")]) == 0
    got = capsys.readouterr()
    assert not [line for line in got.out.splitlines() if line.startswith("mlflow")] and "MLflow" not in got.err
    assert (tmp_path / "hf" / "config.json").is_file()
    assert not (out / "mlflow.db").exists()
