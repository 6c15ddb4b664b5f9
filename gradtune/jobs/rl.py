"""Reinforcement learning (``task: rl``, GRPO) of a pretrained causal LM: prompts, reward
functions, the reference and the objective, for ``pretrained.build_pretrained``.

The reference (for the KL penalty, ``rl.beta`` > 0):

* ``method=lora``: the same model with its adapters disabled - the frozen base, bit for bit, at
  the cost of one forward pass (no backward) per micro-batch.
* every other method: a frozen copy of the model taken now, before the first step. Completions
  are sampled online, so there is nothing to precompute (unlike DPO's fixed pairs).

The step clock (``StepClock``) is a callback on every rank: it gives the objective the number of
applied steps (the sampling seed; saved in checkpoints, so a resumed step samples the same
completions), and after each step writes the step's reward statistics, summed over ranks, to
``out_dir/rl.jsonl`` and one line to the terminal.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from gradtune.config import Config
from gradtune.data.prompts import PromptDataset, load_prompts
from gradtune.data.split import split_indices
from gradtune.finetune import methods
from gradtune.finetune.lora import adapters_disabled
from gradtune.objectives import grpo, rewards
from gradtune.runtime import distributed
from gradtune.runtime.errors import GradtuneError

LOG = "rl.jsonl"


def check(cfg: Config) -> list[rewards.Reward]:
    """Settings GRPO cannot honour, refused before anything is read; the reward functions,
    imported."""
    if cfg.text.packing:
        raise GradtuneError("config: text.packing is not supported for task rl (completions are sampled per prompt)")
    if cfg.distributed == "fsdp":
        raise GradtuneError("config: task rl samples with the whole model on each rank: use distributed=ddp or auto")
    r = cfg.rl
    return rewards.load(r.rewards, r.format_pattern, r.answer_column)


def probe(funcs: list[rewards.Reward], data: PromptDataset) -> None:
    """Call every reward function once on the first prompt with two stand-in completions: a
    function with the wrong arity, a missing column, the wrong length or a NaN fails now, before
    anything is written, not after the first rollout."""
    columns = {k: [v, v] for k, v in data.rows[0].items()}
    for rw in funcs:
        rewards.score(rw, [data.texts[0]] * 2, ["", "<answer>0</answer>"], columns)


def train_val(cfg: Config, tokenizer: Any) -> tuple[PromptDataset, Optional[PromptDataset]]:
    """(training prompts, validation prompts or None): finetune.eval_data, else a val_fraction
    split (each validation prompt costs num_generations sampled completions per evaluation)."""
    data = load_prompts(cfg.data, tokenizer, cfg.text.max_length)
    if cfg.finetune.eval_data:
        val = load_prompts(cfg.finetune.eval_data, tokenizer, cfg.text.max_length)
    else:
        train_idx, val_idx = split_indices(len(data), cfg.val_fraction, cfg.seed, ordered=True)
        val = data.subset(val_idx.tolist()) if len(val_idx) else None
        data = data.subset(train_idx.tolist())
    if val is not None:
        val.tag = 1
    return data, val


def objective(
    cfg: Config,
    model: nn.Module,
    tokenizer: Any,
    funcs: list[rewards.Reward],
    train: PromptDataset,
    val: Optional[PromptDataset],
) -> grpo.GRPO:
    """The GRPO objective for ``model`` (already transformed by its method)."""
    r = cfg.rl
    if tokenizer.eos_token_id is None:
        raise GradtuneError(f"{cfg.model}: the tokenizer has no end-of-sequence token to end completions")
    lora = methods.body_method(cfg.method) == "lora"
    ref_model = None
    if r.beta and not lora:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    sources = {0: train} if val is None else {0: train, 1: val}
    return grpo.GRPO(
        funcs,
        tokenizer,
        sources,
        grpo.Sampling(r.num_generations, r.max_new_tokens, r.temperature, r.top_p),
        beta=r.beta,
        epsilon=r.epsilon,
        epsilon_high=r.epsilon_high,
        scale_rewards=r.scale_rewards,
        seed=cfg.seed,
        reference=adapters_disabled if lora and r.beta else None,
        ref_model=ref_model,
    )


def _reduced(stats: dict[str, float]) -> dict[str, float]:
    """Sums over ranks (every rank calls this at the same step, in key order)."""
    if not distributed.active():
        return dict(stats)
    keys = sorted(stats)
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return dict(zip(keys, t.cpu().tolist()))


class StepClock:
    """A loop callback (gradtune.loop.callbacks.Callback's interface; this layer may not import
    it) on every rank: the objective's step, and the reward curve in ``out_dir/rl.jsonl``."""

    all_ranks = True

    def __init__(self, objective: grpo.GRPO) -> None:
        self.objective = objective
        self.path: Optional[Path] = None

    def on_train_begin(self, control: Any) -> None:
        if control.out_dir is None or not distributed.is_main():
            return
        self.path = Path(control.out_dir) / LOG
        if self.path.exists():  # a resumed run: the rows of steps it will run again go
            step = self.objective.step
            rows = [line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
            self.path.write_text("".join(line + "\n" for line in rows))

    def _write(self, row: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def on_step_end(self, step: int, loss: float, lr: float) -> Optional[str]:
        self.objective.step = step
        stats = _reduced(self.objective.stats.pop(0, {}))
        if distributed.is_main() and stats:
            row = {"step": step, **{k: round(v, 6) for k, v in grpo.summary(stats).items()}}
            self._write(row)
            parts = " ".join(f"{k}={v:.3g}" for k, v in row.items() if k != "step" and not k.endswith("_std"))
            print(f"rl: step {step} {parts}", flush=True)
        return None

    def on_evaluate(self, step: int, metrics: dict[str, Any]) -> Optional[str]:
        stats = _reduced(self.objective.stats.pop(1, {}))
        if distributed.is_main() and stats:
            self._write({"step": step, **{f"val_{k}": round(v, 6) for k, v in grpo.summary(stats).items()}})
        return None

    def on_checkpoint(self, path: Path) -> None:
        pass

    def on_train_end(self, result: Any) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.objective.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.objective.step = int(state["step"])


def eval_prompts(cfg: Config, tokenizer: Any, path: Optional[str]) -> PromptDataset:
    """The prompts ``gradtune eval`` scores: ``path``, else ``finetune.eval_data``, else the
    run's own validation split (tagged as validation: the same seeded draws as training's)."""
    if path is None and not cfg.finetune.eval_data:
        _, val = train_val(cfg, tokenizer)
        if val is None:
            raise GradtuneError("eval: the run trained with val_fraction=0, so it has no validation split; give --data")
        return val
    data = load_prompts(path or cfg.finetune.eval_data, tokenizer, cfg.text.max_length)
    data.tag = 1
    return data


@torch.no_grad()
def mean_reward(cfg: Config, model: nn.Module, tokenizer: Any, path: Optional[str], batch: int) -> dict[str, float]:
    """``gradtune eval`` on an RL run: num_generations completions per prompt of ``path`` (seeded
    as validation prompts are during training), scored by the run's reward functions: mean and
    std reward per function and overall, completion length. No KL (no reference here)."""
    funcs = check(cfg)
    data = eval_prompts(cfg, tokenizer, path)
    probe(funcs, data)
    r = cfg.rl
    sampling = grpo.Sampling(r.num_generations, r.max_new_tokens, r.temperature, r.top_p)
    obj = grpo.GRPO(funcs, tokenizer, {1: data}, sampling, beta=0.0, seed=cfg.seed)
    for idx in torch.arange(len(data)).split(batch):
        obj.record(1, obj.rollout(model, data.get(idx)))
    out = grpo.summary(obj.stats[1])
    out.pop("kl")
    out.pop("clip_fraction")
    return {"n": float(len(data)), **out}
