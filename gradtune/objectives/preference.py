"""Direct preference optimisation (DPO, Rafailov et al. 2023) and IPO (Azar et al. 2023).

For a pair (prompt x, chosen y_c, rejected y_r), with pi / ref the summed log-probabilities of
the response tokens under the trained policy and the frozen reference:

    z = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    sigmoid:  -(1 - ls) * log sigmoid(z) - ls * log sigmoid(-z)     (ls: label_smoothing, cDPO)
    ipo:      ((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r - 1 / (2 beta))^2

IPO divides each log-ratio by its response's token count n (TRL's normalisation, which its
authors confirmed matches the IPO paper's results). Rewards, as logged by TRL: beta * (pi - ref)
per response; margin = chosen - rejected; accuracy = share of pairs with margin > 0.

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
import torch.nn.functional as F
from torch import nn

from gradtune.data.dataset import Batch
from gradtune.data.sequences import IGNORE
from gradtune.objectives.logits import float32, forward
from gradtune.objectives.output import Output

# Metric sums the objective returns; the loop reports each divided by the pair count.
METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")

Reference = Callable[[nn.Module], contextlib.AbstractContextManager]


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's scored tokens (S,), their count (S,)) from
    logits (S, T, V) and labels (S, T) aligned with the inputs (IGNORE: not scored); the logits
    at t score the label at t+1."""
    logits, labels = float32(logits[:, :-1]), labels[:, 1:]  # (S, T-1, V), (S, T-1)
    # cross_entropy fuses log-softmax and gather; it is 0 at ignored positions.
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(labels.shape)
    return -nll.sum(-1), (labels != IGNORE).sum(-1)


def pair_losses(
    pi_c: torch.Tensor,
    pi_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    n_c: torch.Tensor,
    n_r: torch.Tensor,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair loss (B,) from per-sequence log-probabilities (B,) and response token counts (B,)."""
    if loss == "ipo":
        delta = (pi_c - ref_c) / n_c.clamp(min=1) - (pi_r - ref_r) / n_r.clamp(min=1)
        return (delta - 1 / (2 * beta)) ** 2
    z = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    out = -F.logsigmoid(z)
    if label_smoothing:
        out = out * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    return out


class Preference:
    """DPO / IPO on a batch of pairs. ``reference(model)``: a context under which ``model``
    computes the reference; None: the batch carries ``ref_logps`` (B, 2)."""

    def __init__(
        self,
        beta: float = 0.1,
        loss: str = "sigmoid",
        label_smoothing: float = 0.0,
        reference: Optional[Reference] = None,
    ) -> None:
        self.beta, self.loss, self.label_smoothing = beta, loss, label_smoothing
        self.reference = reference

    def reference_logps(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(2B,) reference log-probabilities, no gradient: chosen rows then rejected rows."""
        if "ref_logps" in batch:
            ref = batch["ref_logps"]  # (B, 2): chosen, rejected
            return torch.cat([ref[:, 0], ref[:, 1]])
        if self.reference is None:
            raise ValueError("Preference: no reference (neither ref_logps in the batch nor a reference context)")
        with torch.no_grad(), self.reference(model):
            return sequence_logps(forward(model, batch), batch["labels"])[0]

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        labels = batch["labels"]  # (2B, T)
        pairs = labels.shape[0] // 2
        # Reference first: its logits are freed before the policy's activations are held.
        ref = self.reference_logps(model, batch)
        logps, n = sequence_logps(forward(model, batch), labels)  # (2B,), (2B,)
        ref = ref.to(logps.dtype)
        pi_c, pi_r, ref_c, ref_r = logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:]
        per_pair = pair_losses(
            pi_c, pi_r, ref_c, ref_r, n[:pairs], n[pairs:], self.beta, self.loss, self.label_smoothing
        )
        with torch.no_grad():
            r_c, r_r = self.beta * (pi_c - ref_c), self.beta * (pi_r - ref_r)
            metrics = {
                "rewards_chosen": r_c.sum(),
                "rewards_rejected": r_r.sum(),
                "reward_margin": (r_c - r_r).sum(),
                "reward_accuracy": (r_c > r_r).sum(),
            }
        return Output(per_pair.sum(), pairs, metrics)
