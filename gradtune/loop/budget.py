"""``max_time``: a wall-time budget turned into a step budget once, early in the run, then fixed.

    warm-up   the first ``warm`` steps (and at least WINDOW_SHARE of the budget) run with the
              schedule over the config's own total (epochs / max_steps); their times are
              measured, the first ``skip`` excluded (allocation, compile, cold caches)
    calibrate mean step time, the cost of one evaluation (those of the warm-up, else a probe on
              a few validation chunks scaled to the evaluated set) and of the final evaluation,
              checkpoints and outputs -> the largest step count that ends inside the budget

Why the mean and not the median: on a shared machine a process gets time slices; most short
steps run inside one and a few wait for the next. The median sees only the fast ones and
underestimates what thousands of steps cost; the mean over a window spanning many slices counts
the waits at their true rate.
    fixed     from then on the schedule runs over that count (the lr reaches min_lr when the
              time runs out); the count is saved in every checkpoint, so a resumed run takes the
              same number of steps and is bitwise the uninterrupted one (no re-calibration)
    re-plan   halfway from the calibration to the end, then halfway from there to the end again
              (at most MAX_REPLANS times): the mean step time since the previous plan (hundreds
              to thousands of steps, not a warm-up's tens) sets the count. On a shared machine
              the pace drifts by several percent over minutes and can change by a third when a
              neighbour starts, so neither a warm-up nor one re-plan ends a run within a few
              percent. The schedule keeps its progress: the steps left are mapped onto the
              progress left (``schedule_step``), so the lr stays continuous and still reaches
              min_lr at the last step. Each re-plan is saved too; a run resumed after it takes
              the same steps, one resumed before it re-plans from its own timings (tests force
              the counts: FORCE_ENV)

Why fixed and not "stop when the clock says so": a run stopped by the clock is not reproducible
(the same config on a busier machine gives other weights) and its schedule cannot decay to
min_lr, because the end is unknown until it arrives.

The clock starts at process start when ``train()`` is reached within ``STARTUP_WINDOW_S`` of
it (the CLI: imports and data loading count), else at ``train()`` / ``fit()`` entry (a library
call in a long-lived process).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch.distributed as dist

from gradtune.config.durations import parse_duration
from gradtune.data.batch_ramp import BatchRamp
from gradtune.runtime.errors import GradtuneError

WARM_STEPS = 20  # steps measured before the budget is fixed (fewer for tiny runs)
SKIP_STEPS = 3  # first steps left out of the mean: allocation, compile, cold caches
WARM_SHARE = 0.1  # calibrate earlier when the warm-up has used this share of the budget
WINDOW_SHARE = 0.05  # ... and never on less than this share: the mean must span many scheduler time slices
AIM = 0.985  # plan to end at this share of the budget: later steps may run a little slower
REPLAN_AT = 0.5  # re-plan when this share of the steps between the last plan and the end are done
REPLAN_MIN = 200  # ... if at least this many steps were timed since the last plan
MAX_REPLANS = 3  # at 1/2, 3/4 and 7/8 of the way: the last eighth runs on the freshest pace
STARTUP_WINDOW_S = 60.0  # a process this young at train() is a CLI run: its start-up counts
WRITE_BPS = 200e6  # bytes/s assumed for checkpoint and weight files before one is timed
PLOT_S = 2.0  # loss plot and report: matplotlib's import dominates
FORCE_ENV = "GRADTUNE_TEST_BUDGET"  # tests: force the calibrated step count (calibrates at the warm step)


def process_age() -> Optional[float]:
    """Seconds since this process started, from /proc (Linux: both figures count from boot, in
    clock ticks and seconds); None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time since boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def origin() -> float:
    """The budget clock's zero as a ``time.perf_counter()`` value (see the module docstring)."""
    now, age = time.perf_counter(), process_age()
    if age is not None and 0.0 <= age <= STARTUP_WINDOW_S:
        return now - age
    return now


def multiples(lo: int, hi: int, every: int) -> int:
    """How many multiples of ``every`` lie in (lo, hi]."""
    return hi // every - lo // every if every > 0 and hi > lo else 0


def evals_between(lo: int, hi: int, eval_every: int, per_epoch: int) -> int:
    """Evaluations the loop makes after steps in (lo, hi) - the final one at ``hi`` excluded:
    every ``eval_every`` steps and at each epoch end (once where both fall together)."""
    both = eval_every * per_epoch // math.gcd(eval_every, per_epoch)
    end = hi - 1
    return multiples(lo, end, eval_every) + multiples(lo, end, per_epoch) - multiples(lo, end, both)


def plan_steps(
    done: int,
    cap: int,
    seconds_left: float,
    step_s: float,
    eval_s: float,
    ckpt_s: float,
    eval_every: int,
    per_epoch: int,
    ckpt_every: int,
    ramp: Optional[BatchRamp] = None,
) -> int:
    """The largest total T in [done + 1, cap] whose remaining steps, evaluations and checkpoints
    fit in ``seconds_left``: (T - done) * step_s + evals * eval_s + checkpoints * ckpt_s. At
    least one more step (the one that carries the final evaluation); never above ``cap``.
    ``ramp``: ``step_s`` is a full batch's, a step costs its share of a full batch's samples."""

    def cost(t: int) -> float:
        ckpts = multiples(done, t - 1, ckpt_every) if ckpt_every else 0
        steps = (t - done) if ramp is None else ramp.full_steps(done, t)
        return steps * step_s + evals_between(done, t, eval_every, per_epoch) * eval_s + ckpts * ckpt_s

    lo, hi = done + 1, max(done + 1, cap)
    if cost(hi) <= seconds_left:
        return hi
    while hi - lo > 1:  # cost is increasing in t: the last t that fits
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= seconds_left else (lo, mid)
    return lo


@dataclass
class Spent:
    """Seconds of the run by phase, in this process (a resumed run counts from its restart)."""

    eval: float = 0.0  # evaluations and the calibration's probe
    eval_n: int = 0  # evaluations (the probe not counted)
    eval_first: float = 0.0  # the first evaluation's seconds: cold caches, lazy imports

    def eval_mean(self) -> Optional[float]:
        """Seconds of one evaluation from those made so far, the cold first one left out."""
        return (self.eval - self.eval_first) / (self.eval_n - 1) if self.eval_n >= 2 else None

    ckpt: float = 0.0  # checkpoint writes
    ckpt_n: int = 0

    def other(self) -> float:
        """Time that is not training: tokens/s and step times leave it out."""
        return self.eval + self.ckpt

    @staticmethod
    def clock() -> float:
        return time.perf_counter()

    def evaluated(self, t0: float) -> None:
        """One evaluation begun at ``clock()`` value ``t0`` is done."""
        self.eval += time.perf_counter() - t0
        self.eval_n += 1
        self.eval_first = self.eval_first or self.eval


@dataclass
class Plan:
    """The fixed step budget and what it was computed from (checkpointed; seconds, steps)."""

    max_time: str
    seconds: float
    steps: int = 0  # 0 until calibrated
    at_step: int = 0  # the step it was fixed after
    step_s: float = 0.0  # mean seconds per training step over the warm-up's second half (batch ramp: per full batch)
    eval_s: float = 0.0  # one intermediate evaluation
    final_s: float = 0.0  # final evaluation + last checkpoint + outputs
    startup_s: float = 0.0  # from the clock's zero to the first step
    forced: bool = False
    replan_at: int = 0  # the step of the latest mid-run re-plan; 0: not yet
    first_steps: int = 0  # the calibration's count, which the schedule keeps running over after a re-plan
    replan_v: float = 0.0  # the schedule's step at the latest re-plan (= replan_at after the first)
    replans: int = 0  # re-plans made
    final_samples: int = 0  # the final evaluation's validation samples when sampled to fit; 0: all


@dataclass
class TimeBudget:
    """A run's ``max_time``: step times seen during the warm-up, then the fixed ``Plan``."""

    plan: Plan
    origin: float  # perf_counter() value of the clock's zero
    provisional: int  # the config's own step total (epochs / max_steps): the schedule's until fixed
    warm: int = WARM_STEPS
    skip: int = SKIP_STEPS
    times: list[float] = field(default_factory=list)
    forced: Optional[int] = None
    loop_start: Optional[float] = None
    since_s: float = 0.0  # training seconds since the last plan (the next re-plan's mean)
    since_n: int = 0  # ... and their steps
    before: int = 0  # the count the latest re-plan replaced (its stderr line)
    # batch_ramp_steps: step times are kept as a full batch's (seconds x batch / the step's size)
    ramp: Optional[BatchRamp] = None

    @classmethod
    def create(cls, max_time: str, start: Optional[float], provisional: int) -> "TimeBudget":
        """``provisional``: the config's own step total, the schedule's until calibration."""
        warm = min(WARM_STEPS, max(2, provisional // 5))
        forced = os.environ.get(FORCE_ENV)
        return cls(
            Plan(str(max_time), parse_duration(max_time)),
            time.perf_counter() if start is None else start,
            provisional,
            warm,
            min(SKIP_STEPS, warm // 4),
            forced=int(forced) if forced else None,
        )

    @property
    def fixed(self) -> bool:
        return self.plan.steps > 0

    def began(self) -> None:
        if self.loop_start is None:
            self.loop_start = time.perf_counter()
            self.plan.startup_s = self.plan.startup_s or self.loop_start - self.origin

    def observe(self, step: int, seconds: float) -> bool:
        """One step's training seconds (evaluation and checkpoint time excluded); is calibration due?"""
        if self.ramp is not None:  # the step just taken, ``step - 1``, had ramp.size(step - 1) samples
            seconds *= self.ramp.batch / self.ramp.size(max(step - 1, 0))
        if self.fixed:
            self.since_s, self.since_n = self.since_s + seconds, self.since_n + 1
            return False
        if step > self.skip:
            self.times.append(seconds)
        if self.forced is not None or (dist.is_available() and dist.is_initialized()):
            return step >= self.warm  # a fixed step: the same on every rank, the same in every test run
        start = self.loop_start if self.loop_start is not None else self.origin
        left, spent = self.plan.seconds - (start - self.origin), time.perf_counter() - start
        if not self.times:
            return False
        return (step >= self.warm and spent >= WINDOW_SHARE * self.plan.seconds) or spent >= WARM_SHARE * left

    def fix(
        self,
        step: int,
        cap: int,
        eval_s: float,
        final_s: float,
        ckpt_s: float,
        eval_every: int,
        per_epoch: int,
        ckpt_every: int,
    ) -> int:
        """Fix the step budget after ``step`` steps: the total the run will take (<= ``cap``)."""
        p = self.plan
        p.at_step, p.eval_s, p.final_s = step, eval_s, final_s
        # The mean (not the median: on a shared machine the waits between time slices are part
        # of a step) of the warm-up's second half: its first steps still fill allocator caches
        # and run slower than the thousands of steps the plan is for.
        steady = self.times[len(self.times) // 2 :]
        p.step_s = statistics.fmean(steady) if steady else 0.0
        if self.forced is not None:
            p.steps, p.forced = max(step + 1, min(cap, self.forced)), True
        else:
            left = AIM * p.seconds - (time.perf_counter() - self.origin) - final_s
            p.steps = plan_steps(
                step, cap, left, p.step_s, eval_s, ckpt_s, eval_every, per_epoch, ckpt_every, self.ramp
            )
        if dist.is_available() and dist.is_initialized():  # every rank takes rank 0's count
            box = [p.steps]
            dist.broadcast_object_list(box, src=0)
            p.steps = int(box[0])
        return p.steps

    def replan_due(self, step: int) -> bool:
        """Is the mid-run re-plan due after ``step``? (the same step on every rank)"""
        p = self.plan
        if not self.fixed or p.replans >= MAX_REPLANS or p.forced or step >= p.steps:
            return False
        last = p.replan_at or p.at_step
        return step >= last + REPLAN_AT * (p.steps - last) and self.since_n >= REPLAN_MIN

    def replan(
        self, step: int, cap: int, eval_s: float, ckpt_s: float, eval_every: int, per_epoch: int, ckpt_every: int
    ) -> int:
        """Fix the count again from the step times since the last plan (module docstring)."""
        p = self.plan
        step_s = self.since_s / self.since_n
        v = self.schedule_step(step, p.steps)[0]  # the schedule's progress so far, kept
        left = AIM * p.seconds - (time.perf_counter() - self.origin) - p.final_s
        steps = plan_steps(step, cap, left, step_s, eval_s, ckpt_s, eval_every, per_epoch, ckpt_every, self.ramp)
        if dist.is_available() and dist.is_initialized():
            box = [steps]
            dist.broadcast_object_list(box, src=0)
            steps = int(box[0])
        self.before = p.steps
        p.first_steps = p.first_steps if p.replans else p.steps
        p.replan_at, p.replan_v, p.steps, p.step_s, p.eval_s = step, v, steps, step_s, eval_s
        p.replans += 1
        self.since_s, self.since_n = 0.0, 0
        return steps

    def schedule_step(self, step: int, total: int) -> tuple[float, int]:
        """(step, total) for the lr schedule: after a re-plan, steps replan_at..steps map linearly
        onto replan_v..first_steps (the schedule's progress at the re-plan to its end), so the lr
        is continuous there and reaches min_lr at the end. Asked for steps from the latest re-plan
        on (the loop's current step); before the first re-plan the identity."""
        p = self.plan
        if not p.replan_at:
            return step, total
        t0, v0 = p.replan_at, p.replan_v or float(p.replan_at)  # replan_v: absent in older checkpoints
        if step <= t0:
            return v0 - (t0 - step), p.first_steps
        return v0 + (step - t0) * (p.first_steps - v0) / (p.steps - t0), p.first_steps

    def told_replan(self) -> str:
        p = self.plan
        return (
            f"max_time {p.max_time}: re-planned at step {p.replan_at:,}: {self.before:,} -> {p.steps:,} steps "
            f"({p.step_s:.3g} s/step since the {'calibration' if p.replans == 1 else 'last re-plan'})"
        )

    def told(self) -> str:
        """The calibration in one line (stderr, at the moment the budget is fixed)."""
        p = self.plan
        line = (
            f"max_time {p.max_time}: {p.steps:,} steps fixed after {p.at_step} "
            f"({p.step_s:.3g} s/step{' of a full batch' if self.ramp else ''}, {p.eval_s:.3g} s per evaluation, "
            f"{p.final_s:.3g} s to finish)"
        )
        if p.final_s > 0.5 * p.seconds:
            line += "; the final full evaluation and outputs take most of the budget: lower val_fraction"
        return line

    def summary(self, spent: Spent) -> dict[str, Any]:
        """The plan and this process's seconds by phase (summary.json, the end-of-run line)."""
        total = time.perf_counter() - self.origin
        startup = (self.loop_start or self.origin) - self.origin
        phases = {
            "startup": startup,
            "eval": spent.eval,
            "ckpt": spent.ckpt,
            "total": total,
            "train": max(0.0, total - startup - spent.other()),
        }
        return {
            "plan": asdict(self.plan),
            "spent": {k: round(v, 3) for k, v in phases.items()},
            "resumed": self.plan.steps > 0 and not self.times,
        }

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.plan)

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """A checkpoint's plan, kept when it was made for the same ``max_time`` (else the run
        calibrates again, from its resume point)."""
        if not state or state.get("max_time") != self.plan.max_time:
            return
        try:
            plan = Plan(**state)
        except TypeError as e:
            raise GradtuneError(f"state.json field 'budget' does not read ({e})") from None
        if not isinstance(plan.steps, int) or isinstance(plan.steps, bool) or plan.steps < 0:
            raise GradtuneError(f"state.json field 'budget.steps' must be an integer >= 0, got {plan.steps!r}")
        if plan.replan_at and not plan.replans:  # written before re-plans repeated: one was made
            plan.replans, plan.replan_v = 1, float(plan.replan_at)
        self.plan = plan


def output_seconds(state_bytes: int, plot: bool) -> float:
    """What writing the final weights (and the plot and report) is expected to take."""
    plot_s = (0.3 if "matplotlib.pyplot" in sys.modules else PLOT_S) if plot else 0.0
    return 0.05 + state_bytes / WRITE_BPS + plot_s


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{seconds:.1f}s"


def describe(info: dict[str, Any], used: float) -> str:
    """The end-of-run line: how the budget was planned and spent (``info``: job.info's entry);
    ``used``: the run's one total, start-up and outputs included (the train command's done line
    says the same figure)."""
    p, spent = info["plan"], info["spent"]
    if not p["steps"]:
        return f"max_time {p['max_time']}: the run ended before calibration; used {_clock(used)}"
    how = "forced by a test hook" if p["forced"] else f"at {p['step_s']:.3g} s/step"
    if p.get("replan_at"):
        n = p.get("replans") or 1
        when = "at step" if n == 1 else f"{n} times, last at"
        how += f" (re-planned {when} {p['replan_at']:,} from {p['first_steps']:,})"
    resumed = ", step budget from the checkpoint" if info.get("resumed") else ""
    sampled = f" (final on {p['final_samples']:,} samples)" if p.get("final_samples") else ""
    return (
        f"max_time {p['max_time']}: {p['steps']:,} steps planned {how}{resumed}, used {_clock(used)}: "
        f"train {_clock(spent['train'])}, eval {_clock(spent['eval'])}{sampled}, checkpoints {_clock(spent['ckpt'])}, "
        f"start-up {_clock(spent['startup'])}, outputs {_clock(max(0.0, used - spent['total']))}"
    )
