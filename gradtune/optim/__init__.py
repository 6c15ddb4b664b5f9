"""Optimizers, ours: drop-in torch.optim.Optimizer subclasses with torch's semantics and state.

    SGD        sgd.py         momentum, dampening, Nesterov, L2 weight decay; state "momentum_buffer"
    AdamW      adamw.py       decoupled weight decay; state "step", "exp_avg", "exp_avg_sq"
    Muon       muon.py        momentum orthogonalised by Newton-Schulz, 2-D only; state "momentum_buffer"
    MuonAdamW  muon_adamw.py  Muon for the hidden matrices, AdamW for the rest, in one optimizer

Each file holds a readable per-tensor reference update (``sgd_reference``,
``adamw_reference``, ``muon_reference``), given the group's hyper-parameters as one record of
hyper.py; fused.py + kernel_source.py hold the fast path (one
pass over memory, C/OpenMP) of SGD and AdamW, used by default when it can be built and tested
equal to the reference.
"""

from gradtune.optim.adamw import AdamW, adamw_reference
from gradtune.optim.muon import Muon, muon_reference
from gradtune.optim.muon_adamw import MuonAdamW
from gradtune.optim.sgd import SGD, sgd_reference

__all__ = ["SGD", "AdamW", "Muon", "MuonAdamW", "sgd_reference", "adamw_reference", "muon_reference"]
