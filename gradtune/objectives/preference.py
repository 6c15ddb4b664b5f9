"""Preference tuning: DPO (Rafailov et al. 2023), IPO (Azar et al. 2023), and the losses in
``preference_losses.py`` (SimPO, ORPO: no reference; KTO: unpaired good / bad responses).

For a pair (prompt x, chosen y_c, rejected y_r), with pi / ref the summed log-probabilities of
the response tokens under the trained policy and the frozen reference:

    z = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    sigmoid:  -(1 - ls) * log sigmoid(z) - ls * log sigmoid(-z)     (ls: label_smoothing, cDPO)
    ipo:      ((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r - 1 / (2 beta))^2

IPO divides each log-ratio by its response's token count n (TRL's normalisation, which its
authors confirmed matches the IPO paper's results). Rewards, as logged by TRL: beta * (pi - ref)
per response (SimPO / ORPO: beta * mean token log-probability, as TRL); margin = chosen -
rejected; accuracy = share of pairs with margin > 0. KTO (rows are single responses): accuracy
= share of responses on their label's side of the reference point (beta (r - z0) > 0 for good
ones, < 0 for bad), margin = mean of beta (r - z0) signed by the label, kl = z0.

The batch holds B pairs as 2B sequences (rows [0, B) chosen, [B, 2B) rejected, see
``data/preferences.py``). The loss is a *sum* over pairs and the count the number of pairs, so
the loop's one division makes micro-batched and multi-process updates equal the one-shot one.
Where the reference comes from is the job's choice: ``ref_logps`` (B, 2) in the batch
(precomputed), or a context under which the same model computes the reference (LoRA with its
adapters disabled).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import nn

from gradtune.data.dataset import Batch
from gradtune.data.sequences import IGNORE
from gradtune.objectives import shared_prompt
from gradtune.objectives.logits import token_logps, trained_token_logps
from gradtune.objectives.output import Output
from gradtune.objectives.preference_losses import REFERENCE_FREE, kto_kl, kto_losses, pair_losses

# Metric sums the objective returns; the loop reports each divided by the pair count.
METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "kl")

Reference = Callable[[nn.Module], contextlib.AbstractContextManager]


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's scored tokens (S,), their count (S,)) from
    logits (S, T, V) and labels (S, T) aligned with the inputs (IGNORE: not scored); the logits
    at t score the label at t+1."""
    return token_logps(logits, labels).sum(-1), (labels[:, 1:] != IGNORE).sum(-1)


def model_sequence_logps(model: nn.Module, batch: Batch, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequence_logps`` of ``model`` on ``batch``: each pair's prompt run once for both answers
    where the model allows it (``shared_prompt.pair_logps``), else the whole rows with the LM head
    run only where an answer is scored (``trained_token_logps``); the same values either way, up
    to float rounding."""
    shared = shared_prompt.pair_logps(model, batch, labels)  # each pair's prompt run once, where it can
    logps = shared if shared is not None else trained_token_logps(model, batch, labels)
    return logps.sum(-1), (labels[:, 1:] != IGNORE).sum(-1)


class Preference:
    """A preference loss on a batch of 2B sequences. ``reference(model)``: a context under which
    ``model`` computes the reference; None: the batch carries ``ref_logps`` (B, 2) (or the loss
    needs no reference). KTO batches carry ``label`` (B,) bool, rows [0, B) the responses and
    rows [B, 2B) the mismatched (prompt, other completion) sequences of its reference point."""

    def __init__(
        self,
        beta: float = 0.1,
        loss: str = "sigmoid",
        label_smoothing: float = 0.0,
        reference: Optional[Reference] = None,
        gamma: float = 0.5,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        attention_mask: bool = True,
    ) -> None:
        self.beta, self.loss, self.label_smoothing = beta, loss, label_smoothing
        # False: the model takes no mask (our GPT); right padding cannot reach a causal model's scored positions
        self.attention_mask = attention_mask
        self.reference = reference
        self.gamma, self.desirable_weight, self.undesirable_weight = gamma, desirable_weight, undesirable_weight

    def reference_logps(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(2B,) reference log-probabilities, no gradient: chosen rows then rejected rows."""
        if "ref_logps" in batch:
            ref = batch["ref_logps"]  # (B, 2): chosen, rejected
            return torch.cat([ref[:, 0], ref[:, 1]])
        if self.reference is None:
            raise ValueError("Preference: no reference (neither ref_logps in the batch nor a reference context)")
        with torch.no_grad(), self.reference(model):
            return model_sequence_logps(model, self._inputs(batch), batch["labels"])[0]

    def _inputs(self, batch: Batch) -> Batch:
        return batch if self.attention_mask else {k: v for k, v in batch.items() if k != "attention_mask"}

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        labels = batch["labels"]  # (2B, T)
        pairs = labels.shape[0] // 2
        # Reference first: its logits are freed before the policy's activations are held.
        ref = None if self.loss in REFERENCE_FREE else self.reference_logps(model, batch)
        logps, n = model_sequence_logps(model, self._inputs(batch), labels)  # (2B,), (2B,)
        if self.loss == "kto":
            return self._kto(logps, ref.to(logps.dtype), batch["label"].bool(), pairs)
        pi_c, pi_r, n_c, n_r = logps[:pairs], logps[pairs:], n[:pairs], n[pairs:]
        if ref is None:  # reference-free: rewards are beta * mean token log-probability (TRL)
            ref_c = ref_r = torch.zeros_like(pi_c)
            r_c, r_r = self.beta * pi_c / n_c.clamp(min=1), self.beta * pi_r / n_r.clamp(min=1)
        else:
            ref = ref.to(logps.dtype)
            ref_c, ref_r = ref[:pairs], ref[pairs:]
            r_c, r_r = self.beta * (pi_c - ref_c), self.beta * (pi_r - ref_r)
        per_pair = pair_losses(
            pi_c, pi_r, ref_c, ref_r, n_c, n_r, self.beta, self.loss, self.label_smoothing, self.gamma
        )
        r_c, r_r = r_c.detach(), r_r.detach()
        metrics = {
            "rewards_chosen": r_c.sum(),
            "rewards_rejected": r_r.sum(),
            "reward_margin": (r_c - r_r).sum(),
            "reward_accuracy": (r_c > r_r).sum(),
        }
        return Output(per_pair.sum(), pairs, metrics)

    def _kto(self, logps: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, rows: int) -> Output:
        pi, pi_kl, ref_r, ref_kl = logps[:rows], logps[rows:], ref[:rows], ref[rows:]
        z0 = kto_kl(pi_kl, ref_kl)
        per = kto_losses(pi, ref_r, z0, desirable, self.beta, self.desirable_weight, self.undesirable_weight)
        signed = torch.where(desirable, 1.0, -1.0).to(pi.dtype) * self.beta * (pi - ref_r - z0).detach()
        metrics = {"reward_margin": signed.sum(), "reward_accuracy": (signed > 0).sum(), "kl": z0 * rows}
        return Output(per.sum(), rows, metrics)
