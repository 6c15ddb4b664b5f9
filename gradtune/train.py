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

Resume (gradtune.resume) restores ``Loop.load_state_dict`` from a checkpoint; checkpoints are
written only between steps, so a kill inside an accumulation window simply recomputes that
whole step from the last checkpoint.

Importable: ``fit(job, cfg)`` for objects built in Python, ``train(cfg)`` for a config.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from gradtune import allocator, checkpoint, distributed, faults, gradient
from gradtune.config import Config
from gradtune.data.dataset import TensorDataset
from gradtune.errors import GradtuneError
from gradtune.evaluation import evaluate, ratio_snapshot, task_metrics, update_ratios
from gradtune.gradient import accumulate
from gradtune.guard import Guard, handle
from gradtune.job import Job
from gradtune.optim.direct import direct_step
from gradtune.peak import peak_flops
from gradtune.preempt import Flag, Preempted
from gradtune.schedules import factor
from gradtune.stopping import Convergence
from gradtune.telemetry import MetricsLog, Progress
from gradtune.variants import make_sampler


@dataclass
class Result:
    steps: int
    epochs: float
    stop_reason: str
    train_loss: float  # loss of the last evaluation (epoch mean for SGD/mini-batch; exact for full)
    val_loss: Optional[float]
    metrics: dict[str, float]
    wall_time: float
    history: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Optional[Path] = None
    info: dict[str, Any] = field(default_factory=dict)  # the job's facts (closed-form loss, classes...)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_optimizer(cfg: Config, params: Any) -> torch.optim.Optimizer:
    """Our own update rules (gradtune.optim), drop-in torch.optim optimizers."""
    from gradtune.optim import SGD, AdamW

    if cfg.optimizer == "adamw":
        return AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    return SGD(params, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
               nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)


def autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _set_lr(opt: torch.optim.Optimizer, f: float) -> float:
    for g in opt.param_groups:
        g["lr"] = g.setdefault("initial_lr", g["lr"]) * f
    return opt.param_groups[0]["lr"]


class Loop:
    """State of one run of the loop; ``run`` is the loop itself."""

    def __init__(self, job: Job, cfg: Config, out_dir: Optional[Path], log: MetricsLog) -> None:
        self.job, self.cfg, self.log = job, cfg, log
        self.out_dir = out_dir
        self.device = distributed.init(resolve_device(cfg.device), cfg.dist_timeout)
        mode = distributed.choose(cfg.distributed, job.model, cfg.optimizer, self.device)
        # DDP wraps, FSDP2 shards in place; self.model is what the loop calls, job.model stays unwrapped.
        self.model, groups = distributed.wrap(job.model.to(self.device), mode, self.device, job.param_groups)
        # compile=true: the forward/backward runs through Inductor; weights are saved from the
        # plain module, so files never carry an `_orig_mod.` prefix.
        self.fwd = torch.compile(self.model) if cfg.compile else self.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = make_optimizer(cfg, groups or self.params)
        self.opt_step = direct_step(self.opt)  # opt.step() minus torch's per-call profiling wrapper
        self.trim = allocator.trim if allocator.tuned() else None
        self.sampler = make_sampler(job, cfg)
        per_epoch = self.sampler.steps_per_epoch
        self.total = cfg.epochs * per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * per_epoch)
        self.eval_every = cfg.eval_every or per_epoch
        # Evaluation chunks: large for in-memory tables (cheap rows), the training batch for
        # sequences, whose activations grow with the chunk (peak memory is set here otherwise).
        tabular = isinstance(job.train, TensorDataset)
        self.eval_batch = cfg.micro_batch_size or (
            (1024 if cfg.batch_size == "full" else max(cfg.batch_size, 256)) if tabular
            else (cfg.batch_size if cfg.batch_size != "full" else 32))
        self.stopper = Convergence(cfg.tol, cfg.patience, cfg.grad_tol)
        self.guard = Guard(cfg.guard)
        self.amp = autocast(cfg, self.device)
        self.step = 0
        self.skipped = 0
        self.lr_scale = 1.0  # lowered by each guard rollback
        self.finished: Optional[str] = None  # why a checkpointed run already stopped (converged...)
        self.ckpt_root = out_dir / "checkpoints" if out_dir is not None else None
        self.saved_step: Optional[int] = None
        self.preempt: Optional[Flag] = None  # set by fit() while its signal handlers are installed
        self.probe = faults.Probe()
        self._reset_epoch_sums()
        self.last_gnorm: "Optional[float | torch.Tensor]" = None

    def state_dict(self) -> dict[str, Any]:
        """Everything the next step depends on, except the weights (saved apart, see checkpoint.py).

        The schedule needs only the step (lr is a pure function of it) and the rollback scale;
        the data position is the sampler's (epoch, index) - ``micro_index`` is always 0 because
        checkpoints are taken between steps, never inside an accumulation window.
        """
        s = self.sampler
        return {
            "step": self.step, "skipped": self.skipped, "finished": self.finished,
            "schedule": {"step": self.step, "lr_scale": self.lr_scale, "lr": self.opt.param_groups[0]["lr"]},
            "data": {**s.state(), "micro_index": 0, "n": s.n, "seed": s.seed, "order_sha256": s.order_digest()},
            "optimizer": self.opt.state_dict(),
            "guard": self.guard.state(),
            "stopper": self.stopper.state(),
            "sums": {"loss": self.run_loss, "count": self.run_count, "metrics": dict(self.run_metrics)},
            "last_gnorm": self.last_gnorm,  # a float, or a 0-d tensor (CUDA/DTensor gradients)
            "metrics_rows": len(self.log.rows),
            "rng": checkpoint.rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``state_dict`` (the weights are loaded by the caller)."""
        self.step, self.skipped, self.finished = int(state["step"]), int(state["skipped"]), state["finished"]
        self.lr_scale = float(state["schedule"]["lr_scale"])
        self.opt.load_state_dict(state["optimizer"])
        self.sampler.load_state(state["data"])
        if self.sampler.order_digest() != state["data"]["order_sha256"]:
            raise GradtuneError("checkpoint: the data order regenerated from (seed, epoch) differs from the saved one")
        self.guard.load_state(state["guard"])
        self.stopper.load_state(state["stopper"])
        sums = state["sums"]
        self.run_loss, self.run_count = float(sums["loss"]), float(sums["count"])
        self.run_metrics = {k: v.to(self.device) for k, v in sums["metrics"].items()}
        gn = state["last_gnorm"]
        self.last_gnorm = gn.to(self.device) if isinstance(gn, torch.Tensor) else gn
        checkpoint.set_rng_state(state["rng"])

    def save_checkpoint(self) -> Path:
        assert self.ckpt_root is not None
        cfg = self.cfg
        if distributed.is_sharded(self.model):
            raise GradtuneError("checkpoint_every with distributed=fsdp: periodic sharded checkpoints are not "
                                "wired into the loop yet (gradtune.distributed.save_sharded); use ddp")
        from gradtune.weights import dedupe

        # Unwrapped names (no `module.`), tied weights once, written by rank 0 only.
        model_state = dedupe(distributed.full_state_dict(self.model)) if distributed.is_main() else {}
        path = distributed.on_main(checkpoint.save, self.ckpt_root, self.step, model_state, self.state_dict(),
                                   cfg.to_dict(), cfg.hash(), cfg.keep_checkpoints)
        self.saved_step = self.step
        return path

    def _schedule(self) -> float:
        c = self.cfg
        min_ratio = c.min_lr / c.lr
        return factor(self.step, c.schedule, self.total, c.warmup_steps, c.gamma, c.step_size, min_ratio)

    def _evaluate(self, train_loss: float, lr: float) -> Optional[str]:
        job, cfg = self.job, self.cfg
        row: dict[str, Any] = {"kind": "eval", "step": self.step, "epoch": round(self.step / self.sampler.steps_per_epoch, 4), "lr": lr}
        row.update(task_metrics(job, "", train_loss, self.ep_count, self.ep_sums))
        gnorm = float(self.last_gnorm) if self.last_gnorm is not None else None
        if gnorm is not None:
            row["grad_norm"] = gnorm
        row.update(self.health)
        now = time.perf_counter()
        if job.task == "lm":  # throughput since the previous evaluation (evaluation time excluded)
            tps = self.ep_count / max(now - self.t_mark, 1e-9)
            row["tokens_per_s"] = tps
            if "flops_per_token" in job.info:
                peak = peak_flops(self.device, self.cfg.precision == "bf16")
                row["mfu"] = job.info["flops_per_token"] * tps / peak
        if job.val is not None:
            vl, vc, vs = evaluate(self.model, job.objective, job.val, self.eval_batch, self.device, self.amp)
            row.update(task_metrics(job, "val_", vl, vc, vs))
        self.log.write(row)
        self.progress.report(self.step, {k: v for k, v in row.items() if k not in ("kind", "step")})
        self.t_mark = time.perf_counter()
        return self.stopper.update(train_loss, gnorm if cfg.batch_size == "full" else None)

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

    def run(self) -> Result:
        cfg, job = self.cfg, self.job
        t0 = time.perf_counter()
        self.progress = Progress(cfg.progress if distributed.is_main() else "off", self.total)
        self.health: dict[str, float] = {}
        self.t_mark = t0
        stop_reason, train_loss = self.finished or f"budget reached ({self.total} steps)", math.nan
        check_grad = cfg.guard.enabled and cfg.guard.check_grad
        need_norm = cfg.clip_grad_norm is not None or cfg.grad_tol > 0 or check_grad
        if cfg.guard.enabled and cfg.guard.policy == "rollback":
            if self.ckpt_root is None:
                raise GradtuneError("guard.policy=rollback needs an out_dir to keep checkpoints in")
            if checkpoint.newest_step(self.ckpt_root) is None:
                self.save_checkpoint()  # there is always a last good state to roll back to
        self.model.train()
        while self.step < self.total and not self.finished:
            distributed.fault_point(self.step)
            s = next(self.sampler)
            lr = _set_lr(self.opt, self._schedule() * self.lr_scale)
            for p in self.params:
                p.grad = None
            loss_sum, count, sums = accumulate(self.fwd, job.objective, job.train, s.micro, self.device, self.amp)
            # The gradient of the mean: one division by the whole batch's count (see objective.py).
            grads = [p.grad for p in self.params if p.grad is not None]
            count_f = float(count)
            if grads and count_f != 1.0:
                torch._foreach_mul_(grads, 1.0 / count_f)
            loss_sum_f = float(loss_sum)  # one scalar read per step: the guard needs it now
            loss = loss_sum_f / count_f
            gnorm = gradient.norm(grads) if need_norm else None
            action, why = self.guard.check(loss, float(gnorm) if check_grad else None)
            if action != "ok":
                reason = handle(self, action, why, s)
                if reason:
                    stop_reason = self.finished = reason
                    break
                continue
            if need_norm:
                self.last_gnorm = gnorm
                if cfg.clip_grad_norm is not None:
                    gradient.clip_(grads, gnorm, cfg.clip_grad_norm)
            watch = (self.step + 1) % self.eval_every == 0  # measure this update at the evaluation
            before = ratio_snapshot(self.opt) if watch else None
            self.opt_step()
            if self.trim is not None:
                self.trim()  # hand the freed activations back to the system (allocator.py)
            if self.step == 0 and job.after_first_step is not None:
                job.after_first_step(job.model)  # fine-tuning audit: exactly the right weights moved
            if before is not None:
                self.health = update_ratios(self.opt, before)
            faults.hit("step")
            self.run_loss += loss_sum_f
            self.run_count += count_f
            for k, v in sums.items():
                self.run_metrics[k] = v if k not in self.run_metrics else self.run_metrics[k] + v
            self.step += 1
            if self.probe.file is not None:
                self.probe.record(self.step, torch.cat(s.micro).tolist())
            if cfg.log_every and self.step % cfg.log_every == 0:
                self.log.write({"kind": "step", "step": self.step, "loss": loss, "lr": lr})
            if self.step % self.eval_every == 0 or s.epoch_end or self.step == self.total:
                train_loss = self._close_epoch_sums()
                reason = self._evaluate(train_loss, lr)
                self._reset_epoch_sums()
                if reason:
                    stop_reason = self.finished = reason
                    break
            if self.ckpt_root is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            if self.preempt is not None and self.preempt.requested:
                assert self.ckpt_root is not None
                path = self.ckpt_root / checkpoint.folder_name(self.step)
                if self.saved_step != self.step:
                    path = self.save_checkpoint()
                self.progress.close(self.step)
                raise Preempted(f"preempted by {self.preempt.signal} at step {self.step}; checkpoint {path}; "
                                f"run the same command again to resume")
        if self.ckpt_root is not None and cfg.checkpoint_every and self.saved_step != self.step:
            self.save_checkpoint()  # the end of the run (budget, convergence or divergence)
        self.probe.close()
        self.progress.close(self.step)
        last = next((r for r in reversed(self.log.rows) if r.get("kind") == "eval"), {})
        metrics = {k: v for k, v in last.items() if k not in ("kind", "step", "epoch", "lr", "time")}
        return Result(self.step, self.step / self.sampler.steps_per_epoch, stop_reason,
                      last.get("loss", train_loss), last.get("val_loss"), metrics,
                      time.perf_counter() - t0, self.log.rows, self.out_dir)


@contextlib.contextmanager
def cpu_threads(model: nn.Module, device: torch.device):
    """One intra-op thread for tiny models on CPU: splitting a (32, 5) matmul across cores costs
    more in synchronisation than it saves (and stalls badly when other processes share the
    cores). Restored afterwards."""
    before = torch.get_num_threads()
    tiny = device.type == "cpu" and sum(p.numel() for p in model.parameters()) < 100_000
    if tiny:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if tiny:
            torch.set_num_threads(before)


def fit(job: Job, cfg: Config, out_dir: Optional[Path] = None) -> Result:
    """Train ``job`` with ``cfg``; write metrics.jsonl and checkpoints under ``out_dir`` if given.

    With ``resume: auto`` a run finding a verified checkpoint in ``out_dir`` continues from it.
    Every check (which checkpoint, does the config match) happens before anything is written.
    """
    from gradtune import preempt, resume

    torch.manual_seed(cfg.seed)
    distributed.init(resolve_device(cfg.device), cfg.dist_timeout)
    plan = resume.plan(cfg, out_dir, job)
    loop = Loop(job, cfg, out_dir, MetricsLog(None))
    if plan is not None:
        resume.restore(loop, plan)
        if cfg.resume == "force":
            loop.finished = None  # forcing on (say with a lower lr) reopens a converged/diverged run
    elif out_dir is not None and cfg.resume == "never" and distributed.is_main():
        resume.discard(out_dir)
    # Only now is anything written; one log, on rank 0.
    loop.log = log = resume.open_log(out_dir, plan) if distributed.is_main() else MetricsLog(None)
    try:
        with cpu_threads(job.model, loop.device), preempt.catch() as flag:
            loop.preempt = flag if out_dir is not None else None
            return loop.run()
    finally:
        log.close()
        loop.probe.close()


def save_outputs(job: Job, cfg: Config, result: Result, out_dir: Path) -> None:
    """Final weights (safetensors, unwrapped names), config, summary and the loss plot."""
    from gradtune.atomic import write_text
    from gradtune.report import plot_losses
    from gradtune.weights import save_state

    import yaml

    state = distributed.full_state_dict(job.model)  # collective under FSDP; {} except on rank 0
    if not distributed.is_main():
        return
    save_state(state, out_dir / "model.safetensors", metadata={"config_hash": cfg.hash()})
    write_text(out_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if job.save_extra is not None:  # what reloading needs beside the weights (tokenizer, labels)
        job.save_extra(out_dir)
    elif job.task == "lm":  # generation must decode exactly as training encoded
        from gradtune.job_text import save_tokenizer

        save_tokenizer(job, out_dir)
    summary = {"steps": result.steps, "epochs": result.epochs, "stop_reason": result.stop_reason,
               "train_loss": result.train_loss, "val_loss": result.val_loss, "metrics": result.metrics,
               "wall_time_s": result.wall_time, "job": job.info}
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    if cfg.plot and any(r.get("kind") == "eval" for r in result.history):
        plot_losses(result.history, out_dir / "loss.png", title=f"{cfg.model} on {Path(cfg.data).name}",
                    optimum=job.info.get("closed_form_loss"))


def train(cfg: Config) -> Result:
    """Build the job from ``cfg`` (validating every input first), train it, write the outputs."""
    from gradtune.job import build

    job = build(cfg)  # all bad input is rejected here, before anything is written
    if getattr(job.train, "lengths", None) is not None and resolve_device(cfg.device).type == "cpu":
        allocator.release_large_blocks()  # variable batch shapes would fragment the heap
    out_dir = Path(cfg.out_dir)
    with distributed.session(cfg):  # a no-op in one process
        result = fit(job, cfg, out_dir)
        result.info = job.info
        save_outputs(job, cfg, result, out_dir)
    return result
