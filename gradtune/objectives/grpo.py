"""Group relative policy optimisation (GRPO, Shao et al. 2024, DeepSeekMath) with reward functions.

Per micro-batch of B prompts, inside the objective (the loop stays as it is):

1. **Rollout** (no gradient, eval mode): ``G = num_generations`` completions per prompt from the
   KV-cache sampler (``models/generate.py``), all B G rows in one batched call, cut after the
   first end token. The G rows of prompt ``i`` draw from a generator seeded from (seed, step,
   sample id of i) alone, so a resumed step samples the same completions, and neither the
   micro-batch split nor the number of ranks changes a draw: only the logits it draws from, by
   float rounding (another batch shape and padding; a token flips with about that probability).
2. **Rewards** r = sum_k w_k r_k (``rewards.py``) and group-relative advantages per prompt:
   A = (r - mean_group(r)) / (std_group(r) + 1e-4)   (unbiased std; ``scale_rewards=False``: no division).
3. **Loss** on the S = B G sequences (prompt + completion), per completion token t of row s:

       ratio  = exp(logp - logp_old)                 logp_old = logp.detach() (one update per rollout)
       l      = -min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A) + beta kl
       kl     = exp(ref - logp) - (ref - logp) - 1   (k3 estimator; ref: the reference's log-prob)

   with logp the log-softmax of logits / temperature (the distribution sampled from). The loss
   is the *sum* of l over completion tokens and the count the number of completion tokens, so
   the loop's one division makes it the token mean over the whole batch, all micro-batches and
   ranks together: TRL's ``loss_type="dapo"`` (``bnpo`` in one process without accumulation).

With ``logp_old = logp.detach()`` the ratio is 1 in value (its gradient is d logp), so the clip is
never active: the clip fraction is logged for completeness and stays 0, as in TRL with
``num_iterations=1``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from gradtune.data.dataset import Batch
from gradtune.data.sequences import IGNORE, pad
from gradtune.models import fast_decoder
from gradtune.models.generate import generate, takes_padding
from gradtune.objectives import rewards as reward_fns
from gradtune.objectives import shared_prompt
from gradtune.objectives.logits import trained_token_logps
from gradtune.objectives.output import Output

Reference = Callable[[nn.Module], contextlib.AbstractContextManager]


@dataclass
class Sampling:
    num_generations: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0


def seed_for(seed: int, step: int, source: int, sample_id: int) -> int:
    """A 63-bit generator seed from (run seed, step, data set, prompt): a pure function, so a
    prompt's completions depend on nothing else (split, ranks, what ran before)."""
    digest = hashlib.blake2b(f"grpo/{seed}/{source}/{step}/{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def advantages(rewards: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """Group-relative advantages (B, G) from rewards (B, G): centred on each group's mean and,
    with ``scale``, divided by its unbiased std + 1e-4 (TRL's constant)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + 1e-4) if scale else centred


def per_token_loss(
    logp: torch.Tensor, ref: Optional[torch.Tensor], adv: torch.Tensor, beta: float, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss (S, T), kl (S, T) or zeros, clipped (S, T) bool) from the policy's token log-probs
    (S, T), the reference's (S, T) (None: beta = 0) and the advantages (S,)."""
    ratio = torch.exp(logp - logp.detach())
    a = adv.unsqueeze(1)  # (S, 1)
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * a, clipped_ratio * a)
    kl = torch.zeros_like(logp)
    if ref is not None and beta:
        delta = ref - logp
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    clipped = ((ratio < 1 - eps_low) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0))
    return loss, kl, clipped


class GRPO:
    """The GRPO objective. ``sources``: tag -> prompt data set (``data/prompts.py``), to find a
    batch's rows; ``tokenizer`` decodes completions; ``reference(model)``: a context under which
    ``model`` is the reference (LoRA: adapters off), or ``ref_model``: a frozen copy; neither:
    no KL term (beta must be 0). ``step`` is set by the job's step clock (jobs/rl.py)."""

    def __init__(
        self,
        rewards: list[reward_fns.Reward],
        tokenizer: Any,
        sources: dict[int, Any],
        sampling: Sampling,
        beta: float = 0.04,
        epsilon: float = 0.2,
        epsilon_high: Optional[float] = None,
        scale_rewards: bool = True,
        seed: int = 0,
        reference: Optional[Reference] = None,
        ref_model: Optional[nn.Module] = None,
    ) -> None:
        self.rewards, self.tokenizer, self.sources, self.sampling = rewards, tokenizer, sources, sampling
        self.beta, self.eps_low = beta, epsilon
        self.eps_high = epsilon if epsilon_high is None else epsilon_high
        self.scale_rewards, self.seed = scale_rewards, seed
        self.reference, self.ref_model = reference, ref_model
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_id or 0)
        self.step = 0
        # Host sums per data set tag since the step clock last read them (jobs/rl.py): the
        # reward curve; the loop reports metric sums per token only.
        self.stats: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    # --- 1. rollout ------------------------------------------------------------------------------
    @torch.no_grad()
    def complete(self, model: nn.Module, batch: Batch) -> tuple[list[list[int]], list[list[int]]]:
        """(prompt ids per row, completion ids per row) for the S = B G rows, prompt-major;
        each completion ends at its first end token (kept) or at max_new_tokens.

        The B prompts are sampled in one batched call (left-padded; our GPT: one call per prompt
        length), each prompt's G rows drawing from its own generator: a decoding step reads every
        weight once for all S rows, where one call per prompt read them B times."""
        gen_model = getattr(model, "module", model)  # DDP: generate on the wrapped model, no hooks
        s, g = self.sampling, self.sampling.num_generations
        prompts, seeds = [], []
        for i in range(batch["prompt_ids"].shape[0]):
            prompts.append(batch["prompt_ids"][i, : int(batch["prompt_len"][i])].tolist())
            step = -1 if int(batch["source"][i]) else self.step  # validation: the same draws every time
            seeds.append(seed_for(self.seed, step, int(batch["source"][i]), int(batch["row"][i])))
        groups: dict[int, list[int]] = defaultdict(list)  # prompts sampled together
        padded = takes_padding(gen_model)
        for i, p in enumerate(prompts):
            groups[0 if padded else len(p)].append(i)
        completions: list[list[int]] = [[] for _ in range(len(prompts) * g)]
        for group in groups.values():
            ids, mask = self._left_padded([prompts[i] for i in group], batch["prompt_ids"].device)  # (|group| G, W)
            # keep_packed: one packing per step's weights, not per call (freed below, before the
            # step's backward: no higher peak memory)
            out = generate(
                gen_model,
                ids,
                s.max_new_tokens,
                s.temperature,
                None,
                s.top_p,
                [seeds[i] for i in group],
                self.eos_id,
                attention_mask=mask,
                keep_packed=True,
                repeats=g,  # each prompt's G rows: its prefill runs once
            )
            for k, row in enumerate(out[:, ids.shape[1] :].tolist()):
                if self.eos_id is not None and self.eos_id in row:
                    row = row[: row.index(self.eos_id) + 1]
                completions[group[k // g] * g + k % g] = row
        fast_decoder.forget(gen_model)
        return [p for p in prompts for _ in range(g)], completions

    def _left_padded(self, prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask (P G, W), each prompt repeated G times, pads on the left."""
        g, width = self.sampling.num_generations, max(len(p) for p in prompts)
        ids = [[self.pad_id] * (width - len(p)) + p for p in prompts for _ in range(g)]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts for _ in range(g)]
        return torch.tensor(ids, device=device), torch.tensor(mask, device=device)

    def rollout(self, model: nn.Module, batch: Batch) -> dict[str, Any]:
        """Sampled completions, their rewards and the padded sequences for the loss."""
        prompts, completions = self.complete(model, batch)
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        return self.scored(batch, prompts, completions, texts)

    def scored(
        self, batch: Batch, prompts: list[list[int]], completions: list[list[int]], texts: list[str]
    ) -> dict[str, Any]:
        """The rollout of given completions (prompt-major, G per prompt): rewards per function
        (K, S), their weighted sum (S,), and input_ids / attention_mask / labels (S, L)."""
        g = self.sampling.num_generations
        data = [(self.sources[int(src)], int(r)) for src, r in zip(batch["source"], batch["row"])]
        prompt_of = [d.texts[r] for d, r in data for _ in range(g)]
        keys = sorted({k for d, r in data for k in d.rows[r]})
        columns = {k: [d.rows[r].get(k) for d, r in data for _ in range(g)] for k in keys}
        per_fn = torch.tensor(
            [reward_fns.score(rw, prompt_of, texts, columns) for rw in self.rewards], dtype=torch.float64
        )  # (K, S)
        weights = torch.tensor([rw.weight for rw in self.rewards], dtype=torch.float64)
        seqs = [p + c for p, c in zip(prompts, completions)]
        labels = [[IGNORE] * len(p) + c for p, c in zip(prompts, completions)]
        return {
            "input_ids": pad(seqs, self.pad_id),
            "attention_mask": pad([[1] * len(x) for x in seqs], 0),
            "labels": pad(labels, IGNORE),
            "per_fn": per_fn,
            "rewards": (weights.unsqueeze(1) * per_fn).sum(0),  # (S,)
        }

    # --- 3. loss ---------------------------------------------------------------------------------
    def token_logps(self, model: nn.Module, seq: Batch) -> torch.Tensor:
        """(S, L-1) log-probabilities of the completion tokens: each prompt's forward once for its
        G rows where the model allows it (objectives/shared_prompt.py), else the whole rows."""
        t, g = self.sampling.temperature, self.sampling.num_generations
        shared = shared_prompt.group_logps(model, seq["input_ids"], seq["attention_mask"], seq["labels"], g, t)
        return shared if shared is not None else trained_token_logps(model, seq, seq["labels"], t)

    def reference_logps(self, model: nn.Module, seq: Batch) -> Optional[torch.Tensor]:
        if not self.beta:
            return None
        with torch.no_grad():
            if self.ref_model is not None:
                return self.token_logps(self.ref_model, seq)
            with self.reference(model) if self.reference is not None else contextlib.nullcontext():
                return self.token_logps(model, seq)

    def loss(self, model: nn.Module, roll: dict[str, Any], source: int = 0) -> Output:
        """The GRPO loss sum and completion-token count of a scored rollout."""
        dev = roll["input_ids"].device
        seq = {k: roll[k] for k in ("input_ids", "attention_mask", "labels")}
        ref = self.reference_logps(model, seq)  # first: its logits are freed before the policy's are held
        logp = self.token_logps(model, seq)  # (S, L-1)
        mask = (seq["labels"][:, 1:] != IGNORE).to(logp.dtype)
        g = self.sampling.num_generations
        rewards = roll["rewards"]
        adv = advantages(rewards.view(-1, g), self.scale_rewards).reshape(-1).to(dev, logp.dtype)  # (S,)
        loss, kl, clipped = per_token_loss(logp, ref, adv, self.beta, self.eps_low, self.eps_high)
        count = mask.sum()
        with torch.no_grad():
            metrics = {
                "kl": (kl * mask).sum(),
                "clipped": (clipped * mask).sum(),
                # per completion, not per token: evaluation divides these two (reward in metrics.jsonl)
                "reward_sum": rewards.sum().to(dev, mask.dtype),
                "completions": torch.tensor(float(rewards.numel()), device=dev, dtype=mask.dtype),
            }
        self.record(source, roll, float(metrics["kl"]), float(metrics["clipped"]))
        return Output((loss * mask).sum(), count.long(), metrics)

    def record(self, source: int, roll: dict[str, Any], kl: float = 0.0, clipped: float = 0.0) -> None:
        """Add a scored rollout's reward sums (and KL / clipped token sums) to ``stats[source]``."""
        st = self.stats[source]
        r = roll["rewards"]
        st["completions"] += r.numel()
        st["tokens"] += float((roll["labels"][:, 1:] != IGNORE).sum())
        st["kl"] += kl
        st["clipped"] += clipped
        st["reward"] += float(r.sum())
        st["reward_sq"] += float((r * r).sum())
        for rw, values in zip(self.rewards, roll["per_fn"]):
            st[f"reward/{rw.name}"] += float(values.sum())
            st[f"reward/{rw.name}_sq"] += float((values * values).sum())

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        roll = self.rollout(model, batch)
        dev = batch["prompt_ids"].device
        for k in ("input_ids", "attention_mask", "labels"):
            roll[k] = roll[k].to(dev)
        return self.loss(model, roll, int(batch["source"][0]))


def summary(stats: dict[str, float]) -> dict[str, float]:
    """Means from the sums ``GRPO.stats`` keeps: reward mean/std overall and per function (per
    completion), KL and clip fraction (per completion token), completion length (tokens)."""
    n, tokens = max(stats.get("completions", 0.0), 1.0), max(stats.get("tokens", 0.0), 1.0)
    out = {}
    for key in [k for k in stats if k == "reward" or (k.startswith("reward/") and not k.endswith("_sq"))]:
        mean = stats[key] / n
        out[key] = mean
        out[f"{key}_std"] = max(stats[f"{key}_sq"] / n - mean * mean, 0.0) ** 0.5
    out["kl"] = stats.get("kl", 0.0) / tokens
    out["clip_fraction"] = stats.get("clipped", 0.0) / tokens
    out["completion_length"] = stats.get("tokens", 0.0) / n
    return out
