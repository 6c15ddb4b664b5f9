"""objectives/logits.py ``forward_trained``: a causal LM's logits from the first position that
predicts a trained label, against the full (B, T, V) logits (the oracle): the same loss sum and
count, the same per-sequence log-probabilities, and the head really run over fewer positions."""

import pytest
import torch

from gradtune.data.sequences import IGNORE
from gradtune.objectives.causal_lm import CausalLM
from gradtune.objectives.logits import forward, forward_trained
from gradtune.objectives.preference import sequence_logps

pytest.importorskip("transformers")
from tests import tiny_hf  # noqa: E402


def _batch(prompt: list[int]) -> dict[str, torch.Tensor]:
    """3 rows of 12 tokens, right-padded; the first ``prompt[i]`` labels of row i ignored."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # a shorter row: padding, ignored
    labels = ids.masked_fill(mask == 0, IGNORE)
    for i, p in enumerate(prompt):
        labels[i, :p] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("prompt", [[5, 7, 6], [1, 1, 1], [0, 11, 11]])
def test_loss_and_logps_equal_the_full_logits(prompt):
    model = tiny_hf.llama().eval().double()  # float64: equal to ~1e-15, whatever the shapes
    batch = _batch(prompt)
    with torch.no_grad():
        full = forward(model, batch)  # (B, T, V)
        kept, labels = forward_trained(model, batch, batch["labels"])
        first = min(prompt)  # the first trained label's position, over the rows
        keep = 12 - max(first - 1, 0)
        assert kept.shape == (3, min(keep, 12), full.shape[-1]) and labels.shape == kept.shape[:2]
        torch.testing.assert_close(kept, full[:, 12 - kept.shape[1] :], rtol=0, atol=1e-12)
        ours, theirs = sequence_logps(kept, labels), sequence_logps(full, batch["labels"])
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        out = CausalLM(shift=True, token_accuracy=True)(model, batch)
        flat, targets = full[:, :-1].reshape(-1, full.shape[-1]), batch["labels"][:, 1:].reshape(-1)
        ref = torch.nn.functional.cross_entropy(flat, targets, ignore_index=IGNORE, reduction="sum")
        torch.testing.assert_close(out.loss_sum, ref, rtol=0, atol=1e-10)
        assert int(out.count) == int((batch["labels"][:, 1:] != IGNORE).sum())


def test_a_model_without_logits_to_keep_gives_every_position():
    class Plain(torch.nn.Module):  # forward(input_ids, attention_mask): no logits_to_keep
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(64, 64)

        def forward(self, input_ids, attention_mask=None):
            return self.emb(input_ids)

    batch = _batch([5, 7, 6])
    logits, labels = forward_trained(Plain(), batch, batch["labels"])
    assert logits.shape[:2] == (3, 12) and labels is batch["labels"]
