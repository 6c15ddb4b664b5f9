"""The adaptive host-memory policy: applied once batch lengths vary, never for one fixed shape.

The decisions are checked against the rule written out by hand (CHANGES length changes within
the last WINDOW steps); glibc itself is not touched (release and trim are recorded instead)."""

import pytest
import torch

from gradtune.runtime import allocator


@pytest.fixture
def calls(monkeypatch):
    seen = {"release": 0, "trim": 0}
    monkeypatch.setattr(allocator, "_libc", None)
    monkeypatch.setattr(
        allocator, "release_large_blocks", lambda: seen.__setitem__("release", seen["release"] + 1) or True
    )
    monkeypatch.setattr(allocator, "trim", lambda: seen.__setitem__("trim", seen["trim"] + 1))
    return seen


def steps(policy, lengths_per_step, n_samples):
    """Feed one micro-batch per step whose longest sample has the given length."""
    for length in lengths_per_step:
        policy.lengths[0] = length  # sample 0 is the longest of every batch
        policy.after_step([torch.tensor([0, n_samples - 1])])


def test_fixed_length_batches_never_apply_the_policy(calls):
    policy = allocator.Adaptive(torch.full((10,), 128), multiple=8)
    steps(policy, [128] * 100, 10)
    assert calls == {"release": 0, "trim": 0} and not policy.on


def test_varying_lengths_apply_it_after_CHANGES_changes_then_trim_every_step(calls):
    policy = allocator.Adaptive(torch.full((10,), 8), multiple=8)
    lengths = [40, 17, 48, 24, 33, 9, 48, 48]  # padded to multiples of 8: 40 24 48 24 40 16 48 48
    for i, length in enumerate(lengths):
        steps(policy, [length], 10)
        padded = [-(-x // 8) * 8 for x in lengths[: i + 1]]
        changes = sum(a != b for a, b in zip(padded, padded[1:]))
        assert policy.on == (changes >= allocator.CHANGES), (i, changes)
    assert calls["release"] == 1
    # on at the step of the CHANGES-th change (step 5, index 4): one trim then, one per step after
    assert calls["trim"] == len(lengths) - allocator.CHANGES


def test_lengths_rounded_to_the_same_multiple_are_one_shape(calls):
    policy = allocator.Adaptive(torch.full((10,), 8), multiple=8)
    steps(policy, [121, 125, 128, 122] * 10, 10)  # all pad to 128
    assert not policy.on and calls["release"] == 0


def test_rare_changes_leave_malloc_alone(calls):
    # a short batch every WINDOW steps: 2 changes per window, fewer than CHANGES
    policy = allocator.Adaptive(torch.full((10,), 8), multiple=1)
    steps(policy, ([128] * (allocator.WINDOW - 1) + [64]) * 6, 10)
    assert allocator.CHANGES > 2 and not policy.on and calls["release"] == 0


def test_already_tuned_process_trims_from_the_first_step(calls, monkeypatch):
    monkeypatch.setattr(allocator, "_libc", object())  # release_large_blocks ran before the loop
    policy = allocator.Adaptive(torch.full((4,), 16))
    steps(policy, [16, 16, 16], 4)
    assert policy.on and calls == {"release": 0, "trim": 3}


def test_describe_and_arm(monkeypatch):
    monkeypatch.setattr(allocator, "_libc", None)
    monkeypatch.setattr(allocator, "_armed", False)
    assert allocator.describe() == "memory policy off" and not allocator.armed()
    allocator.arm()
    assert allocator.armed() and "armed, off" in allocator.describe()
