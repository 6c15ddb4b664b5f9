"""Preference tuning (``task: preference``, DPO / IPO) of a pretrained causal LM: the data, the
reference and the objective, for ``pretrained.build_pretrained``.

Where the reference log-probabilities come from:

* ``method=lora``: the same model with its adapters disabled (``lora.adapters_disabled``) - the
  frozen base, bit for bit, at the cost of one forward pass (no backward) per micro-batch and no
  extra weights.
* every other method (full, freeze, bitfit): computed once, before the first step, with the
  untouched model, and stored with the pairs. Why not a frozen copy: it would hold a second
  model's weights for the whole run and run its forward every step of every epoch, where the
  reference's values never change; one pass over the pairs costs one epoch's forward work at
  most. The values are a pure function of the base weights and the data, so a resumed run
  recomputes exactly the same ones.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from gradtune.config import Config
from gradtune.data.preferences import PairDataset, load_preferences
from gradtune.data.split import split_indices
from gradtune.finetune import methods
from gradtune.finetune.lora import adapters_disabled
from gradtune.objectives.logits import forward
from gradtune.objectives.preference import Preference, sequence_logps
from gradtune.runtime import distributed
from gradtune.runtime.device import autocast, resolve_device
from gradtune.runtime.errors import GradtuneError


def check(cfg: Config) -> None:
    """Settings DPO cannot honour, refused before anything is read."""
    if cfg.dpo.loss == "ipo" and cfg.dpo.label_smoothing:
        raise GradtuneError("config: dpo.label_smoothing applies to dpo.loss=sigmoid only; set it to 0 for ipo")
    if cfg.text.packing:
        raise GradtuneError(
            "config: text.packing is not supported for task preference (each pair is scored "
            "as two whole sequences); set text.packing=false"
        )


def load(cfg: Config, path: str, tokenizer: Any) -> PairDataset:
    data = load_preferences(path, tokenizer, cfg.text.max_length, cfg.text.format, cfg.text.fields)
    data.pad_multiple = cfg.text.pad_to_multiple_of
    return data


def train_val(cfg: Config, tokenizer: Any) -> tuple[PairDataset, Optional[PairDataset]]:
    """(training pairs, validation pairs or None): finetune.eval_data, else a val_fraction split
    of the pairs."""
    data = load(cfg, cfg.data, tokenizer)
    if cfg.finetune.eval_data:
        return data, load(cfg, cfg.finetune.eval_data, tokenizer)
    train_idx, val_idx = split_indices(len(data), cfg.val_fraction, cfg.seed, ordered=True)
    val = data.subset(val_idx.tolist()) if len(val_idx) else None
    return data.subset(train_idx.tolist()), val


@torch.no_grad()
def precompute(model: nn.Module, data: PairDataset, chunk: int, device: torch.device, precision: str = "fp32") -> None:
    """``data.ref`` (N, 2): the model's summed response log-probabilities of (chosen, rejected)
    per pair, in eval mode, in chunks of ``chunk`` pairs, under training's autocast (bf16: the
    reference rounds like the policy, so that at step 0 they agree)."""
    was_training = model.training
    model.eval()
    out = []
    for idx in torch.arange(len(data)).split(chunk):
        batch = {k: v.to(device) for k, v in data.get(idx).items()}
        with autocast(precision, device):
            logps = sequence_logps(forward(model, batch), batch["labels"])[0].cpu()  # (2b,)
        out.append(torch.stack([logps[: len(idx)], logps[len(idx) :]], dim=1))  # (b, 2)
    data.ref = torch.cat(out)
    model.train(was_training)


def objective(cfg: Config, model: nn.Module, train: PairDataset, val: Optional[PairDataset]) -> Preference:
    """The DPO objective for ``model`` (already transformed by its method); for methods other
    than LoRA, the reference log-probabilities are precomputed into ``train`` and ``val`` here,
    while ``model`` is still the untouched base."""
    d = cfg.dpo
    if methods.body_method(cfg.method) == "lora":
        return Preference(d.beta, d.loss, d.label_smoothing, reference=adapters_disabled)
    device = distributed.device(resolve_device(cfg.device))
    model.to(device)  # where the loop would put it anyway
    chunk = cfg.micro_batch_size or (cfg.batch_size if cfg.batch_size != "full" else 8)
    for data in (train, val):
        if data is not None:
            precompute(model, data, chunk, device, cfg.precision)
    return Preference(d.beta, d.loss, d.label_smoothing)
