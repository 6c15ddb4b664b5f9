"""Optimizers, ours: drop-in torch.optim.Optimizer subclasses with torch's semantics and state.

    SGD    sgd.py    momentum, dampening, Nesterov, L2 weight decay; state "momentum_buffer"
    AdamW  adamw.py  decoupled weight decay; state "step", "exp_avg", "exp_avg_sq"

Each file holds a readable per-tensor reference update (``sgd_reference``,
``adamw_reference``); fused.py + kernel_source.py hold the fast path (one pass over memory,
C/OpenMP), used by default when it can be built and tested equal to the reference.
"""

from gradtune.optim.adamw import AdamW, adamw_reference
from gradtune.optim.sgd import SGD, sgd_reference

__all__ = ["SGD", "AdamW", "sgd_reference", "adamw_reference"]
