"""The one training loop. Every job — a line, the 10-5-1 MLP, a GPT, a LoRA-tuned LLM — runs here.

    for each step:
        batch(es)  <- sampler (batch_size: full | 1 | k), split into micro-batches
        loss       <- objective(model, micro-batch) as sums; gradients of sums accumulated
        grad       <- divided once by the batch's total count: exact whatever the split
        guard      <- finite loss and gradient? no spike? else skip / rollback / stop
                      (decided before anything is touched)
        param      <- optimizer.step() at lr(step)
        measure    <- at evaluation points only: loss, metrics, grad norm, log, plot
        checkpoint <- every checkpoint_every steps, at the end, and on SIGTERM/SIGINT
        stop?      <- converged (tol, patience, grad_tol) or budget reached

Resume restores ``Loop.load_state_dict`` from a checkpoint (``Loop.restore``); checkpoints are
written only between steps, so a kill inside an accumulation window simply recomputes that
whole step from the last checkpoint.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from gradtune.config import Config
from gradtune.data.dataset import TensorDataset
from gradtune.data.sampler import Step, make_sampler
from gradtune.jobs.job import Job
from gradtune.loop import budget, gradient
from gradtune.loop.callbacks import Callback, Callbacks, Control
from gradtune.loop.early_stopping import monitor_mode, monitored
from gradtune.loop.evaluation import (
    evaluate,
    ratio_snapshot,
    seconds_per_sample,
    task_metrics,
    token_sample,
    update_ratios,
)
from gradtune.loop.guard import Guard
from gradtune.loop.loop_state import LoopState
from gradtune.loop.noise_scale import NoiseScale
from gradtune.loop.plateau import Plateau
from gradtune.loop.schedules import factor
from gradtune.loop.stopping import Convergence
from gradtune.optim.build import make_optimizer
from gradtune.optim.direct import direct_step
from gradtune.runtime import allocator, distributed, testhooks
from gradtune.runtime.device import autocast, resolve_device
from gradtune.runtime.errors import GradtuneError
from gradtune.runtime.peak_flops import peak_flops
from gradtune.state import checkpoint, model_weights, resume
from gradtune.state.preempt import Flag, Preempted
from gradtune.telemetry.metrics_log import MetricsLog
from gradtune.telemetry.progress import Progress


def _set_lr(opt: torch.optim.Optimizer, f: float) -> float:
    for g in opt.param_groups:
        g["lr"] = g.setdefault("initial_lr", g["lr"]) * f
    return opt.param_groups[0]["lr"]


class Loop(LoopState):
    """State of one run of the loop; ``run`` is the loop itself."""

    def __init__(
        self,
        job: Job,
        cfg: Config,
        out_dir: Optional[Path],
        log: MetricsLog,
        callbacks: Optional[list[Callback]] = None,
        started: Optional[float] = None,
    ) -> None:
        self.job, self.cfg, self.log = job, cfg, log
        self.callbacks = Callbacks(callbacks or [], distributed.is_main())
        self.out_dir = out_dir
        self.device = distributed.init(resolve_device(cfg.device), cfg.dist_timeout)
        mode = distributed.choose(cfg.distributed, job.model, cfg.optimizer, self.device)
        # DDP wraps, FSDP2 shards in place; self.model is what the loop calls, job.model stays unwrapped.
        self.model, groups = distributed.wrap(job.model.to(self.device), mode, self.device, job.param_groups)
        if job.at_start is not None:
            job.at_start(job.model)  # after the wrap: DDP's broadcast has rewritten the weights in place
        # compile=true: the forward/backward runs through Inductor; weights are saved from the
        # plain module, so files never carry an `_orig_mod.` prefix.
        self.fwd = torch.compile(self.model) if cfg.compile else self.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = make_optimizer(cfg, groups or self.params)
        self.opt_step = direct_step(self.opt)  # opt.step() minus torch's per-call profiling wrapper
        # Host memory policy, applied once batch lengths are seen to vary (runtime/allocator.py).
        lengths = getattr(job.train, "lengths", None) if allocator.armed() else None
        self.memory = (
            allocator.Adaptive(lengths, getattr(job.train, "pad_multiple", 1)) if lengths is not None else None
        )
        self.sampler = make_sampler(job, cfg)
        per_epoch = self.sampler.steps_per_epoch
        self.total = cfg.epochs * per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * per_epoch)
        self.eval_every = cfg.eval_every or per_epoch
        self.decay_steps = cfg.decay_steps or max(1, round(cfg.decay_fraction * self.total))  # wsd
        # The gradient noise scale needs two batch sizes per step: the first micro-batch and the batch.
        split = self.sampler.micro < self.sampler.batch
        self.noise = (
            NoiseScale(unit="tokens" if job.task == "lm" else "samples")
            if cfg.noise_scale and split and not distributed.active()
            else None
        )
        self.plateau = (
            Plateau(
                cfg.lr,
                monitor_mode(cfg.early_stopping),
                cfg.gamma,
                cfg.plateau_patience,
                cfg.plateau_threshold,
                cfg.plateau_cooldown,
                cfg.min_lr,
            )
            if cfg.schedule == "plateau"
            else None
        )
        # Evaluation chunks: large for in-memory tables (cheap rows), the training batch for
        # sequences, whose activations grow with the chunk (peak memory is set here otherwise).
        tabular = isinstance(job.train, TensorDataset)
        self.eval_batch = cfg.micro_batch_size or (
            (1024 if cfg.batch_size == "full" else max(cfg.batch_size, 256))
            if tabular
            else (cfg.batch_size if cfg.batch_size != "full" else 32)
        )
        self.stopper = Convergence(cfg.tol, cfg.patience, cfg.grad_tol)
        self.guard = Guard(cfg.guard)
        self.amp = autocast(cfg.precision, self.device)
        self.step = 0
        self.skipped = 0
        self.lr_scale = 1.0  # lowered by each guard rollback
        self.finished: Optional[str] = None  # why a checkpointed run already stopped (converged...)
        self.ckpt_root = checkpoint.root(out_dir) if out_dir is not None else None
        self.saved_step: Optional[int] = None
        self.preempt: Optional[Flag] = None  # set by fit() while its signal handlers are installed
        self.probe = testhooks.Probe()
        self._reset_epoch_sums()
        self.last_gnorm: "Optional[float | torch.Tensor]" = None
        self.progress = Progress("off", self.total)
        self.health: dict[str, float] = {}
        # max_time: the step budget is fixed after a measured warm-up (loop/budget.py); seconds
        # by phase, so step times and tokens/s leave evaluation and checkpoint time out.
        self.spent, self.other_mark = budget.Spent(), 0.0
        self.budget = budget.TimeBudget.create(cfg.max_time, started, self.total) if cfg.max_time else None
        # eval_tokens: intermediate evaluations of language models on one fixed, seeded sample
        # of validation windows; the final evaluation is the full pass.
        self.eval_set = job.val
        if cfg.eval_tokens and job.task == "lm" and job.val is not None:
            self.eval_set = token_sample(job.val, cfg.eval_tokens, cfg.seed) or job.val

    # --- measuring ----------------------------------------------------------------------------
    def _schedule(self) -> float:
        c = self.cfg
        min_ratio = c.min_lr / c.lr
        step, total = self.budget.schedule_step(self.step, self.total) if self.budget else (self.step, self.total)
        f = factor(
            step, c.schedule, total, c.warmup_steps, c.gamma, c.step_size, min_ratio, self.decay_steps, c.decay_shape
        )
        return f * self.plateau.scale if self.plateau is not None else f

    def _set_total(self, total: int) -> None:
        """The run's step total; max_time sets it at calibration: every schedule runs over it."""
        self.total = total
        plan = self.budget.plan if self.budget is not None else None
        span = plan.first_steps if plan is not None and plan.replan_at else total  # the schedule's total
        self.decay_steps = self.cfg.decay_steps or max(1, round(self.cfg.decay_fraction * span))
        self.progress.retotal(total)

    def _calibrate(self) -> None:
        """max_time: fix the step budget now, from the warm-up's step times and a timed
        evaluation probe (loop/budget.py); logged to metrics.jsonl and told in one line."""
        assert self.budget is not None
        t0, cfg, val = time.perf_counter(), self.cfg, self.job.val
        per = (
            seconds_per_sample(self.model, self.job.objective, val, self.eval_batch, self.device, self.amp)
            if val is not None
            else 0.0
        )
        probe_s = time.perf_counter() - t0
        state_bytes = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        chain = self.ckpt_root is not None and bool(cfg.checkpoint_every)
        ckpt_s = (
            self.spent.ckpt / self.spent.ckpt_n if self.spent.ckpt_n else budget.output_seconds(3 * state_bytes, False)
        )
        final_s = per * len(val or ()) + budget.output_seconds(state_bytes, cfg.plot) + (ckpt_s if chain else 0.0)
        # The warm-up's own evaluations (same set, logging included) say best what one costs;
        # else the probe (its chunks run warm) plus the row's logging.
        eval_s = self.spent.eval_mean() or per * len(self.eval_set or ()) + 2e-3
        self._set_total(
            self.budget.fix(
                self.step,
                self.total,
                eval_s,
                final_s,
                ckpt_s,
                self.eval_every,
                self.sampler.steps_per_epoch,
                cfg.checkpoint_every if chain else 0,
            )
        )
        self.spent.eval += probe_s
        self._tell(self.budget.told())

    def _replan(self) -> None:
        """max_time, halfway: the final step count from the step times since calibration."""
        assert self.budget is not None
        chain = self.ckpt_root is not None and bool(self.cfg.checkpoint_every)
        ckpt_s = self.spent.ckpt / self.spent.ckpt_n if self.spent.ckpt_n else 0.0
        self._set_total(
            self.budget.replan(
                self.step,
                self.budget.provisional,
                self.spent.eval_mean() or self.budget.plan.eval_s,
                ckpt_s,
                self.eval_every,
                self.sampler.steps_per_epoch,
                self.cfg.checkpoint_every if chain else 0,
            )
        )
        self._tell(self.budget.told_replan())

    def _tell(self, line: str) -> None:
        self.log.write({"kind": "budget", "step": self.step, **self.budget.state_dict()})
        if distributed.is_main():
            print(line, file=sys.stderr, flush=True)

    def _evaluate(self, train_loss: float, lr: float) -> Optional[str]:
        job, cfg = self.job, self.cfg
        t0 = time.perf_counter()
        row: dict[str, Any] = {
            "kind": "eval",
            "step": self.step,
            "epoch": round(self.step / self.sampler.steps_per_epoch, 4),
            "lr": lr,
        }
        row.update(task_metrics(job.task, job.info, "", train_loss, self.ep_count, self.ep_sums))
        gnorm = float(self.last_gnorm) if self.last_gnorm is not None else None
        if gnorm is not None:
            row["grad_norm"] = gnorm
        row.update(self.health)
        if self.noise is not None and self.noise.value is not None:
            row["noise_scale"] = self.noise.value
        now = time.perf_counter()
        if job.task == "lm":  # training throughput since the previous evaluation (evaluations, checkpoints excluded)
            tps = self.ep_count / max(now - self.t_mark - (self.spent.other() - self.other_mark), 1e-9)
            row["tokens_per_s"] = tps
            if "flops_per_token" in job.info:
                bf16 = self.cfg.precision == "bf16"
                row["mfu"] = job.info["flops_per_token"] * tps / peak_flops(self.device, bf16)
                if row["mfu"] > 1.0:  # the cached peak was measured at a busy moment: measure again
                    row["mfu"] = job.info["flops_per_token"] * tps / peak_flops(self.device, bf16, remeasure=True)
        if job.val is not None:
            data = job.val if self.step >= self.total else self.eval_set  # the final evaluation is full
            if data is not job.val:
                row["val_samples"] = len(data)
            vl, vc, vs = evaluate(self.model, job.objective, data, self.eval_batch, self.device, self.amp)
            row.update(task_metrics(job.task, job.info, "val_", vl, vc, vs))
        self.log.write(row)
        self.progress.report(self.step, {k: v for k, v in row.items() if k not in ("kind", "step")})
        if self.plateau is not None and self.plateau.step(monitored(row, cfg.early_stopping.monitor)):
            self.progress.note(f"plateau: step {self.step}: lr cut to {cfg.lr * self.plateau.scale:.3g}")
        asked = self.callbacks.evaluate(self.step, row)
        self.spent.eval += time.perf_counter() - t0
        self.spent.eval_n += 1
        self.spent.eval_first = self.spent.eval_first or self.spent.eval
        self.t_mark, self.other_mark = time.perf_counter(), self.spent.other()
        return self.stopper.update(train_loss, gnorm if cfg.batch_size == "full" else None) or asked

    def _reset_epoch_sums(self) -> None:
        # Running sums since the last evaluation. Loss and count are host floats (float64): the
        # guard reads each step's loss anyway. Metric sums stay device tensors (checkpointed as
        # they are), read once per evaluation: no per-step sync for them.
        self.run_loss, self.run_count = 0.0, 0.0
        self.run_metrics: dict[str, torch.Tensor] = {}
        self.ep_count = 0.0
        self.ep_sums: dict[str, float] = {}

    def _close_epoch_sums(self) -> float:
        """One host sync per evaluation: the metric sums since the last one; the mean loss."""
        self.ep_count = self.run_count
        self.ep_sums = {k: float(v) for k, v in self.run_metrics.items()}
        return self.run_loss / max(self.ep_count, 1.0)

    # --- the guard's decisions ----------------------------------------------------------------
    def _on_guard(self, action: str, why: str, s: Step) -> Optional[str]:
        """Apply the guard's decision for step ``s``, whose update was not made; why to stop, or
        None. The step counter does not advance (the schedule stays put) and the batch is
        dropped; the decision is written to metrics.jsonl with the sample ids."""
        for p in self.params:
            p.grad = None
        self.skipped += 1
        row: dict[str, Any] = {
            "kind": "guard",
            "step": self.step,
            "action": action,
            "reason": why,
            "epoch": s.epoch,
            "index": s.index,
            "sample_ids": torch.cat(s.micro).tolist()[:64],
        }
        stop = None
        if action == "rollback":
            stop = self._rollback(row)
        elif action == "stop":
            stop = f"diverged: {why} at step {self.step}"
        elif self.skipped > max(10, self.total // 10):
            stop = f"diverged: {why} ({self.skipped} steps skipped)"
        self.log.write(row)
        self.progress.note(f"guard: step {self.step}: {why} -> {action}")
        return stop

    def _rollback(self, row: dict[str, Any]) -> Optional[str]:
        """Back to the newest good checkpoint with a lower lr; why to stop, or None. ``row`` (the
        guard's record of the bad step) gains what was done."""
        g = self.guard
        give_up = g.give_up(self.cfg.lr * self.lr_scale)
        if give_up:
            return give_up
        found = resume.latest(self.ckpt_root) if self.ckpt_root is not None else None
        if found is None:
            return "diverged: no checkpoint to roll back to"
        position, skipped = self.sampler.state(), self.skipped
        rollbacks, scale = g.rollbacks + 1, self.lr_scale * g.cfg.lr_factor
        self.restore(found)
        # Kept from now, not from the checkpoint: the data already passed (the offending window
        # is skipped), the rollback count and the lowered lr.
        self.sampler.load_state(position)
        g.rollbacks, self.lr_scale, self.skipped = rollbacks, scale, skipped
        self.finished = None
        row.update(
            {"rollback_to": found.folder.name, "resume_step": self.step, "lr_scale": scale, "rollbacks": rollbacks}
        )
        return None

    # --- the loop -----------------------------------------------------------------------------
    def _begin(self) -> None:
        cfg = self.cfg
        self.progress = Progress(
            cfg.progress if distributed.is_main() else "off",
            self.total,
            unit="tokens" if self.job.task == "lm" else "samples",
            start=self.step,
        )
        self.health = {}
        self.t_mark, self.other_mark = time.perf_counter(), self.spent.other()
        if self.budget is not None:
            self.budget.began()
        self.check_grad = cfg.guard.enabled and cfg.guard.check_grad
        self.need_norm = cfg.clip_grad_norm is not None or cfg.grad_tol > 0 or self.check_grad
        self.callbacks.begin(
            Control(
                self.out_dir,
                self.total,
                save_state=lambda root: self.save_checkpoint(root, keep=1),
                load_weights=lambda root: model_weights.load_newest(root, self.model, self.opt),
                snapshot=lambda: model_weights.snapshot(self.model),
                restore=lambda weights: model_weights.copy_into(self.model, weights),
            )
        )
        if cfg.guard.enabled and cfg.guard.policy == "rollback":
            if self.ckpt_root is None:
                raise GradtuneError("guard.policy=rollback needs an out_dir to keep checkpoints in")
            if checkpoint.newest_step(self.ckpt_root) is None:
                self.save_checkpoint()  # there is always a last good state to roll back to
        self.model.train()

    def _step(self, s: Step) -> tuple[bool, Optional[str]]:
        """One optimizer step on ``s``: (was the update applied, why to stop or None). A step that
        closes an evaluation period sets ``train_loss``."""
        cfg, job = self.cfg, self.job
        # A signal seen by any rank before this step stops every rank after it (runtime/distributed.py).
        distributed.vote_stop(self.preempt is not None and self.preempt.requested)
        lr = _set_lr(self.opt, self._schedule() * self.lr_scale)
        for p in self.params:
            p.grad = None
        first: Optional[list[float]] = [] if self.noise is not None else None
        loss_sum, count, sums = gradient.accumulate(
            self.fwd, job.objective, job.train, s.micro, self.device, self.amp, first
        )
        # The gradient of the mean: one division by the whole batch's count (see objectives/output.py).
        grads = [p.grad for p in self.params if p.grad is not None]
        count_f = float(count)
        if grads and count_f != 1.0:
            torch._foreach_mul_(grads, 1.0 / count_f)
        loss_sum_f = float(loss_sum)  # one scalar read per step: the guard needs it now
        loss = loss_sum_f / count_f
        gnorm = gradient.norm(grads) if self.need_norm else None
        action, why = self.guard.check(loss, float(gnorm) if self.check_grad else None)
        if action != "ok":
            return False, self._on_guard(action, why, s)
        if first:  # [|grad of the first micro-batch's sum|², its count]; the batch's mean grad now
            big = float(gnorm) if gnorm is not None else float(gradient.norm(grads))
            self.noise.update(first[1], count_f, first[0] / first[1] ** 2, big * big)
        if self.need_norm:
            self.last_gnorm = gnorm
            if cfg.clip_grad_norm is not None:
                gradient.clip_(grads, gnorm, cfg.clip_grad_norm)
        watch = (self.step + 1) % self.eval_every == 0  # measure this update at the evaluation
        before = ratio_snapshot(self.opt) if watch else None
        self.opt_step()
        if self.memory is not None:
            self.memory.after_step(s.micro)  # trims once batch lengths vary (runtime/allocator.py)
        if self.step == 0 and job.after_first_step is not None:
            job.after_first_step(job.model)  # fine-tuning audit: exactly the right weights moved
        if before is not None:
            self.health = update_ratios(self.opt, before)
        testhooks.hit("step")
        self.run_loss += loss_sum_f
        self.run_count += count_f
        for k, v in sums.items():
            self.run_metrics[k] = v if k not in self.run_metrics else self.run_metrics[k] + v
        self.step += 1
        self.progress.tick(self.step, loss, lr, count_f)
        asked = self.callbacks.step_end(self.step, loss, lr) if self.callbacks.per_step else None
        if self.probe.file is not None:
            self.probe.record(self.step, torch.cat(s.micro).tolist())
        if cfg.log_every and self.step % cfg.log_every == 0:
            self.log.write({"kind": "step", "step": self.step, "loss": loss, "lr": lr})
        if self.step % self.eval_every == 0 or s.epoch_end or self.step == self.total:
            self.train_loss = self._close_epoch_sums()
            reason = self._evaluate(self.train_loss, lr)
            self._reset_epoch_sums()
            return True, reason or asked
        return True, asked

    def _after_step(self) -> None:
        """Checkpoint when due; on a preemption request, checkpoint and raise ``Preempted``."""
        cfg = self.cfg
        if self.ckpt_root is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            self.save_checkpoint()
        if self.preempt is not None and distributed.stop_agreed(self.preempt.requested):
            assert self.ckpt_root is not None
            path = self.ckpt_root / checkpoint.folder_name(self.step)
            if self.saved_step != self.step:
                path = self.save_checkpoint()
            self.progress.close(self.step)
            by = self.preempt.signal or "a signal to another rank"
            raise Preempted(
                f"preempted by {by} at step {self.step}; checkpoint {path}; run the same command again to resume"
            )

    def run(self) -> tuple[str, float]:
        """Train until the budget is spent or a stop rule fires: (why it stopped, last train loss)."""
        stop_reason = self.finished or f"budget reached ({self.total} steps)"
        self.train_loss = math.nan
        self._begin()
        while self.step < self.total and not self.finished:
            testhooks.hit("step.begin")
            t0, other0 = time.perf_counter(), self.spent.other()
            applied, reason = self._step(next(self.sampler))
            if reason:
                stop_reason = self.finished = reason
                break
            if applied:
                self._after_step()
            if self.budget is not None and self.budget.observe(
                self.step, time.perf_counter() - t0 - (self.spent.other() - other0)
            ):
                self._calibrate()
                stop_reason = self.finished or f"budget reached ({self.total} steps)"
            elif self.budget is not None and self.budget.replan_due(self.step):
                self._replan()
                stop_reason = self.finished or f"budget reached ({self.total} steps)"
        if self.ckpt_root is not None and self.cfg.checkpoint_every and self.saved_step != self.step:
            self.save_checkpoint()  # the end of the run (budget, convergence or divergence)
        self.probe.close()
        self.progress.close(self.step)
        if self.budget is not None:  # summary.json and the end-of-run line (train.py)
            self.job.info["time_budget"] = self.budget.summary(self.spent)
        if self.noise is not None and self.noise.value is not None:  # summary.json, report, the CLI's advice
            self.job.info["noise_scale"] = {
                "samples": self.noise.value,
                "batch": self.noise.batch,
                "advice": self.noise.advice(),
            }
        return stop_reason, self.train_loss
