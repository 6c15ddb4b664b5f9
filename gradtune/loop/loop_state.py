"""What a checkpoint holds of the loop, and how it comes back: ``Loop``'s state methods (the
Loop class is split over two files to stay readable; ``LoopState`` is only ever a base of it).

Weights are saved apart from the rest (checkpoint.py); under FSDP2 every rank writes its shards
of the weights and the optimizer (state/sharded.py) and state.json says the optimizer is there.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch

from gradtune.models.weights import dedupe
from gradtune.runtime import distributed, rank_zero
from gradtune.runtime.errors import GradtuneError
from gradtune.state import checkpoint, model_weights, resume, sharded


class LoopState:
    """state_dict / load_state_dict / restore / save_checkpoint of ``gradtune.loop.loop.Loop``."""

    def state_dict(self) -> dict[str, Any]:
        """Everything the next step depends on, except the weights (saved apart, see checkpoint.py).

        The schedule needs only the step (lr is a pure function of it) and the rollback scale;
        the data position is the sampler's (epoch, index) - ``micro_index`` is always 0 because
        checkpoints are taken between steps, never inside an accumulation window.
        """
        s = self.sampler
        return {
            "step": self.step,
            "skipped": self.skipped,
            "finished": self.finished,
            "schedule": {"step": self.step, "lr_scale": self.lr_scale, "lr": self.opt.param_groups[0]["lr"]},
            "data": {**s.state(), "micro_index": 0, "n": s.n, "seed": s.seed, "order_sha256": s.order_digest()},
            "optimizer": self.opt.state_dict(),
            "guard": self.guard.state(),
            "stopper": self.stopper.state(),
            "sums": {"loss": self.run_loss, "count": self.run_count, "metrics": dict(self.run_metrics)},
            "last_gnorm": self.last_gnorm,  # a float, or a 0-d tensor (CUDA/DTensor gradients)
            "metrics_rows": len(self.log.rows),
            "data_fingerprint": self.job.info.get("data_fingerprint"),  # resume refuses changed data
            "rng": checkpoint.rng_state(),
            # Each component's state under its key (plateau, noise, budget: max_time's fixed step
            # budget); the callbacks' (early stopping, yours) as one list under "callbacks".
            **self.events.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``state_dict`` (the weights are loaded by ``restore``)."""
        self.step, self.skipped, self.finished = int(state["step"]), int(state["skipped"]), state["finished"]
        self.lr_scale = float(state["schedule"]["lr_scale"])
        if state["optimizer"] != sharded.IN_SHARDS:  # else restore() has loaded it
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
        self.events.load_state_dict(state)  # components (the step budget: never re-calibrated) and callbacks

    def restore(self, found: resume.Plan) -> None:
        """Load the weights and every state of checkpoint ``found`` (resume, and rollback)."""
        try:
            state = found.state
            if sharded.is_sharded(found.folder):  # FSDP2 shards, read at this world size (DCP reshards)
                sharded.restore(found.folder, self.model, self.opt)
            elif distributed.is_sharded(self.model):  # a one-file checkpoint into FSDP2
                sharded.load_full(self.model, self.opt, found.model, state["optimizer"])
                state = {**state, "optimizer": sharded.IN_SHARDS}
            else:
                model_weights.copy_into(self.model, found.model)
            self.load_state_dict(state)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
            raise GradtuneError(f"{found.folder}: state does not restore ({type(e).__name__}: {e})") from None
        self.saved_step = self.step

    def save_checkpoint(self, root: Optional[Path] = None, keep: Optional[int] = None) -> Path:
        """A checkpoint of now under ``root``: by default out_dir/checkpoints (the resume chain,
        keeping ``keep_checkpoints``); early stopping keeps its best under out_dir/best/."""
        chain = root is None
        t0 = time.perf_counter()
        root = self.ckpt_root if chain else root
        assert root is not None
        cfg = self.cfg
        keep = cfg.keep_checkpoints if keep is None else keep
        if distributed.is_sharded(self.model):  # every rank writes its shards (state/sharded.py)
            state = {**self.state_dict(), "optimizer": sharded.IN_SHARDS}
            path = sharded.save(root, self.step, self.model, self.opt, state, cfg.to_dict(), cfg.hash(), keep)
        else:
            # Unwrapped names (no `module.`), tied weights once, written by rank 0 only.
            model_state = dedupe(distributed.full_state_dict(self.model)) if distributed.is_main() else {}
            path = rank_zero.on_main(
                checkpoint.save, root, self.step, model_state, self.state_dict(), cfg.to_dict(), cfg.hash(), keep
            )
        if chain:
            self.saved_step = self.step
            self.events.emit("on_checkpoint", path)
        self.phases.ckpt += time.perf_counter() - t0
        self.phases.ckpt_n += 1
        return path
