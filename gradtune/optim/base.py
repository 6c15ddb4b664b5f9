"""``Optimizer``: the base of gradtune's optimizers — ``torch.optim.Optimizer`` without the
import of ``torch._dynamo`` on first use.

torch wraps ``add_param_group``, ``state_dict``, ``load_state_dict`` and ``zero_grad`` in
``torch._disable_dynamo``, which imports ``torch._dynamo`` (the whole compiler front end) the
first time one is called: a second or more of every run's start-up (building the optimizer
calls ``add_param_group``), for a decorator whose only job is to keep Dynamo from tracing these
methods when they are called inside a compiled region. The loop calls them outside any
(``compile: true`` compiles the model only), so the undecorated methods do the same work.
"""

from __future__ import annotations

import functools

import torch

_TORCH = torch.optim.Optimizer


def _plain(name: str):
    method = getattr(_TORCH, name)
    return getattr(method, "__wrapped__", method)  # functools.wraps keeps the undecorated function


class Optimizer(_TORCH):
    add_param_group = _plain("add_param_group")
    state_dict = _plain("state_dict")
    load_state_dict = _plain("load_state_dict")
    zero_grad = _plain("zero_grad")


def no_grad(step):
    """``torch.no_grad()`` for an optimizer's ``step``, as a plain function: the context-manager
    decorator costs ~1.5 us a call (an object, its enter and exit), a tenth of the whole update
    of a 10-5-1 MLP at batch size 1; this sets and restores the same switch directly."""

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return step(*args, **kwargs)
        finally:
            torch._C._set_grad_enabled(enabled)

    return wrapper
