"""fp16's dynamic loss scale (loop/loss_scale.py) against torch.amp.GradScaler.

On CPU the loop computes in fp32 under the test hook GRADTUNE_TEST_FP16 (runtime/testhooks.py)
and overflows are forced with the ``grads@N=INF`` fault: the scaler's skips, scale sequence,
checkpointed state and its relation to the divergence guard are those of a GPU run."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gradtune.config import load_config
from gradtune.data.sampler import make_sampler
from gradtune.jobs.registry import build
from gradtune.loop import gradient, loss_scale
from gradtune.loop.components import Events
from gradtune.loop.fit import fit
from gradtune.loop.loss_scale import DynamicScale, LossScaler
from gradtune.runtime import testhooks
from gradtune.runtime.device import cpu_threads
from gradtune.runtime.errors import GradtuneError
from gradtune.state import checkpoint
from gradtune.train import train

INF_STEPS = {2, 3, 7, 12}  # 1-based steps whose gradients overflow


def _data(n=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3


@pytest.mark.parametrize("growth", [3, 2000])
def test_the_scale_sequence_and_skips_equal_grad_scalers(growth):
    """The same model, data and injected overflows: DynamicScale driving an SGD step equals
    GradScaler driving torch.optim.SGD, scale for scale and weight for weight."""
    x, y = _data()
    torch.manual_seed(0)
    ours, ref = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    ref.load_state_dict(ours.state_dict())
    opt_a, opt_b = torch.optim.SGD(ours.parameters(), lr=0.05), torch.optim.SGD(ref.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", growth_interval=growth)
    mine = DynamicScale(growth_interval=growth)
    for step in range(1, 16):
        for m in (ours, ref):
            m.zero_grad()
        (((ours(x).squeeze(1) - y) ** 2).sum() * mine.scale).backward()
        scaler.scale(((ref(x).squeeze(1) - y) ** 2).sum()).backward()
        if step in INF_STEPS:
            for m in (ours, ref):
                m.weight.grad[0, 1] = float("inf")
        grads = [p.grad for p in ours.parameters()]
        torch._foreach_mul_(grads, 1.0 / mine.scale)
        found = not gradient.all_finite(grads)
        if not found:
            opt_a.step()
        mine.update(found)
        scaler.step(opt_b)
        scaler.update()
        assert mine.scale == scaler.get_scale(), step
        for p, q in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(p, q), step
    assert mine.overflows == len(INF_STEPS)


def test_growth_stops_where_float32_ends():
    s = DynamicScale(init=2.0**127, growth_interval=1)
    assert s.update(False) == 2.0**127  # 2**128 is inf in float32: kept, as GradScaler keeps it
    assert s.clean == 0


def test_all_finite_sees_inf_and_nan_on_both_paths():
    finite = [torch.ones(5), torch.full((2, 2), 3e38)]  # a sum of squares would overflow float32
    assert gradient.all_finite(finite)
    assert gradient.all_finite([t.double() for t in finite]) is True
    for bad in (float("inf"), float("nan")):
        t = torch.ones(7)
        t[3] = bad
        assert not gradient.all_finite([torch.ones(2), t])
        assert not gradient.all_finite([torch.ones(2).double(), t.double()])


class _View:
    def __init__(self):
        self.step, self.rows = 4, []
        self.log = type("Log", (), {"write": lambda _, row: self.rows.append(row)})()


def test_the_component_on_synthetic_events():
    c = LossScaler(init=4.0, growth_interval=2)
    c.attach(_View())
    ev = Events([c])
    assert ev.loss_scale() == 4.0
    assert ev.hold_update([torch.ones(3), torch.tensor([float("nan")])]) is True
    assert c.view.rows == [{"kind": "overflow", "step": 5, "scale": 2.0}] and c.on_step_end(5, 0.0, 0.1) is None
    assert ev.hold_update([torch.ones(3)]) is False and ev.hold_update([torch.ones(3)]) is False
    assert ev.loss_scale() == 4.0  # two clean steps: doubled
    saved = json.loads(json.dumps(c.state_dict()))
    for _ in range(3):
        ev.hold_update([torch.tensor([float("inf")])])
    assert c.s.scale == 0.5 and c.on_step_end(8, 0.0, 0.1).startswith("diverged: non-finite gradients")
    c.load_state_dict(saved)
    assert c.state_dict() == {"scale": 4.0, "clean": 0, "overflows": 1}
    assert Events([]).loss_scale() == 1.0 and Events([]).hold_update([torch.tensor([float("inf")])]) is False


# --- the loop with the scaler ------------------------------------------------------------------


@pytest.fixture
def fp16(monkeypatch):
    monkeypatch.setenv(testhooks.FP16_ENV, "1")
    yield
    testhooks.configure("")


def _cfg(out: Path, *extra: str):
    return load_config(
        None,
        [
            "model=linear",
            "lr=0.05",
            "momentum=0",
            "batch_size=full",
            "max_steps=14",
            "eval_every=7",
            "progress=off",
            "plot=false",
            "precision=fp16",
            "device=cpu",
            f"out_dir={out}",
            *extra,
        ],
    )


def _faults(steps, extra=""):
    testhooks.configure(",".join([f"grads@{s}=INF" for s in sorted(steps)] + ([extra] if extra else [])))


def _rows(out: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows if r["kind"] == kind]


def _grad_scaler_steps(job, model, opt, scaler, sampler, scales):
    """14 steps as the GradScaler recipe takes them, the loss sum's gradient divided by the count."""
    for step in range(1, 15):
        opt.zero_grad()
        (idx,) = next(sampler).micro
        out = job.objective(model, job.train.get(idx))
        scaler.scale(out.loss_sum).backward()
        if step in INF_STEPS:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        scaler.unscale_(opt)
        torch._foreach_mul_([p.grad for p in model.parameters()], 1.0 / float(out.count))
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())


def test_overflowed_steps_are_skipped_as_grad_scaler_skips_them(fp16, tmp_path, monkeypatch):
    """Oracle: torch.amp.GradScaler driving torch.optim.SGD on the same model and full batch with
    the same steps' gradients made inf: the same final weights and scale."""
    monkeypatch.setattr(loss_scale, "GROWTH_INTERVAL", 3)
    cfg = _cfg(tmp_path / "run")
    job = build(cfg)  # the same seed: train() builds the same initial weights
    ref = {k: v.clone() for k, v in job.model.state_dict().items()}
    _faults(INF_STEPS)
    r = train(cfg)
    assert r.steps == 14  # overflowed steps count
    rows = _rows(tmp_path / "run", "overflow")
    assert [row["step"] for row in rows] == sorted(INF_STEPS)
    assert r.info["loss_scale"]["overflow_steps"] == len(INF_STEPS)
    assert not _rows(tmp_path / "run", "guard")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["job"]["loss_scale"]["overflow_steps"] == len(INF_STEPS)

    model = build(cfg).model
    model.load_state_dict(ref)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", growth_interval=3)
    sampler = make_sampler(job, cfg)  # the loop's batches, in its order
    scales = []
    with cpu_threads(model, torch.device("cpu")):  # the loop's thread count: the same matmul sums
        _grad_scaler_steps(job, model, opt, scaler, sampler, scales)
    assert [row["scale"] for row in rows] == [scales[s - 1] for s in sorted(INF_STEPS)]
    assert r.info["loss_scale"]["final_scale"] == scales[-1]
    final = load_file(tmp_path / "run" / "model.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(final[k], v), k  # one division by count * scale == unscale, then / count


def test_without_overflows_the_scale_changes_no_bit(fp16, tmp_path):
    """Scaling by a power of two and dividing it out is exact: on CPU (fp32 compute) an fp16 run
    with no overflow is the fp32 run bit for bit, micro-batches and the noise scale's first
    micro-batch norm included."""
    found = {}
    for prec in ("fp32", "fp16"):
        out = tmp_path / prec
        cfg = load_config(
            None,
            ["model=mlp", "hidden=[6]", "lr=0.05", "batch_size=32", "micro_batch_size=8", "noise_scale=true"]
            + ["max_steps=24", "eval_every=8", "progress=off", "plot=false", f"precision={prec}", f"out_dir={out}"],
        )
        job = build(cfg)
        fit(job, cfg, out)
        evals = [{k: v for k, v in r.items() if k not in ("lr",)} for r in _rows(out, "eval")]
        found[prec] = (evals, {k: v.clone() for k, v in job.model.state_dict().items()})
    assert found["fp16"][0] == found["fp32"][0] and "noise_scale" in found["fp16"][0][-1]
    assert all(torch.equal(found["fp16"][1][k], v) for k, v in found["fp32"][1].items())


def test_kill_and_resume_with_the_scaler_is_bitwise(fp16, tmp_path, monkeypatch):
    monkeypatch.setattr(loss_scale, "GROWTH_INTERVAL", 3)
    whole = _cfg(tmp_path / "whole", "checkpoint_every=1")
    _faults({2, 4})
    fit(build(whole), whole, tmp_path / "whole")
    cut = _cfg(tmp_path / "cut", "checkpoint_every=1")
    _faults({2, 4}, "step.begin@7=RAISE")  # dies starting step 7 (6 steps done, scale grown back)
    with pytest.raises(RuntimeError, match="injected fault"):
        fit(build(cut), cut, tmp_path / "cut")
    testhooks.configure("")
    fit(build(cut), cut, tmp_path / "cut")
    a, b = (checkpoint.root(tmp_path / d) for d in ("whole", "cut"))
    sa, sb = (json.loads((r / checkpoint.folder_name(14) / "state.json").read_text()) for r in (a, b))
    assert sa["loss_scale"] == sb["loss_scale"] == {"scale": 2.0**17, "clean": 1, "overflows": 2}
    wa, wb = (load_file(r / checkpoint.folder_name(14) / "model.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _rows(tmp_path / "whole", "overflow") == _rows(tmp_path / "cut", "overflow")


def test_the_guard_still_stops_a_diverging_fp16_run(fp16, tmp_path):
    """lr far too high: the loss goes inf; the fp16 run stops as the fp32 run does, with the
    guard's message, and its non-finite-loss steps are the guard's, not overflows."""
    found = {}
    for prec in ("fp32", "fp16"):
        out = tmp_path / prec
        cfg = load_config(
            None,
            ["model=mlp", "hidden=[6]", "lr=1e3", "batch_size=4", "max_steps=200", "eval_every=1000", "progress=off"]
            + ["plot=false", "device=cpu", f"precision={prec}", f"out_dir={out}"],
        )
        r = fit(build(cfg), cfg, out)
        found[prec] = (r.stop_reason, r.steps, len(_rows(out, "guard")))
        assert not _rows(out, "overflow")
    assert found["fp16"] == found["fp32"]
    assert found["fp16"][0].startswith("diverged: non-finite loss inf") and found["fp16"][2] > 10


def test_overflows_all_the_way_down_are_divergence(fp16, tmp_path):
    _faults(range(1, 18))  # 65536 halved 17 times: 0.5
    cfg = _cfg(tmp_path / "run", "max_steps=30")
    r = fit(build(cfg), cfg, tmp_path / "run")
    assert r.steps == 17 and r.stop_reason.startswith("diverged: non-finite gradients even at loss scale 0.5")


def test_fp16_off_a_gpu_is_refused_without_the_hook(tmp_path):
    cfg = _cfg(tmp_path / "run")
    with pytest.raises(GradtuneError, match="precision=fp16 needs a CUDA GPU"):
        fit(build(cfg), cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
