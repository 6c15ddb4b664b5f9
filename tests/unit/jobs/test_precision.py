"""precision: auto — skipped for tiny / float64 models, probed on the model's own step
otherwise (the model left exactly as it was), cached per machine and model shape."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gradtune.config import load_config
from gradtune.data.dataset import TensorDataset
from gradtune.jobs import precision
from gradtune.jobs.job import Job
from gradtune.objectives.regression import Regression


def job_of(model: nn.Module) -> Job:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(x=torch.randn(16, 64, generator=g), y=torch.randn(16, generator=g))
    return Job(model, Regression(), data, None, "regression", {})


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 1), nn.Flatten(0))


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADTUNE_CACHE", str(tmp_path))
    return tmp_path


def test_tiny_and_float64_models_take_fp32_without_a_probe(cache_root, monkeypatch):
    monkeypatch.setattr(precision, "measure", lambda *a: pytest.fail("probed"))
    cfg = load_config(None, ["precision=auto"])
    job = job_of(model())
    assert precision.resolve(job, cfg).precision == "fp32" and "too small" in job.info["precision"]["why"]
    monkeypatch.setattr(precision, "TINY_PARAMS", 0)
    assert precision.resolve(job, load_config(None, ["precision=auto", "dtype=float64"])).precision == "fp32"
    assert precision.resolve(job, load_config(None, ["precision=bf16"])).precision == "bf16"  # not auto: as given
    assert not (cache_root / "precision.json").exists()


@pytest.mark.parametrize("fp32,bf16,want", [(1.0, 0.5, "bf16"), (1.0, 0.95, "fp32"), (1.0, 1.3, "fp32")])
def test_the_faster_precision_wins_and_the_answer_is_cached(cache_root, monkeypatch, fp32, bf16, want):
    monkeypatch.setattr(precision, "TINY_PARAMS", 0)
    monkeypatch.setattr(precision, "bf16_supported", lambda d: True)
    monkeypatch.setattr(precision, "measure", lambda *a: (fp32, bf16))
    monkeypatch.setattr(precision, "busy_cpu", lambda d: "")
    cfg, job = load_config(None, ["precision=auto", "epochs=300"]), job_of(model())
    assert precision.resolve(job, cfg).precision == want
    assert job.info["precision"]["ratio"] == pytest.approx(fp32 / bf16, abs=1e-3)
    saved = json.loads((cache_root / "precision.json").read_text())
    assert [v["precision"] for v in saved.values()] == [want]
    monkeypatch.setattr(precision, "measure", lambda *a: pytest.fail("probed again"))
    again = job_of(model())
    assert precision.resolve(again, cfg).precision == want and again.info["precision"]["why"] == "cached probe"
    other = job_of(nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 1), nn.Flatten(0)))  # another shape: probe
    with pytest.raises(pytest.fail.Exception):
        precision.resolve(other, cfg)


def test_the_probe_leaves_weights_buffers_gradients_and_rng_as_they_were():
    job = job_of(model())
    before = {k: v.clone() for k, v in job.model.state_dict().items()}
    rng = torch.random.get_rng_state()
    fp32, bf16 = precision.measure(job, precision.probe_batch(job, load_config(None, [])), torch.device("cpu"))
    assert fp32 > 0 and bf16 > 0
    after = job.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # batch-norm statistics included
    assert all(p.grad is None for p in job.model.parameters())
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_a_resumed_run_keeps_its_checkpoints_precision(tmp_path):
    from gradtune.state import checkpoint
    from gradtune.train import saved_precision

    assert saved_precision(tmp_path / "new") is None
    root = checkpoint.root(tmp_path)
    for step, prec in ((4, "fp32"), (8, "bf16")):
        folder = root / checkpoint.folder_name(step)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"hash": "x", "config": {"precision": prec}}))
    assert saved_precision(tmp_path) == "bf16"  # the newest
    (root / checkpoint.folder_name(12)).mkdir()  # unreadable: skipped
    assert saved_precision(tmp_path) == "bf16"


def test_a_run_too_short_to_gain_keeps_fp32_without_a_probe(cache_root, monkeypatch):
    monkeypatch.setattr(precision, "TINY_PARAMS", 0)
    monkeypatch.setattr(precision, "bf16_supported", lambda d: True)
    monkeypatch.setattr(precision, "measure", lambda *a: pytest.fail("probed"))
    job = job_of(model())  # 16 samples, batch 32: one step an epoch
    cfg = load_config(None, ["precision=auto", f"epochs={precision.MIN_RUN_STEPS - 1}"])
    assert precision.resolve(job, cfg).precision == "fp32"
    assert "199-step run is too short for a probe" in job.info["precision"]["why"]
    monkeypatch.setattr(precision, "measure", lambda *a: (1.0, 0.5))
    monkeypatch.setattr(precision, "busy_cpu", lambda d: "")
    for long_run in (["epochs=1000"], ["epochs=1", "max_time=10m"]):  # a max_time run is probed
        assert precision.resolve(job_of(model()), load_config(None, ["precision=auto", *long_run])).precision == "bf16"


def test_a_busy_probe_is_reused_while_busy_and_replaced_when_quiet(cache_root, monkeypatch):
    monkeypatch.setattr(precision, "TINY_PARAMS", 0)
    monkeypatch.setattr(precision, "bf16_supported", lambda d: True)
    cfg = load_config(None, ["precision=auto", "epochs=300"])
    monkeypatch.setattr(precision, "busy_cpu", lambda d: "load 9.0 on 2 cores")
    monkeypatch.setattr(precision, "measure", lambda *a: (1.0, 1.2))  # busy: bf16 looked slower
    job = job_of(model())
    assert precision.resolve(job, cfg).precision == "fp32" and "probed again when quiet" in job.info["precision"]["why"]
    monkeypatch.setattr(precision, "measure", lambda *a: pytest.fail("probed again while busy"))
    again = job_of(model())
    assert precision.resolve(again, cfg).precision == "fp32"
    assert "cached probe taken on a busy machine" in again.info["precision"]["why"]
    monkeypatch.setattr(precision, "busy_cpu", lambda d: "")  # quiet now: probe, and keep the quiet answer
    monkeypatch.setattr(precision, "measure", lambda *a: (1.0, 0.6))
    quiet = job_of(model())
    assert precision.resolve(quiet, cfg).precision == "bf16"
    saved = json.loads((cache_root / "precision.json").read_text())
    assert [(v["precision"], "busy" in v) for v in saved.values()] == [("bf16", False)]
    monkeypatch.setattr(precision, "busy_cpu", lambda d: "load 9.0 on 2 cores")  # busy again: the quiet one holds
    monkeypatch.setattr(precision, "measure", lambda *a: pytest.fail("probed again"))
    last = job_of(model())
    assert precision.resolve(last, cfg).precision == "bf16" and last.info["precision"]["why"] == "cached probe"


def test_auto_weighs_fp16_on_a_gpu_without_bf16(cache_root, monkeypatch):
    """A CUDA GPU without bf16 (before Ampere): fp16 (loss-scaled) in bf16's place; a CPU without
    bf16 stays fp32 (no fp16 there)."""
    monkeypatch.setattr(precision, "TINY_PARAMS", 0)
    monkeypatch.setattr(precision, "bf16_supported", lambda d: False)
    monkeypatch.setattr(precision, "_device_name", lambda d: "Tesla T4")
    seen = []
    monkeypatch.setattr(precision, "measure", lambda job, batch, device, low: seen.append(low) or (1.0, 0.5))
    cfg = load_config(None, ["precision=auto", "epochs=300"])
    job = job_of(model())
    assert precision.decide(job, cfg, torch.device("cuda"))["precision"] == "fp16" and seen == ["fp16"]
    assert precision.decide(job, cfg, torch.device("cuda"))["precision"] == "fp16"  # cached
    assert precision.decide(job, cfg, torch.device("cpu"))["precision"] == "fp32"
    monkeypatch.setattr(precision.distributed, "launched", lambda: True)
    assert precision.decide(job_of(nn.Linear(3, 2)), cfg, torch.device("cuda"))["precision"] == "fp16"


@pytest.mark.parametrize("half_s,want", [(0.5, "fp16"), (0.95, "fp32")])
def test_the_start_up_line_names_the_precision_it_weighed(cache_root, monkeypatch, capsys, half_s, want):
    """On a CUDA GPU without bf16 the probe times fp16 against fp32: the line says fp16, never bf16
    (the probe and the device mocked: no GPU here)."""
    monkeypatch.setattr(precision, "TINY_PARAMS", 0)
    monkeypatch.setattr(precision, "bf16_supported", lambda d: False)
    monkeypatch.setattr(precision, "_device_name", lambda d: "Tesla T4")
    monkeypatch.setattr(precision, "measure", lambda job, batch, device, low: (1.0, half_s))
    cfg = load_config(None, ["precision=auto", "epochs=300"])
    job = job_of(model())
    assert precision.resolve(job, cfg, torch.device("cuda")).precision == want
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"precision auto: {want} (probe ") and "bf16" not in line, line
    assert line.endswith(f", fp16 step {1.0 / half_s:.2f}x as fast as fp32)"), line
    assert job.info["precision"]["half"] == "fp16"
    precision.resolve(job_of(model()), cfg, torch.device("cuda"))  # cached: the same words
    assert f"cached probe, fp16 step {1.0 / half_s:.2f}x" in capsys.readouterr().out
    monkeypatch.setattr(precision, "TINY_PARAMS", 10**9)
    precision.resolve(job_of(model()), cfg, torch.device("cuda"))
    assert "too small for fp16 to pay" in capsys.readouterr().out


def test_the_start_up_line_on_a_bf16_device_names_bf16(cache_root, monkeypatch, capsys):
    monkeypatch.setattr(precision, "TINY_PARAMS", 0)
    monkeypatch.setattr(precision, "bf16_supported", lambda d: True)
    monkeypatch.setattr(precision, "busy_cpu", lambda d: "")
    monkeypatch.setattr(precision, "measure", lambda job, batch, device, low: (1.0, 0.7))
    precision.resolve(job_of(model()), load_config(None, ["precision=auto", "epochs=300"]), torch.device("cpu"))
    assert capsys.readouterr().out.strip().endswith("bf16 step 1.43x as fast as fp32)")


def test_a_probe_that_got_little_cpu_is_marked_busy_though_the_load_looked_low(cache_root, monkeypatch):
    """The load average lags by a minute: a neighbour starting with the probe leaves it low while
    the probe's threads wait for the cores. The probe's own CPU share catches it (here: a probe
    that got no CPU in its 0.2 s), and the answer is kept as a busy one, replaced by the next
    quiet probe. The probe's clocks are faked: real ones would depend on the suite's own load."""
    clock = SimpleNamespace(wall=0.0, cpu=0.0)
    fake_time = SimpleNamespace(perf_counter=lambda: clock.wall, process_time=lambda: clock.cpu)
    monkeypatch.setattr(precision, "time", fake_time)

    def probe(cpu_s: float, ratio: tuple[float, float]):
        def measure(*a):
            clock.wall, clock.cpu = clock.wall + 0.2, clock.cpu + cpu_s
            return ratio

        return measure

    monkeypatch.setattr(precision, "TINY_PARAMS", 0)
    monkeypatch.setattr(precision, "bf16_supported", lambda d: True)
    monkeypatch.setattr(precision, "busy_cpu", lambda d: "")
    monkeypatch.setattr(precision.torch, "get_num_threads", lambda: 1)
    cfg = load_config(None, ["precision=auto", "epochs=300"])
    monkeypatch.setattr(precision, "measure", probe(0.0, (1.0, 2.0)))  # no CPU: bf16 looked slower
    job = job_of(model())
    assert precision.resolve(job, cfg).precision == "fp32"
    assert "the probe ran 0% of the time" in job.info["precision"]["why"], job.info["precision"]
    saved = json.loads((cache_root / "precision.json").read_text())
    assert [("busy" in v, v["cpu_share"] < 0.1) for v in saved.values()] == [(True, True)]

    monkeypatch.setattr(precision, "measure", probe(0.2, (1.0, 0.6)))  # quiet: its one thread ran throughout
    quiet = job_of(model())
    assert precision.resolve(quiet, cfg).precision == "bf16", quiet.info["precision"]
    saved = json.loads((cache_root / "precision.json").read_text())
    assert [("busy" in v, v["cpu_share"] > 0.8) for v in saved.values()] == [(False, True)]
