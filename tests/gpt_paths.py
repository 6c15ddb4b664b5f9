"""One oracle check for our GPT's CPU kernels (norms, SwiGLU, rotary): the same model's loss and
every parameter's gradient with a kernel and with the torch ops it replaces, in float32 and under
bf16 autocast, and how often the kernel ran on each side."""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from gradtune.models.gpt import GPT


def loss_and_grads(model: GPT, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def assert_kernel_equals_torch_ops(
    monkeypatch, model: GPT, calls: list, calls_per_pass: int, kernel: ModuleType
) -> None:
    """``calls`` (appended to by the kernel's entry point) grows by ``calls_per_pass`` in a pass
    with the kernel and by none with ``kernel.takes`` refusing; loss and gradients agree (float32
    2e-5, bf16 2e-2: bf16 rounds differently along the two paths)."""
    vocab = model.config.vocab_size
    x, y = torch.randint(0, vocab, (2, 24)), torch.randint(0, vocab, (2, 24))
    for bf16, tol in ((False, 2e-5), (True, 2e-2)):
        calls.clear()
        ours = loss_and_grads(model, x, y, bf16)
        assert len(calls) == calls_per_pass
        with monkeypatch.context() as m:
            m.setattr(kernel, "takes", lambda *a: None)
            theirs = loss_and_grads(model, x, y, bf16)
        assert len(calls) == calls_per_pass
        torch.testing.assert_close(ours[0], theirs[0], atol=tol / 10, rtol=0)
        for a, b in zip(ours[1], theirs[1]):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)
