"""The optimizer a config asks for: our own update rules (gradtune.optim), drop-in torch.optim
optimizers, with the config's hyper-parameters."""

from __future__ import annotations

from typing import Any

import torch

from gradtune.config import Config
from gradtune.optim.adamw import AdamW
from gradtune.optim.sgd import SGD


def make_optimizer(cfg: Config, params: Any) -> torch.optim.Optimizer:
    """``params``: tensors or parameter groups (``optim.groups.decay_groups``)."""
    if cfg.optimizer == "adamw":
        return AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    return SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        dampening=cfg.dampening,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )
