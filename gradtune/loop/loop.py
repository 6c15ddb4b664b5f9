"""The one training loop. Every job — a line, the 10-5-1 MLP, a GPT, a LoRA-tuned LLM — runs here.

    for each step:
        batch(es)  <- sampler (batch_size: full | 1 | k, or k ramped by step), split into micro-batches
        loss       <- objective(model, micro-batch) as sums; gradients of sums accumulated
        grad       <- divided once by the batch's total count: exact whatever the split
                      (fp16: the loss sums were scaled, the scale is divided out here too;
                      overflowed gradients withhold the update: loop/loss_scale.py)
        guard      <- finite loss and gradient? no spike? else skip / rollback / stop
                      (decided before anything is touched)
        param      <- optimizer.step() at lr(step)
        measure    <- at evaluation points only: loss, metrics, grad norm, log
        checkpoint <- every checkpoint_every steps, at the end, and on SIGTERM/SIGINT
        stop?      <- converged (tol, patience, grad_tol), a component or callback asked, or
                      the step budget is spent

Everything else is a component on the loop's events (loop/components.py, the list in
loop/assemble.py): the time budget, noise scale, plateau schedule, progress, throughput,
update ratios, TensorBoard, MLflow / W&B, allocator policy, audit, test probe; early stopping
and your callbacks use the same events. Resume restores ``Loop.load_state_dict`` from a checkpoint
(``Loop.restore``); checkpoints are written only between steps, so a kill inside an accumulation
window simply recomputes that whole step from the last checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch

from gradtune.config import Config
from gradtune.data.sampler import Step, make_sampler
from gradtune.jobs.job import Job, eval_chunk
from gradtune.loop import gradient
from gradtune.loop.assemble import components, step_total
from gradtune.loop.budget import Spent
from gradtune.loop.callbacks import Callback, Control
from gradtune.loop.components import Events
from gradtune.loop.eval_chunk import for_training
from gradtune.loop.evaluation import evaluate, task_metrics, token_sample
from gradtune.loop.guard import Guard
from gradtune.loop.loop_state import LoopState
from gradtune.loop.schedules import factor
from gradtune.loop.stopping import Convergence
from gradtune.optim.adamw import AdamW
from gradtune.optim.build import make_optimizer
from gradtune.optim.direct import direct_step
from gradtune.runtime import distributed, testhooks
from gradtune.runtime.device import autocast, resolve_device
from gradtune.runtime.errors import GradtuneError
from gradtune.state import checkpoint, model_weights, resume
from gradtune.state.preempt import Flag, Preempted
from gradtune.telemetry.metrics_log import MetricsLog
from gradtune.telemetry.progress import Progress


def _set_lr(opt: torch.optim.Optimizer, f: float) -> float:
    for g in opt.param_groups:
        g["lr"] = g.setdefault("initial_lr", g["lr"]) * f
    return opt.param_groups[0]["lr"]


class Loop(LoopState):
    """State of one run of the loop; ``run`` is the loop itself. The loop is also the
    ``LoopView`` its components see (loop/components.py documents what they may touch)."""

    def __init__(
        self,
        job: Job,
        cfg: Config,
        out_dir: Optional[Path],
        log: MetricsLog,
        callbacks: Optional[list[Callback]] = None,
        started: Optional[float] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        self.job, self.cfg, self.log, self.out_dir = job, cfg, log, out_dir
        # ``device``: the RunSetup's (process group joined); a Loop built alone joins it here.
        self.device = device if device is not None else distributed.init(resolve_device(cfg.device), cfg.dist_timeout)
        mode = distributed.choose(cfg.distributed, job.model, cfg.optimizer, self.device)
        # DDP wraps, FSDP2 shards in place; self.model is what the loop calls, job.model stays unwrapped.
        self.model, groups = distributed.wrap(job.model.to(self.device), mode, self.device, job.param_groups)
        # compile=true: the forward/backward runs through Inductor; weights are saved from the
        # plain module, so files never carry an `_orig_mod.` prefix.
        self.fwd = torch.compile(self.model) if cfg.compile else self.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = make_optimizer(cfg, groups or self.params, job.model)
        self.opt_step = direct_step(self.opt)  # opt.step() minus torch's per-call profiling wrapper
        self.sampler = make_sampler(job, cfg)
        per_epoch = self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total = step_total(cfg, self.sampler)
        self.eval_every = cfg.eval_every or per_epoch
        self.warmup = cfg.warmup_steps  # max_time may cap it (loop/time_budget.py)
        self.decay_steps = cfg.decay_steps or max(1, round(cfg.decay_fraction * self.total))  # wsd
        self._eval_batch = 0  # samples per evaluation forward: chosen at the first evaluation
        self.stopper = Convergence(cfg.tol, cfg.patience, cfg.grad_tol)
        self.guard = Guard(cfg.guard)
        self.amp = autocast(cfg.precision, self.device)
        self.step = self.skipped = 0
        self.lr_scale = 1.0  # lowered by each guard rollback
        self.finished: Optional[str] = None  # why a checkpointed run already stopped (converged...)
        self.ckpt_root = checkpoint.root(out_dir) if out_dir is not None else None
        self.chained = self.ckpt_root is not None and bool(cfg.checkpoint_every)
        self.saved_step: Optional[int] = None
        self.preempt: Optional[Flag] = None  # set by fit() while its signal handlers are installed
        self.phases = Spent()  # seconds evaluating and checkpointing: step times leave them out
        self._reset_period_sums()
        self.last_gnorm: "Optional[float | torch.Tensor]" = None
        self.batch: Optional[Step] = None  # the step being taken, and its samples or tokens
        self.count = 0.0
        self.train_loss = math.nan
        self.progress = Progress("off", self.total)  # the ProgressDisplay component's, once begun
        # eval_tokens: LM evaluations on one seeded sample of windows; the final one full unless eval_final=sample
        self.eval_set = self.final_set = job.val
        if cfg.eval_tokens and job.unit == "tokens" and job.val is not None:
            self.eval_set = token_sample(job.val, cfg.eval_tokens, cfg.seed) or job.val
            self.final_set = self.eval_set if cfg.eval_final == "sample" else job.val
        split = self.sampler.micro < self.sampler.batch
        found = components(job, cfg, out_dir, self.total, split, started)
        for c in found:
            c.attach(self)
        self.events = Events([*found, *(callbacks or [])], distributed.is_main())
        self.user_callbacks = bool(callbacks)

    # --- the view's setters --------------------------------------------------------------------
    def set_total(self, total: int, span: Optional[int] = None) -> None:
        """The run's step total (max_time fixes it at calibration); ``span``: the total the
        schedule's decay runs over when it differs (after a re-plan)."""
        self.total = total
        self.decay_steps = self.cfg.decay_steps or max(1, round(self.cfg.decay_fraction * (span or total)))
        self.progress.retotal(total)

    def note(self, line: str) -> None:
        self.progress.note(line)

    def component_names(self) -> list[str]:
        """The run's components and callbacks, one line each (--dry-run, run.json)."""
        return self.events.describe()

    # --- measuring ----------------------------------------------------------------------------
    @property
    def eval_batch(self) -> int:
        """Samples per evaluation forward, chosen from memory once training has run (the largest
        chunk within a training micro-batch's activations: loop/eval_chunk.py)."""
        if not self._eval_batch:
            fallback = self.job.eval_chunk or eval_chunk(self.cfg, cheap_rows=False)
            self._eval_batch = for_training(self.job, self.sampler.micro, self.device, self.amp, fallback)
        return self._eval_batch

    def evaluate_on(self, data: Any) -> tuple[float, float, dict[str, float]]:
        """``evaluate`` of ``data`` with this run's model, objective, chunk, device and precision."""
        return evaluate(self.model, self.job.objective, data, self.eval_batch, self.device, self.amp)

    def _lr(self) -> float:
        """Set and return this step's lr: the schedule at (step, total) as the components map it,
        times their factors (plateau cuts), times the guard's rollback scale."""
        c = self.cfg
        step, total = self.step, self.total
        for comp in self.events.on["schedule"]:
            step, total = comp.schedule(step, total)
        f = factor(
            step, c.schedule, total, self.warmup, c.gamma, c.step_size, c.min_lr / c.lr, self.decay_steps, c.decay_shape
        )
        for comp in self.events.on["lr_factor"]:
            f = f * comp.lr_factor()
        return _set_lr(self.opt, f * self.lr_scale)

    def _evaluate(self, lr: float) -> Optional[str]:
        """One evaluation row: training sums since the last one, what components measure, the
        validation pass (full at the end); logged, then heard by components and callbacks."""
        job, t0 = self.job, self.phases.clock()
        self.train_loss = self.run_loss / max(self.run_count, 1.0)
        period = {k: float(v) for k, v in self.run_metrics.items()}  # one host sync per evaluation
        epoch = round(self.sampler.epochs_done(self.step), 4)
        row: dict[str, Any] = {"kind": "eval", "step": self.step, "epoch": epoch}
        row["lr"] = lr
        row.update(task_metrics(job.metrics, job.info, "", self.train_loss, self.run_count, period))
        gnorm = float(self.last_gnorm) if self.last_gnorm is not None else None
        if gnorm is not None:
            row["grad_norm"] = gnorm
        self.events.emit("on_measure", row)
        if job.val is not None:
            data = self.final_set if self.step >= self.total else self.eval_set
            if data is not job.val:
                row["val_samples"] = len(data)
            vl, vc, vs = self.evaluate_on(data)
            row.update(task_metrics(job.metrics, job.info, "val_", vl, vc, vs))
        self.log.write(row)
        asked = self.events.ask("on_evaluate", self.step, row)
        self.phases.evaluated(t0)
        self._reset_period_sums()
        return self.stopper.update(self.train_loss, gnorm if self.cfg.batch_size == "full" else None) or asked

    def _reset_period_sums(self) -> None:
        # Running sums since the last evaluation (an evaluation period, not an epoch). Loss and
        # count are host floats (float64): the guard reads each step's loss anyway. Metric sums
        # stay device tensors (checkpointed as they are), read once per evaluation: no per-step
        # sync for them.
        self.run_loss, self.run_count = 0.0, 0.0
        self.run_metrics: dict[str, torch.Tensor] = {}

    @property
    def period_count(self) -> float:
        """Samples or tokens trained on since the last evaluation."""
        return self.run_count

    def _add_sums(self, loss_sum: float, sums: dict[str, torch.Tensor]) -> None:
        self.run_loss += loss_sum
        self.run_count += self.count
        for k, v in sums.items():
            self.run_metrics[k] = v if k not in self.run_metrics else self.run_metrics[k] + v

    def _update(self, closes: bool) -> None:
        """The optimizer step, with the components that look just before and after it (all of
        them on a step that closes an evaluation period, else those that act every step)."""
        near = self.events.on["on_update"] if closes else self.events.every_step_update
        for c in near:
            c.on_update(True)
        self.opt_step()
        for c in near:
            c.on_update(False)

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
        self.note(f"guard: step {self.step}: {why} -> {action}")
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
        self.check_grad = cfg.guard.enabled and cfg.guard.check_grad
        self.need_norm = cfg.clip_grad_norm is not None or cfg.grad_tol > 0 or self.check_grad
        # Clipping and nothing reading the mean gradient before it: the 1 / count division waits
        # for the clip's pass over the gradients (one pass over every gradient a step saved).
        self.fold = cfg.clip_grad_norm is not None and not self.events.reads_grads
        self.owed = 1.0  # the factor this step's p.grad still owe (fold: 1 / count)
        # gradtune's AdamW takes the clip factor (and the 1 / count) as it reads each gradient: no pass of its own over
        # every gradient. Not when a callback might read p.grad after the step (it keeps the unscaled sums then).
        self.opt_clips = self.fold and type(self.opt) is AdamW and not self.user_callbacks
        control = Control(
            self.out_dir,
            self.total,
            save_state=lambda root: self.save_checkpoint(root, keep=1),
            load_weights=lambda root: model_weights.load_newest(root, self.model, self.opt),
            snapshot=lambda: model_weights.snapshot(self.model),
            restore=lambda weights: model_weights.copy_into(self.model, weights),
            optimizer=self.opt,
        )
        self.events.emit("on_train_begin", control)
        if cfg.guard.enabled and cfg.guard.policy == "rollback":
            if self.ckpt_root is None:
                raise GradtuneError("guard.policy=rollback needs an out_dir to keep checkpoints in")
            if checkpoint.newest_step(self.ckpt_root) is None:
                self.save_checkpoint()  # there is always a last good state to roll back to
        self.model.train()

    def _gradients(self, s: Step) -> tuple[float, dict, list[torch.Tensor], Optional[list[float]]]:
        """Step ``s``'s mean gradient in ``p.grad``: (loss sum, metric sums, gradients, the first
        micro-batch's [|grad|², count] when a component wants it)."""
        for p in self.params:
            p.grad = None
        first: Optional[list[float]] = [] if self.events.wants_first else None
        scale = self.events.loss_scale()  # 1.0 but for fp16's loss scale
        loss_sum, count, sums = gradient.accumulate(
            self.fwd, self.job.objective, self.job.train, s.micro, self.device, self.amp, first, scale
        )
        # The gradient of the mean: one division by the whole batch's count (see objectives/output.py).
        grads = [p.grad for p in self.params if p.grad is not None]
        self.batch, self.count = s, float(count)
        self.owed = 1.0
        if grads and self.count * scale != 1.0:
            if self.fold:
                self.owed = 1.0 / (self.count * scale)  # applied with the clip (_apply)
            else:
                torch._foreach_mul_(grads, 1.0 / (self.count * scale))
        return float(loss_sum), sums, grads, first  # one scalar read per step: the guard needs it now

    def _apply(self, grads: list[torch.Tensor], gnorm: Any, first: Optional[list[float]]) -> None:
        """The update from the mean gradient: components hear it, clipping, the optimizer step."""
        self.events.emit("on_gradients", grads, gnorm, self.count, first)
        if self.need_norm:
            self.last_gnorm = gnorm
            if self.cfg.clip_grad_norm is not None and self.opt_clips and isinstance(gnorm, float):
                self.opt.grad_scale = gradient.clip_factor(gnorm, self.cfg.clip_grad_norm, self.owed)
            elif self.cfg.clip_grad_norm is not None:
                gradient.clip_(grads, gnorm, self.cfg.clip_grad_norm, self.owed)
        self._update((self.step + 1) % self.eval_every == 0)

    def _step(self, s: Step) -> tuple[bool, Optional[str]]:
        """One optimizer step on ``s``: (did the step count, why to stop or None)."""
        # A signal seen by any rank before this step stops every rank after it (runtime/distributed.py).
        distributed.vote_stop(self.preempt is not None and self.preempt.requested)
        lr = self._lr()
        loss_sum_f, sums, grads, first = self._gradients(s)
        loss = loss_sum_f / self.count
        # A component may withhold the update (the step counts); a non-finite loss is the guard's.
        held = math.isfinite(loss) and self.events.hold_update(grads)
        gnorm = gradient.norm(grads) if self.need_norm and not held else None
        if gnorm is not None and self.owed != 1.0:
            gnorm = gnorm * self.owed  # the mean gradient's norm
        action, why = self.guard.check(loss, float(gnorm) if self.check_grad and not held else None)
        if action != "ok":
            return False, self._on_guard(action, why, s)
        if not held:
            self._apply(grads, gnorm, first)
        testhooks.hit("step")
        self._add_sums(loss_sum_f, sums)
        self.step += 1
        asked = self.events.step_end(self.step, loss, lr)
        if self.cfg.log_every and self.step % self.cfg.log_every == 0:
            self.log.write({"kind": "step", "step": self.step, "loss": loss, "lr": lr})
        if self.step % self.eval_every == 0 or s.epoch_end or self.step == self.total:
            return True, self._evaluate(lr) or asked
        return True, asked

    def _after_step(self) -> None:
        """Checkpoint when due; on a preemption request, checkpoint and raise ``Preempted``."""
        if self.chained and self.step % self.cfg.checkpoint_every == 0:
            self.save_checkpoint()
        if self.preempt is not None and distributed.stop_agreed(self.preempt.requested):
            assert self.ckpt_root is not None
            self.preempt.answer()  # the boundary is reached: the checkpoint may take its time
            path = self.ckpt_root / checkpoint.folder_name(self.step)
            if self.saved_step != self.step:
                path = self.save_checkpoint()
            self.progress.close(self.step)
            by = self.preempt.signal or "a signal to another rank"
            raise Preempted(
                f"preempted by {by} at step {self.step}; checkpoint {path}; run the same command again to resume"
            )

    def _end(self) -> str:
        """Close the run: its last checkpoint, the components' summaries; why it stopped."""
        if self.chained and self.saved_step != self.step:
            self.save_checkpoint()  # the end of the run (step total, convergence or divergence)
        self.events.emit("on_run_end")
        return self.finished or f"budget reached ({self.total} steps)"

    def run(self) -> tuple[str, float]:
        """Train until the step total is reached or a stop rule fires: (why it stopped, last train loss)."""
        self._begin()
        while self.step < self.total and not self.finished:
            testhooks.hit("step.begin")
            self.events.emit("on_step_begin")
            applied, reason = self._step(self.sampler.draw(self.step))  # the ramp's size at this step
            if reason:
                self.finished = reason
                break
            if applied:
                self._after_step()
            self.events.emit("on_step_done")
        return self._end(), self.train_loss
