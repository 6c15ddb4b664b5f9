"""Batch / stochastic / mini-batch GD as one setting, and exact gradient accumulation."""

import contextlib

import pytest
import torch

from gradtune.config import load_config
from gradtune.data.dataset import TensorDataset
from gradtune.data.sampler import Sampler
from gradtune.jobs.registry import build
from gradtune.loop.gradient import accumulate
from gradtune.models.mlp import MLP
from gradtune.objectives.classification import Classification
from gradtune.objectives.regression import Regression

CPU = torch.device("cpu")


def test_full_batch_is_every_sample_each_step():
    s = Sampler(10, "full", micro_batch_size=3)
    step = next(s)
    assert torch.equal(torch.cat(step.micro), torch.arange(10))
    assert [len(m) for m in step.micro] == [3, 3, 3, 1] and step.epoch_end


def test_sgd_reshuffles_every_epoch_and_sees_each_sample_once():
    s = Sampler(7, 1, seed=3)
    epoch0 = [next(s).micro[0].item() for _ in range(7)]
    epoch1 = [next(s).micro[0].item() for _ in range(7)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(7))
    assert epoch0 != epoch1


def test_minibatch_last_batch_is_short_and_resume_position_is_exact():
    s = Sampler(10, 4, seed=1)
    steps = [next(s) for _ in range(5)]
    assert [sum(len(m) for m in st.micro) for st in steps[:3]] == [4, 4, 2]
    r = Sampler(10, 4, seed=1)
    r.load_state({"epoch": 1, "index": 4})
    assert torch.equal(next(r).micro[0], steps[4].micro[0])


def _grads(model, objective, data, micro):
    model.zero_grad(set_to_none=True)
    loss_sum, count, _ = accumulate(model, objective, data, micro, CPU, contextlib.nullcontext())
    return [p.grad / count for p in model.parameters()], loss_sum / count


def _rel(a, b):
    num = torch.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b)))
    return (num / torch.sqrt(sum((y**2).sum() for y in b))).item()


def test_full_batch_micro_7_equals_one_shot_on_diabetes():
    cfg = load_config(None, ["model=mlp", "batch_size=full", "micro_batch_size=7", "progress=off"])
    job = build(cfg)
    idx = torch.arange(len(job.train))
    one, l1 = _grads(job.model, job.objective, job.train, [idx])
    step = next(Sampler(len(job.train), "full", 7))
    acc, l2 = _grads(job.model, job.objective, job.train, step.micro)
    assert len(step.micro) > 40
    assert _rel(acc, one) < 1e-6 and abs((l2 - l1) / l1) < 1e-6


@pytest.mark.parametrize("kind", ["mse", "cross_entropy"])
def test_minibatch_accumulation_equals_one_shot(kind):
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    if kind == "mse":
        data, objective, out = TensorDataset(x=x, y=torch.randn(64)), Regression("mse"), 1
    else:
        data, objective, out = TensorDataset(x=x, y=torch.randint(0, 3, (64,))), Classification(), 3
    model = MLP(6, [8], out)
    batch = torch.randperm(64)[:24]
    one, _ = _grads(model, objective, data, [batch])
    acc, _ = _grads(model, objective, data, list(batch.split(5)))  # 5+5+5+5+4: uneven split
    assert _rel(acc, one) < 1e-6


def test_mean_of_micro_means_would_be_wrong():
    """Negative control: averaging per-micro-batch means (a common bug) differs on uneven splits."""
    torch.manual_seed(0)
    data, objective = TensorDataset(x=torch.randn(12, 3), y=torch.randn(12)), Regression("mse")
    model = MLP(3, [4], 1)
    one, _ = _grads(model, objective, data, [torch.arange(12)])
    model.zero_grad()
    parts = list(torch.arange(12).split(5))  # 5, 5, 2
    for p in parts:
        out = objective(model, data.get(p))
        (out.loss_sum / out.count / len(parts)).backward()
    assert _rel([p.grad for p in model.parameters()], one) > 1e-3


def test_length_grouping_cuts_padding_keeps_every_sample_once_and_resumes():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 49, (203,), generator=g)
    plain = Sampler(203, 16, seed=5)
    grouped = Sampler(203, 16, seed=5, lengths=lengths, pool=4)
    pad = {}
    for name, s in (("plain", plain), ("grouped", grouped)):
        steps = [next(s) for _ in range(13)]  # one epoch: 12 full batches + 11 left over
        ids = torch.cat([torch.cat(st.micro) for st in steps])
        assert sorted(ids.tolist()) == list(range(203))  # each sample exactly once
        assert [len(st.micro[0]) for st in steps][-1] == 11 and steps[-1].epoch_end  # short one last
        pad[name] = sum(
            int(lengths[st.micro[0]].max()) * len(st.micro[0]) - int(lengths[st.micro[0]].sum()) for st in steps
        )
    assert pad["grouped"] < 0.5 * pad["plain"]
    # The order is a pure function of (seed, epoch, lengths): a resumed sampler continues exactly.
    r = Sampler(203, 16, seed=5, lengths=lengths, pool=4)
    r.load_state({"epoch": 1, "index": 32})
    third = [next(grouped) for _ in range(3)][-1]  # epoch 1, index 32
    assert torch.equal(next(r).micro[0], third.micro[0])
    assert r.order_digest() == grouped.order_digest()
    assert Sampler(203, 16, seed=5).order_digest() != Sampler(203, 16, seed=5, lengths=lengths, pool=4).order_digest()


def test_text_jobs_group_by_length_unless_switched_off():
    from types import SimpleNamespace

    from gradtune.data.sampler import make_sampler
    from gradtune.data.sequences import SequenceDataset

    data = SequenceDataset([[1] * n for n in (3, 9, 4, 12)], torch.tensor([0, 1, 0, 1]), 0)
    assert torch.equal(data.lengths, torch.tensor([3, 9, 4, 12]))
    job = SimpleNamespace(train=data)
    assert make_sampler(job, load_config(None, ["batch_size=2"])).pool == 8
    assert make_sampler(job, load_config(None, ["batch_size=2", "text.group_by_length=false"])).lengths is None
    assert make_sampler(SimpleNamespace(train=TensorDataset(x=torch.zeros(4, 1))), load_config(None, [])).pool == 0
