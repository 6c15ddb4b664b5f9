"""``max_time`` on the loop's events: the planning (loop/budget.py) fed with the step times it
measures, and its decisions applied to the run.

    begin        the loop's start is the end of start-up
    step begin   a step's clock starts (its evaluation and checkpoint seconds are left out)
    step done    the step's seconds -> calibrate (fix the step budget) or the mid-run re-plan
    schedule     after a re-plan, steps map onto the calibration's schedule (budget.schedule_step)
    run end      the plan and the seconds by phase -> job.info["time_budget"] (summary.json)

At calibration the run also learns what the time allows:
- warm-up given in steps is capped to WARMUP_SHARE of the fixed step budget (never below the
  steps already taken, so the next step is at the peak lr), told in one line;
- the final evaluation is priced with the rest; when a full validation pass would take more
  than FINAL_SHARE of the budget it runs on a fixed, seeded sample that fits (the end line says
  so). Both follow from the plan alone, so a resumed run makes the same choices.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

from gradtune.config import Config
from gradtune.loop import budget
from gradtune.loop.callbacks import Control
from gradtune.loop.components import Component
from gradtune.loop.evaluation import sample, seconds_per_sample
from gradtune.runtime import distributed

WARMUP_SHARE = 0.1  # warm-up steps at most this share of the step budget max_time fixes
FINAL_SHARE = 0.15  # the final evaluation may take this share of max_time; beyond it, a sample


class TimeBudget(Component):
    key = "budget"

    def __init__(self, cfg: Config, started: Optional[float], provisional: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.budget = budget.TimeBudget.create(cfg.max_time, started, provisional)
        self.t0 = self.other0 = 0.0
        self.unbudgeted: Any = None  # the final evaluation's set before the budget samples it

    def describe(self) -> str:
        return f"TimeBudget(max_time={self.cfg.max_time})"

    def on_train_begin(self, control: Control) -> None:
        # batch_ramp_steps: steps are timed and planned at their share of a full batch (loop/budget.py)
        self.budget.ramp = getattr(getattr(self.view, "sampler", None), "ramp", None)
        self.budget.began()

    def on_step_begin(self) -> None:
        self.t0, self.other0 = time.perf_counter(), self.view.phases.other()

    def on_step_done(self) -> None:
        v = self.view
        if self.budget.observe(v.step, time.perf_counter() - self.t0 - (v.phases.other() - self.other0)):
            self._calibrate()
        elif self.budget.replan_due(v.step):
            self._replan()

    def schedule(self, step: float, total: int) -> tuple[float, int]:
        return self.budget.schedule_step(step, total)

    def attach(self, view: Any) -> None:
        super().attach(view)
        self.unbudgeted = view.final_set  # validation, or eval_final's sample: what the budget may cut

    def _final_set(self, per: float) -> int:
        """Samples of the final evaluation: all of its set, or what FINAL_SHARE allows."""
        n = len(self.unbudgeted or ())
        allowed = FINAL_SHARE * self.budget.plan.seconds
        return n if per * n <= allowed else max(1, min(n, int(allowed / max(per, 1e-12))))

    def _calibrate(self) -> None:
        """Fix the step budget now, from the warm-up's step times and a timed evaluation probe
        (loop/budget.py); logged to metrics.jsonl and told in one line."""
        v, cfg = self.view, self.cfg
        t0, val = time.perf_counter(), v.job.val
        per = seconds_per_sample(v.evaluate_on, val, v.eval_batch) if val else 0.0
        probe_s = time.perf_counter() - t0
        state_bytes = sum(t.numel() * t.element_size() for t in v.model.state_dict().values())
        ph = v.phases
        ckpt_s = ph.ckpt / ph.ckpt_n if ph.ckpt_n else budget.output_seconds(3 * state_bytes, False)
        final_n = self._final_set(per)
        self.budget.plan.final_samples = final_n if final_n < len(self.unbudgeted or ()) else 0
        final_s = per * final_n + budget.output_seconds(state_bytes, cfg.plot) + (ckpt_s if v.chained else 0.0)
        # The warm-up's own evaluations (same set, logging included) say best what one costs;
        # else the probe (its chunks run warm) plus the row's logging.
        eval_s = ph.eval_mean() or per * len(v.eval_set or ()) + 2e-3
        every = cfg.checkpoint_every if v.chained else 0
        self.budget.fix(v.step, v.total, eval_s, final_s, ckpt_s, v.eval_every, v.steps_per_epoch, every)
        ph.eval += probe_s
        self._tell(self.budget.told() + self._apply())

    def _replan(self) -> None:
        """Halfway: the final step count from the step times since the calibration."""
        v, ph = self.view, self.view.phases
        ckpt_s = ph.ckpt / ph.ckpt_n if ph.ckpt_n else 0.0
        eval_s = ph.eval_mean() or self.budget.plan.eval_s
        every = self.cfg.checkpoint_every if v.chained else 0
        self.budget.replan(v.step, self.budget.provisional, eval_s, ckpt_s, v.eval_every, v.steps_per_epoch, every)
        self._apply()
        self._tell(self.budget.told_replan())

    def _apply(self) -> str:
        """The plan -> the run: step total, decay span, warm-up cap, final evaluation set; what
        changed, as the end of a line."""
        v, p = self.view, self.budget.plan
        if not p.steps:
            v.set_total(self.budget.provisional)
            return ""
        span = p.first_steps if p.replan_at else p.steps  # the calibration's count: the schedule's total
        v.set_total(p.steps, span)
        said = ""
        cap = max(round(WARMUP_SHARE * span), p.at_step)
        if self.cfg.warmup_steps > cap:
            v.warmup = cap
            why = "the steps already taken" if cap == p.at_step else f"{WARMUP_SHARE:.0%} of the step budget"
            said += f"; warmup_steps {self.cfg.warmup_steps} capped to {cap} ({why})"
        base = self.unbudgeted
        if p.final_samples and base is not None:
            v.final_set = sample(base, p.final_samples, self.cfg.seed)
            said += f"; final evaluation on {p.final_samples:,} of {len(base):,} validation samples"
        return said

    def _tell(self, line: str) -> None:
        self.view.log.write({"kind": "budget", "step": self.view.step, **self.budget.state_dict()})
        if distributed.is_main():
            print(line, file=sys.stderr, flush=True)

    def on_run_end(self) -> None:  # summary.json and the end-of-run line (train.py)
        self.view.job.info["time_budget"] = self.budget.summary(self.view.phases)

    def state_dict(self) -> dict[str, Any]:
        return self.budget.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The step budget is never re-calibrated on resume (loop/budget.py)."""
        self.budget.load_state_dict(state)
        self._apply()
