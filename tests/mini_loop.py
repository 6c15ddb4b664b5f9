"""A minimal, temporary training loop for the fine-tuning tests (the real one is gradtune.train).

Sum-loss over the batch divided by its count, AdamW on the trainable parameters, fixed-seed
shuffling; the audit runs after the first step.
"""

from __future__ import annotations

import torch

from gradtune.finetune import audit


def train(model, objective, dataset, steps: int, lr: float, batch_size: int = 8, seed: int = 0,
          expect_trainable=None, epochs_max: int | None = None, log_every: int = 0) -> list[float]:
    """Run ``steps`` optimizer steps (or ``epochs_max`` passes); returns the per-step mean losses."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses, step, epoch = [], 0, 0
    while step < steps and (epochs_max is None or epoch < epochs_max):
        for idx in torch.randperm(len(dataset), generator=g).split(batch_size):
            snapshot = audit.before(model, expect_trainable) if step == 0 else None
            out = objective(model, dataset.get(idx))
            loss = out.loss_sum / out.count
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if snapshot is not None:
                audit.check(model, snapshot)
            losses.append(loss.item())
            step += 1
            if log_every and step % log_every == 0:
                print(f"step {step} loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True)
            if step >= steps:
                break
        epoch += 1
    return losses


@torch.no_grad()
def evaluate(model, objective, dataset, batch_size: int = 64) -> dict[str, float]:
    """Mean loss and accuracy (``correct`` / count) over the whole dataset."""
    model.eval()
    loss = correct = count = 0.0
    for idx in torch.arange(len(dataset)).split(batch_size):
        out = objective(model, dataset.get(idx))
        loss += out.loss_sum.item()
        correct += out.metrics.get("correct", torch.tensor(0)).item()
        count += out.count.item()
    model.train()
    return {"loss": loss / count, "accuracy": correct / count}
