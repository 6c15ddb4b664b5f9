"""max_time's arithmetic (loop/budget.py) against brute force, and its checkpointed plan."""

import pytest

from gradtune.loop import budget
from gradtune.runtime.errors import GradtuneError


def brute_evals(lo, hi, every, per_epoch):
    return sum(1 for n in range(lo + 1, hi) if n % every == 0 or n % per_epoch == 0)


@pytest.mark.parametrize("every,per_epoch", [(1, 1), (3, 7), (4, 6), (10, 5), (7, 7), (250, 9371)])
def test_evals_between_counts_what_the_loop_evaluates(every, per_epoch):
    for lo in range(0, 40, 3):
        for hi in range(lo, 80, 5):
            assert budget.evals_between(lo, hi, every, per_epoch) == brute_evals(lo, hi, every, per_epoch)


def brute_plan(done, cap, left, step_s, eval_s, ckpt_s, every, per_epoch, ckpt_every):
    best = done + 1
    for t in range(done + 1, cap + 1):
        ckpts = sum(1 for n in range(done + 1, t) if ckpt_every and n % ckpt_every == 0)
        if (t - done) * step_s + brute_evals(done, t, every, per_epoch) * eval_s + ckpts * ckpt_s <= left:
            best = t
    return best


@pytest.mark.parametrize("args", [(20, 500, 3.0, 0.01, 0.05, 0.0, 25, 40, 0), (20, 500, 3.0, 0.01, 0.05, 0.2, 25, 40, 30),
                                  (5, 50, 100.0, 0.01, 0.05, 0.2, 3, 7, 4), (5, 50, 0.0, 0.01, 0.0, 0.0, 3, 7, 0),
                                  (0, 300, 1.234, 0.004, 0.03, 0.0, 10, 13, 0)])
def test_plan_steps_is_the_largest_total_that_fits(args):
    assert budget.plan_steps(*args) == brute_plan(*args)


def test_the_plan_comes_back_from_a_checkpoint_only_for_the_same_max_time():
    a = budget.TimeBudget.create("10m", 0.0, 10_000)
    a.plan.steps, a.plan.step_s = 1234, 0.2
    b = budget.TimeBudget.create("10m", 5.0, 10_000)
    b.load_state_dict(a.state_dict())
    assert b.fixed and b.plan.steps == 1234 and not b.observe(30, 1.0)  # fixed: never re-calibrated
    c = budget.TimeBudget.create("20m", 5.0, 10_000)
    c.load_state_dict(a.state_dict())
    assert not c.fixed
    with pytest.raises(GradtuneError, match="budget.steps"):
        b.load_state_dict({**a.state_dict(), "steps": -3})


def test_warm_up_is_shorter_for_tiny_runs_and_the_forced_count_is_capped(monkeypatch):
    monkeypatch.setenv(budget.FORCE_ENV, "999")
    t = budget.TimeBudget.create("1h", 0.0, 30)
    assert t.warm == 6 and t.skip == 1
    assert [t.observe(s, 0.01) for s in range(1, 7)] == [False] * 5 + [True]
    assert t.fix(6, 30, 0.0, 0.0, 0.0, 10, 10, 0) == 30  # never above the config's own total


def test_describe_names_every_phase():
    info = {"plan": {"max_time": "10m", "steps": 2431, "step_s": 0.21, "forced": False},
            "spent": {"train": 520.0, "eval": 58.0, "ckpt": 0.0, "startup": 14.0, "total": 592.0}, "resumed": False}
    line = budget.describe(info, 595.0)
    assert line.startswith("max_time 10m: 2,431 steps planned at 0.21 s/step, used 9m55s")
    assert "train 8m40s" in line and "eval 58.0s" in line and "start-up 14.0s" in line and "outputs 3.0s" in line


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_every_schedule_runs_over_the_calibrated_total(tmp_path, monkeypatch, schedule):
    """The forced count (40) stands in for the clock's; the config's own total is 1000 x larger."""
    import json

    from gradtune.cli import main
    from gradtune.loop.schedules import factor

    monkeypatch.setenv(budget.FORCE_ENV, "40")
    out = tmp_path / "run"
    args = ["model=linear", "data=diabetes", "epochs=2000", f"schedule={schedule}", "warmup_steps=3", "lr=0.01",
            "min_lr=0.001", "max_time=1h", "eval_every=1", "progress=off", "plot=false", f"out_dir={out}"]
    assert main(["train", *args]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if r["kind"] == "eval"}
    assert max(lrs) == 40
    for step, lr in lrs.items():  # eval rows carry the lr of the step just taken (0-based step - 1)
        total = 40 if step > 20 else 2000 * 12  # the warm-up ran over the config's own total
        want = 0.01 * factor(step - 1, schedule, total, 3, min_ratio=0.1, decay_steps=max(1, round(0.1 * total)))
        assert lr == pytest.approx(want, rel=1e-12), step
    # ... so the lr reaches min_lr as the budget runs out (the step after the last one).
    assert 0.01 * factor(40, schedule, 40, 3, min_ratio=0.1, decay_steps=4) == pytest.approx(0.001, rel=1e-12)
    assert lrs[40] == min(lr for step, lr in lrs.items() if step > 3)  # past the warm-up
