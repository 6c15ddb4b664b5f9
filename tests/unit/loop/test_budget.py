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


@pytest.mark.parametrize(
    "args",
    [
        (20, 500, 3.0, 0.01, 0.05, 0.0, 25, 40, 0),
        (20, 500, 3.0, 0.01, 0.05, 0.2, 25, 40, 30),
        (5, 50, 100.0, 0.01, 0.05, 0.2, 3, 7, 4),
        (5, 50, 0.0, 0.01, 0.0, 0.0, 3, 7, 0),
        (0, 300, 1.234, 0.004, 0.03, 0.0, 10, 13, 0),
    ],
)
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
    info = {
        "plan": {"max_time": "10m", "steps": 2431, "step_s": 0.21, "forced": False},
        "spent": {"train": 520.0, "eval": 58.0, "ckpt": 0.0, "startup": 14.0, "total": 592.0},
        "resumed": False,
    }
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
    args = [
        "model=linear",
        "data=diabetes",
        "epochs=2000",
        f"schedule={schedule}",
        "warmup_steps=3",
        "lr=0.01",
        "min_lr=0.001",
        "max_time=1h",
        "eval_every=1",
        "progress=off",
        "plot=false",
        f"out_dir={out}",
    ]
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


def test_replan_maps_the_steps_left_onto_the_schedule_progress_left(monkeypatch):
    """Halfway from calibration to the end the count is fixed again from the step times since
    the calibration; the schedule's (step, total) after it are affine, continuous at the re-plan
    and end exactly at the calibration's total (so the lr reaches min_lr on the last step)."""
    t = budget.TimeBudget.create("100s", 0.0, 10**6)
    t.plan.steps, t.plan.at_step, t.plan.final_s, t.plan.step_s = 1000, 20, 0.0, 0.05
    for s in range(21, 510):
        assert not t.observe(s, 0.04) and not t.replan_due(s)
    assert t.replan_due(510) and not t.replan_due(509)
    t.origin = budget.time.perf_counter() - 50.0  # 50 s of the 100 s gone: 48.5 left at the 98.5% aim
    steps = t.replan(510, 10**6, 0.0, 0.0, 10**9, 10**9, 0)
    assert steps == pytest.approx(510 + 48.5 / 0.04, abs=2) and t.plan.first_steps == 1000
    assert not t.replan_due(900)  # next: halfway from 510 to the new end
    assert t.schedule_step(400, steps) == (400, 1000) and t.schedule_step(510, steps) == (510, 1000)
    assert t.schedule_step(steps, steps) == (pytest.approx(1000), 1000)
    a, b = t.schedule_step(511, steps)[0], t.schedule_step(512, steps)[0]
    assert b - a == pytest.approx((1000 - 510) / (steps - 510))
    again = budget.TimeBudget.create("100s", 0.0, 10**6)
    again.load_state_dict(t.state_dict())  # a resumed run keeps both counts
    assert again.schedule_step(700, steps) == t.schedule_step(700, steps) and not again.replan_due(800)


def test_later_replans_follow_the_latest_pace_and_keep_the_schedule_continuous():
    """A neighbour slows the steps after the first re-plan: the next re-plan (halfway from the
    first to the end) counts only the steps since the first, cuts the total, and the schedule
    keeps its progress (continuous at both re-plans, ending at the calibration's total); a third
    is due halfway again, and none after MAX_REPLANS."""
    t = budget.TimeBudget.create("100s", 0.0, 10**6)
    t.plan.steps, t.plan.at_step, t.plan.final_s, t.plan.step_s = 1000, 20, 0.0, 0.05
    for s in range(21, 510):
        t.observe(s, 0.05)
    t.origin = budget.time.perf_counter() - 50.0
    first = t.replan(510, 10**6, 0.0, 0.0, 10**9, 10**9, 0)  # 48.5 s left at 0.05 s/step
    due = 510 + (first - 510) // 2 + 1
    for s in range(511, due):
        t.observe(s, 0.06)  # 20% slower from here
        assert not t.replan_due(s)
    assert t.replan_due(due)
    v_before = t.schedule_step(due, first)[0]
    spent = 50.0 + (due - 510) * 0.06
    t.origin = budget.time.perf_counter() - spent
    second = t.replan(due, 10**6, 0.0, 0.0, 10**9, 10**9, 0)
    assert second == pytest.approx(due + (98.5 - spent) / 0.06, abs=2) and due + 200 < second < first
    assert t.plan.first_steps == 1000 and t.plan.replans == 2 and "since the last re-plan" in t.told_replan()
    assert t.schedule_step(due, second)[0] == pytest.approx(v_before)
    assert t.schedule_step(second, second) == (pytest.approx(1000), 1000)
    third = due + 1
    while not (t.observe(third, 0.06) or t.replan_due(third)):
        third += 1
    # the third re-plan: halfway from the second to the end, once REPLAN_MIN steps were timed
    assert third == max(due + (second - due) / 2, due + budget.REPLAN_MIN) // 1 and third < second
    t.plan.replans = budget.MAX_REPLANS
    assert not t.replan_due(third)  # at most MAX_REPLANS
    again = budget.TimeBudget.create("100s", 0.0, 10**6)
    again.load_state_dict(t.state_dict())
    assert again.schedule_step(second - 3, second) == t.schedule_step(second - 3, second)


def test_no_replan_when_forced_or_too_few_steps(monkeypatch):
    monkeypatch.setenv(budget.FORCE_ENV, "400")
    t = budget.TimeBudget.create("1h", 0.0, 10_000)
    for s in range(1, 21):
        t.observe(s, 0.01)
    t.fix(20, 10_000, 0.0, 0.0, 0.0, 10, 10, 0)
    for s in range(21, 400):
        t.observe(s, 0.01)
        assert not t.replan_due(s)  # forced counts are never re-planned: tests stay deterministic
