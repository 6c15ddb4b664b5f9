"""Preference tuning (``task: preference``, ``dpo.loss``: DPO, IPO, SimPO, ORPO, KTO) of a
pretrained causal LM: the data, the reference and the objective, for ``pretrained.build_pretrained``.

SimPO and ORPO need no reference: nothing is precomputed and LoRA runs no adapters-off pass.
KTO reads unpaired rows (``data/unpaired.py``) into the pairs' layout, so what follows holds
for it as for pairs.

Where the reference log-probabilities come from:

* ``method=lora``: the same model with its adapters disabled (``lora.adapters_disabled``) - the
  frozen base, bit for bit, at the cost of one forward pass (no backward) per micro-batch and no
  extra weights.
* every other method (full, freeze, bitfit): computed once, before the first step, with the
  untouched model, and stored with the pairs. Why not a frozen copy: it would hold a second
  model's weights for the whole run and run its forward every step of every epoch, where the
  reference's values never change; one pass over the pairs costs one epoch's forward work at
  most. The values are a pure function of the base weights and the data, so a resumed run
  recomputes exactly the same ones. Under torchrun each rank computes a contiguous share of the
  pairs, and one all-reduce of the (N, 2) table gives every rank the whole of it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from gradtune.config import Config
from gradtune.data.preferences import PairDataset, load_preferences
from gradtune.data.split import split_indices
from gradtune.data.unpaired import load_unpaired
from gradtune.finetune import methods
from gradtune.finetune.lora import adapters_disabled
from gradtune.models import hf
from gradtune.models.gpt import GPT
from gradtune.objectives.preference import Preference, model_sequence_logps
from gradtune.objectives.preference_losses import REFERENCE_FREE
from gradtune.runtime import distributed
from gradtune.runtime.device import autocast, resolve_device
from gradtune.runtime.errors import GradtuneError


def check(cfg: Config) -> None:
    """Settings DPO cannot honour, refused before anything is read."""
    if cfg.dpo.loss not in ("sigmoid", "simpo") and cfg.dpo.label_smoothing:
        raise GradtuneError(
            f"config: dpo.label_smoothing applies to dpo.loss=sigmoid or simpo only; set it to 0 for {cfg.dpo.loss}"
        )
    if cfg.text.packing:
        raise GradtuneError(
            "config: text.packing is not supported for task preference (each pair is scored "
            "as two whole sequences); set text.packing=false"
        )


def load(cfg: Config, path: str, tokenizer: Any) -> PairDataset:
    # our GPT attends over at most block_size positions
    n = min(cfg.text.max_length, cfg.gpt.block_size) if cfg.model == "gpt" else cfg.text.max_length
    if cfg.dpo.loss == "kto":
        data = load_unpaired(path, tokenizer, n)
    else:
        data = load_preferences(path, tokenizer, n, cfg.text.format, cfg.text.fields)
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
    reference rounds like the policy, so that at step 0 they agree). Under torchrun this rank
    computes only its contiguous share (``distributed.shard``) and the table is summed across
    ranks (every other rank's rows are zero here)."""
    was_training = model.training
    model.eval()
    gpt = isinstance(model, GPT)  # takes no mask: right padding cannot reach its scored positions
    ref = torch.zeros(len(data), 2, dtype=torch.float64)
    mine = distributed.shard(torch.arange(len(data)))
    for idx in mine.split(chunk):
        batch = {k: v.to(device) for k, v in data.get(idx).items() if k != "attention_mask" or not gpt}
        with autocast(precision, device):
            logps = model_sequence_logps(model, batch, batch["labels"])[0].cpu()  # (2b,)
        ref[idx] = torch.stack([logps[: len(idx)], logps[len(idx) :]], dim=1).double()  # (b, 2)
    if distributed.active():
        ref = ref.to(device)
        dist.all_reduce(ref)  # each row is non-zero on exactly one rank: the sum is the table
    data.ref = ref.cpu()  # float64 holds float32 / float64 values exactly; the objective casts
    model.train(was_training)


def _extra(cfg: Config) -> dict[str, Any]:
    d = cfg.dpo
    return {
        "gamma": d.simpo_gamma,
        "desirable_weight": d.desirable_weight,
        "undesirable_weight": d.undesirable_weight,
        "attention_mask": cfg.model != "gpt",
    }


def eval_objective(cfg: Config) -> Preference:
    """The objective of a finished preference run, to evaluate it (``gradtune eval``): the
    reference is the LoRA run's adapters switched off, else the ``ref_logps`` that ``eval_data``
    stores with the pairs (none for SimPO / ORPO)."""
    d, extra = cfg.dpo, _extra(cfg)
    lora = d.loss not in REFERENCE_FREE and methods.body_method(cfg.method) == "lora"
    return Preference(d.beta, d.loss, d.label_smoothing, reference=adapters_disabled if lora else None, **extra)


def eval_data(
    cfg: Config, path: Optional[str], tokenizer: Any, base: Optional[Callable[[], nn.Module]] = None
) -> PairDataset:
    """A held-out file of pairs (or KTO rows) in training's format, or the run's own validation
    pairs (``path`` None); for methods whose reference was precomputed, the base model
    (``base()``, default: the HF model at ``cfg.model``) is loaded again and computes it."""
    if path is not None:
        data = load(cfg, path, tokenizer)
    else:
        data = train_val(cfg, tokenizer)[1]
        if data is None:
            raise GradtuneError("a preference run trained with val_fraction=0 has no validation pairs; give --data")
    if cfg.dpo.loss not in REFERENCE_FREE and methods.body_method(cfg.method) != "lora":
        dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
        model = base() if base is not None else hf.load(cfg.model, "causal_lm", dtype)[0]
        chunk = cfg.micro_batch_size or (cfg.batch_size if cfg.batch_size != "full" else 8)
        precompute(model, data, chunk, torch.device("cpu"))
    return data


def objective(cfg: Config, model: nn.Module, train: PairDataset, val: Optional[PairDataset]) -> Preference:
    """The DPO objective for ``model`` (already transformed by its method); for methods other
    than LoRA, the reference log-probabilities are precomputed into ``train`` and ``val`` here,
    while ``model`` is still the untouched base."""
    d, extra = cfg.dpo, _extra(cfg)
    if d.loss in REFERENCE_FREE:
        return Preference(d.beta, d.loss, d.label_smoothing, **extra)
    if methods.body_method(cfg.method) == "lora":
        return Preference(d.beta, d.loss, d.label_smoothing, reference=adapters_disabled, **extra)
    device = distributed.device(resolve_device(cfg.device))
    model.to(device)  # where the loop would put it anyway
    chunk = cfg.micro_batch_size or (cfg.batch_size if cfg.batch_size != "full" else 8)
    for data in (train, val):
        if data is not None:
            precompute(model, data, chunk, device, cfg.precision)
    return Preference(d.beta, d.loss, d.label_smoothing, **extra)
