"""batch_ramp_steps: the sizes, the steps an epochs budget takes, the loop's mean gradient over the
step's actual samples (oracle: torch.optim.SGD on the mean loss of the same samples) and max_time's
pricing of a small step (loop/budget.py)."""

import copy
from collections import Counter

import pytest
import torch

from gradtune.config import load_config
from gradtune.data.batch_ramp import BatchRamp
from gradtune.data.sampler import Sampler
from gradtune.jobs.registry import build
from gradtune.loop import budget
from gradtune.loop.fit import fit
from tests import hooks

BASE = ["model=linear", "data=diabetes", "dtype=float64", "val_fraction=0", "progress=off", "plot=false"]


def test_sizes_grow_linearly_from_start_to_batch_in_integers():
    r = BatchRamp.create(2, 6, 8)
    assert [r.size(t) for t in range(9)] == [2, 3, 4, 5, 6, 7, 8, 8, 8]
    r = BatchRamp.create(1, 10, 4)
    sizes = [r.size(t) for t in range(12)]
    assert sizes == [1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4]  # 1 + 3t // 10
    assert all(isinstance(s, int) for s in sizes)
    assert BatchRamp.create(8, 10, 8) is None and BatchRamp.create(2, 0, 8) is None  # nothing to ramp


def test_samples_and_full_steps_count_the_sizes():
    r = BatchRamp.create(3, 7, 10)
    for k in range(20):
        assert r.samples(k) == sum(r.size(t) for t in range(k))
    assert r.full_steps(2, 15) == sum(r.size(t) for t in range(2, 15)) / 10
    assert r.full_steps(9, 12) == 3.0  # after the ramp a step is a full one
    long = BatchRamp.create(3, 100_003, 4096)  # the closed form (a floor sum) against the plain sum
    for k in (1, 777, 100_003, 100_010):
        assert long.samples(k) == sum(long.size(t) for t in range(k))


# (samples, epochs, ramp start, ramp steps, batch): ramps ending inside the first epoch and spanning several
EPOCHS = [(50, 3, 2, 10, 8), (20, 4, 1, 40, 7), (9, 2, 1, 3, 9), (100, 5, 1, 60, 4)]


@pytest.mark.parametrize("n,epochs,start,steps,batch", EPOCHS)
def test_total_steps_is_what_the_sampler_takes_and_each_epoch_sees_every_sample_once(n, epochs, start, steps, batch):
    s = Sampler(n, batch, seed=5)
    s.ramp = BatchRamp.create(start, steps, batch)
    seen: list[list[int]] = [[] for _ in range(epochs)]
    step = 0
    while s.epoch < epochs:
        drawn = s.draw(step)
        seen[drawn.epoch] += torch.cat(drawn.micro).tolist()
        if not drawn.epoch_end:  # a short epoch-end batch aside, each step has the ramp's size
            assert sum(len(m) for m in drawn.micro) == s.ramp.size(step)
        step += 1
    assert s.total_steps(epochs) == step
    assert all(sorted(ids) == list(range(n)) for ids in seen)


def test_the_step_is_the_mean_over_its_own_samples(tmp_path, monkeypatch):
    """Ramped steps split into micro-batches of 5: the update equals torch.optim.SGD on the plain
    mean loss of exactly the samples the probe says each step trained on."""
    monkeypatch.setenv(hooks.PROBE, str(tmp_path / "probe"))
    args = ["batch_size=16", "micro_batch_size=5", "batch_ramp_steps=8", "batch_ramp_start=2", "max_steps=12"]
    cfg = load_config(None, BASE + args + ["lr=0.1", "momentum=0.5", f"out_dir={tmp_path / 'run'}"])
    job = build(cfg)
    oracle = copy.deepcopy(job.model)
    fit(job, cfg, tmp_path / "run")
    probe = hooks.probe_steps(tmp_path / "probe")
    ramp = BatchRamp.create(2, 8, 16)
    assert [len(probe[k]) for k in sorted(probe)] == [ramp.size(t) for t in range(12)]
    opt = torch.optim.SGD(oracle.parameters(), lr=0.1, momentum=0.5)
    for k in sorted(probe):
        batch = job.train.get(torch.tensor(probe[k]))
        out = job.objective(oracle, batch)
        opt.zero_grad()
        (out.loss_sum / out.count).backward()
        opt.step()
    for a, b in zip(job.model.state_dict().values(), oracle.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_an_epochs_budget_with_a_ramp_makes_exactly_those_passes(tmp_path, monkeypatch):
    monkeypatch.setenv(hooks.PROBE, str(tmp_path / "probe"))
    cfg = load_config(None, BASE + ["batch_size=32", "batch_ramp_steps=15", "batch_ramp_start=1", "epochs=2"])
    job = build(cfg)
    result = fit(job, cfg, tmp_path / "run")
    counts = Counter(i for ids in hooks.probe_steps(tmp_path / "probe").values() for i in ids)
    assert set(counts.values()) == {2} and len(counts) == len(job.train)
    assert result.epochs == 2.0


def test_max_time_prices_a_ramped_step_at_its_share_of_a_full_batch():
    ramp = BatchRamp.create(1, 8, 4)  # sizes 1,1,1,2,2,2,3,3: 15 samples, then 4 a step
    plain = budget.plan_steps(0, 1000, 10.0, 1.0, 0.0, 0.0, 10**6, 10**6, 0)
    ramped = budget.plan_steps(0, 1000, 10.0, 1.0, 0.0, 0.0, 10**6, 10**6, 0, ramp)
    assert plain == 10 and ramped == 14  # 15 + 6 x 4 = 39 samples <= 10 full steps' 40
    tb = budget.TimeBudget.create("1h", None, 1000)
    tb.ramp = ramp
    tb.observe(tb.skip + 1, 0.5)  # step skip (size 1 of 4) took 0.5 s: a full step's 2 s
    assert tb.times == [0.5 * 4 / ramp.size(tb.skip)]
