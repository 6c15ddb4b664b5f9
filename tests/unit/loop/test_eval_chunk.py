"""The evaluation chunk chosen from memory (loop/eval_chunk.py): within its budget, counted
exactly, and evaluation sums that do not depend on it."""

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from gradtune.data.dataset import TensorDataset
from gradtune.data.text import TextWindows
from gradtune.jobs.job import Job
from gradtune.loop import eval_chunk
from gradtune.loop.eval_chunk import CPU_CHUNK_BYTES, LiveBytes, Probe, choose, for_training, probe, room_in_training
from gradtune.loop.evaluation import evaluate
from gradtune.models.gpt import GPT, GPTConfig
from gradtune.objectives.causal_lm import CausalLM
from gradtune.objectives.classification import Classification
from gradtune.objectives.regression import Regression

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object only: nothing runs on it
AMP = contextlib.nullcontext()


@pytest.mark.parametrize("fixed,per", [(0, 1000), (5000, 1000), (123_456, 7_777), (10, 3 << 20)])
def test_the_chunk_is_the_largest_within_the_room(fixed, per):
    found = Probe(fixed, per)
    for room in (0, fixed, fixed + per - 1, fixed + per, fixed + 10 * per + 1, fixed + 10_000 * per):
        c = choose(room, found, 1_000_000, CUDA)
        assert c >= 1
        if c > 1:
            assert fixed + c * per <= room  # within the budget...
        assert fixed + (c + 1) * per > room  # ...and the largest that is
    assert choose(10**15, found, 37, CUDA) == 37  # never more than the data
    assert choose(None, found, 37, CUDA) == 37  # no budget recorded: memory does not limit it


def test_on_the_cpu_the_chunk_stays_within_the_cache_bound():
    found = Probe(0, 1 << 20)
    assert choose(10**15, found, 10**6, CPU) == CPU_CHUNK_BYTES // (1 << 20)
    assert choose(10 << 20, found, 10**6, CPU) == 10  # a smaller room still binds
    assert choose(10**15, Probe(0, CPU_CHUNK_BYTES * 4), 100, CPU) == 1


def test_live_bytes_counts_new_storage_until_its_last_tensor_dies():
    w = torch.ones(100)  # from before: never counted
    with LiveBytes() as live:
        a = torch.empty(1000)  # 4000 bytes
        v = a.view(10, 100)  # a view: no new memory
        wt = w.view(10, 10)  # a view of old memory: not counted
        assert live.now == 4000
        del a
        assert live.now == 4000  # the view keeps the storage alive
        b = v * 2.0  # 4000 more
        assert live.now == 8000 and live.peak == 8000
        del v, b
        assert live.now == 0
        c = torch.ones(250, dtype=torch.float64)  # 2000
        assert live.now == 2000 and live.peak == 8000
    del c, wt


def _gpt(block=32):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, block_size=block, n_layer=2, n_head=2, n_embd=32))


def _windows(n_tokens=20_000, block=32):
    return TextWindows(np.arange(n_tokens, dtype=np.uint16) % 97, block)


def test_the_chosen_chunk_peaks_within_the_room():
    """The probe's model of memory (fixed + c * per_sample) bounds a real chunk's peak."""
    model, data = _gpt(), _windows(2000)  # 62 windows
    found = probe(model, CausalLM(), data, CPU, AMP)
    assert found.per_sample > 32 * 97 * 4  # at least a window's logits
    for c in (3, 17, 31):
        room = found.fixed + c * found.per_sample
        chosen = choose(room, found, len(data), CUDA)
        assert chosen == c
        with LiveBytes() as live:
            evaluate(model, CausalLM(), data, chosen, CPU, AMP)
        assert live.peak <= room * 1.05, (c, live.peak, room)


def test_no_grad_fits_several_training_batches():
    model, data = _gpt(), _windows()
    room = room_in_training(model, CausalLM(), data, 4, CPU, AMP)
    found = probe(model, CausalLM(), data, CPU, AMP)
    assert room > 4 * found.per_sample * 2  # a training micro-batch of 4 holds > 8 windows' evaluation
    job = Job(model, CausalLM(), data, data, "lm")
    monkey = eval_chunk.CPU_CHUNK_BYTES
    try:
        eval_chunk.CPU_CHUNK_BYTES = 1 << 40  # the memory rule alone
        got = for_training(job, 4, CPU, AMP, 4)
    finally:
        eval_chunk.CPU_CHUNK_BYTES = monkey
    assert got == choose(room, found, len(data), CUDA) and got > 8
    assert for_training(Job(model, CausalLM(), data, _windows(200), "lm"), 4, CPU, AMP, 8) == 8  # fits one chunk


def _same(a, b):
    assert a[0] == pytest.approx(b[0], rel=1e-6, abs=1e-9) and a[1] == b[1]
    assert a[2].keys() == b[2].keys()
    for k in a[2]:
        assert a[2][k] == pytest.approx(b[2][k], rel=1e-6, abs=1e-9), k


def test_gpt_evaluation_does_not_depend_on_the_chunk():
    model, data = _gpt(), _windows(3000)  # 93 windows
    base = evaluate(model, CausalLM(), data, 1, CPU, AMP)
    chosen = choose(None, probe(model, CausalLM(), data, CPU, AMP), len(data), CPU)
    for c in (chosen, 7, len(data)):
        _same(evaluate(model, CausalLM(), data, c, CPU, AMP), base)


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_table_evaluation_does_not_depend_on_the_chunk(task):
    torch.manual_seed(0)
    x = torch.randn(1500, 10)
    if task == "regression":
        data, objective, out = TensorDataset(x=x, y=x.sum(1)), Regression(), 1
    else:
        data, objective, out = TensorDataset(x=x, y=(x[:, 0] > 0).long() + (x[:, 1] > 0).long()), Classification(), 3
    model = nn.Sequential(nn.Linear(10, 5), nn.Tanh(), nn.Linear(5, out))
    base = evaluate(model, objective, data, 1, CPU, AMP)
    chosen = choose(None, probe(model, objective, data, CPU, AMP), len(data), CPU)
    assert chosen == len(data)  # rows are cheap: the whole table in one forward
    for c in (chosen, 256, 1024):
        _same(evaluate(model, objective, data, c, CPU, AMP), base)
