"""The optimizer a config asks for: our own update rules (gradtune.optim), drop-in torch.optim
optimizers, with the config's hyper-parameters."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from gradtune.config import Config
from gradtune.optim.adamw import AdamW
from gradtune.optim.groups import muon_groups
from gradtune.optim.muon_adamw import MuonAdamW
from gradtune.optim.sgd import SGD


def make_optimizer(cfg: Config, params: Any, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
    """``params``: tensors or parameter groups (``optim.groups.decay_groups``). ``model``: the
    (unwrapped) model they belong to; optimizer=muon needs it to tell hidden matrices from
    embeddings and the output layer (``optim.groups.hidden_matrices``)."""
    betas = tuple(cfg.betas)
    if cfg.optimizer == "adamw":
        return AdamW(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "muon":
        if model is None:
            raise ValueError("optimizer=muon needs the model to split its parameters")
        return MuonAdamW(
            muon_groups(model, params, cfg.lr, cfg.muon_lr),
            lr=cfg.lr,
            betas=betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            muon_lr=cfg.muon_lr,
            momentum=cfg.muon_momentum,
            nesterov=cfg.muon_nesterov,
            ns_steps=cfg.ns_steps,
            adjust_lr_fn=cfg.muon_adjust_lr,
        )
    return SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        dampening=cfg.dampening,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )
