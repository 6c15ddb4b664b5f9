"""The RMSNorm kernel (models/rms_norm_kernel.py) against its oracle, the composite torch path
``F.rms_norm(x.float()).to(x.dtype) * w``: outputs and both gradients, float32 and bfloat16 inputs,
whole rows and per-head groups read through a row stride; our GPT's norms and q/k norms take it and
give the composite path's loss and gradients; without the library the torch path runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradtune.models import rms_norm_kernel
from gradtune.models.gpt import GPT, GPTConfig
from tests.gpt_paths import assert_kernel_equals_torch_ops

pytestmark = pytest.mark.skipif(rms_norm_kernel.load() is None, reason="no C compiler: the torch path only")


def composite(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * w


# (base shape, how x is cut from it): whole rows as one group; heads of a contiguous tensor; the q|k
# columns of a fused projection (row stride 384, 6 heads of 48); one row; a group of odd size
CASES = {
    "rows": ((3, 5, 64), lambda b: b.unsqueeze(-2)),
    "heads": ((2, 7, 6, 48), lambda b: b),
    "qk columns": ((2, 7, 384), lambda b: b[..., :288].unflatten(-1, (6, 48))),
    "one row": ((1, 1, 1, 20), lambda b: b),
    "odd size": ((4, 3, 2, 19), lambda b: b),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_composite_path(case: str, dtype: torch.dtype) -> None:
    shape, cut = CASES[case]
    torch.manual_seed(0)
    base = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    x = cut(base)
    w = (torch.randn(x.shape[-2:]) * 0.3 + 1).requires_grad_()
    assert rms_norm_kernel.takes(x, w)
    out, ref = rms_norm_kernel.rms_norm(x, w, 1e-5), composite(x, w, 1e-5)
    assert out.dtype == ref.dtype == torch.float32
    g = torch.randn_like(ref)
    dx, dw = torch.autograd.grad(out, (base, w), g)
    rdx, rdw = torch.autograd.grad(ref, (base, w), g)
    assert dx.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-6)
        torch.testing.assert_close(dx, rdx, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(dw, rdw, atol=1e-5, rtol=1e-5)
        return
    # bf16: the output and dw are the composite's (y rounded to bf16 before the weight, as there);
    # dx: the composite rounds dy = g * w to bf16 before the norm's backward, the kernel does not,
    # so each is within a few bf16 steps of the float64 gradient and the kernel the closer one
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dw, rdw, atol=1e-4, rtol=1e-5)
    base64 = base.detach().double().requires_grad_()
    exact = torch.autograd.grad(composite(cut(base64), w.double(), 1e-5), base64, g.double())[0]
    ours, theirs = (dx.double() - exact).abs().mean(), (rdx.double() - exact).abs().mean()
    assert ours <= theirs * 1.01
    torch.testing.assert_close(dx.double(), exact, atol=0.05, rtol=0.02)


def test_layouts_the_kernel_cannot_read_take_the_torch_path() -> None:
    w = torch.ones(1, 8)
    assert not rms_norm_kernel.takes(torch.randn(4, 8, 3).transpose(-1, -2).unsqueeze(-2), w)  # strided last dim
    assert not rms_norm_kernel.takes(torch.randn(2, 3, 1, 8).transpose(0, 1), w)  # rows not one run
    assert not rms_norm_kernel.takes(torch.randn(4, 1, 8, dtype=torch.float64), w)
    assert not rms_norm_kernel.takes(torch.randn(4, 1, 8), w.bfloat16())
    assert rms_norm_kernel.takes(torch.randn(4, 1, 8), w)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_gpt_norms_take_the_kernel_and_equal_the_torch_path(monkeypatch, qk_norm: bool) -> None:
    """Every RMSNorm and the per-head q/k norms go through the kernel (counted); the loss and every
    gradient equal the composite path's (kernel refused), in float32 and under bf16 autocast."""
    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny-llama", vocab_size=64, qk_norm=qk_norm)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".ln_" in name:
                p.normal_(1.0, 0.3)
    calls = []
    real = rms_norm_kernel.rms_norm
    monkeypatch.setattr(rms_norm_kernel, "rms_norm", lambda *a: calls.append(1) or real(*a))
    per_pass = 2 * cfg.n_layer + 1 + (cfg.n_layer if qk_norm else 0)
    assert_kernel_equals_torch_ops(monkeypatch, model, calls, per_pass, rms_norm_kernel)


def test_without_the_library_the_torch_path_runs(monkeypatch) -> None:
    monkeypatch.setattr(rms_norm_kernel, "load", lambda: None)
    assert not rms_norm_kernel.takes(torch.randn(4, 1, 8), torch.ones(1, 8))

    def unreachable(*args):
        raise AssertionError("the kernel was called without its library")

    monkeypatch.setattr(rms_norm_kernel, "rms_norm", unreachable)
    model = GPT(GPTConfig.preset("tiny-llama", vocab_size=64, qk_norm=True))
    model(torch.randint(0, 64, (1, 8))).sum().backward()  # composite norms, no kernel call
    assert all(p.grad is not None for p in model.parameters())


def _hf_model(kind: str) -> torch.nn.Module:
    import transformers

    sizes = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    sizes.update(intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))
    else:  # q/k norms over (B, T, heads, head_dim) views too
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**sizes, head_dim=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_transformers_rms_norms_swapped_give_their_logits_and_gradients(kind: str) -> None:
    """swap_rms_norms routes transformers' Llama / Qwen3 RMSNorms (and Qwen3's q/k norms) through
    the kernel: logits and every gradient equal the unswapped model's; unswap restores theirs."""
    pytest.importorskip("transformers")
    model = _hf_model(kind)
    ids = torch.randint(0, 64, (2, 12))

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        logits = model(ids).logits
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    theirs = run()
    per_layer = 4 if kind == "qwen3" else 2
    assert rms_norm_kernel.swap_rms_norms(model) == per_layer * 2 + 1
    calls = []
    real = rms_norm_kernel.rms_norm
    with pytest.MonkeyPatch.context() as m:
        m.setattr(rms_norm_kernel, "rms_norm", lambda *a: calls.append(1) or real(*a))
        ours = run()
    assert len(calls) == per_layer * 2 + 1
    assert theirs[0].abs().max() > 0.1
    torch.testing.assert_close(ours[0], theirs[0], atol=2e-5, rtol=1e-5)
    for a, b in zip(ours[1], theirs[1]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert rms_norm_kernel.unswap_rms_norms(model) == per_layer * 2 + 1
    assert all("forward" not in vars(mod) for mod in model.modules())


def test_a_norm_class_with_other_arithmetic_keeps_its_own() -> None:
    """Only a forward whose statements are transformers' Llama RMSNorm's is swapped: a class of the
    same name computing something else (Gemma's 1 + weight, say) keeps its own."""

    class LlamaRMSNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.zeros(8)), 1e-6

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
            return hidden_states * torch.rsqrt(variance + self.variance_epsilon) * (1.0 + self.weight)

    assert rms_norm_kernel.swap_rms_norms(torch.nn.Sequential(LlamaRMSNorm())) == 0


def test_pretrained_llama_models_load_with_the_kernel(tmp_path) -> None:
    pytest.importorskip("transformers")
    from gradtune.models import hf
    from tests import tiny_hf

    tiny_hf.llama(tmp_path / "llama")
    model = hf.load_model(tmp_path / "llama")
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 5 and all("forward" in vars(m) for m in norms)
