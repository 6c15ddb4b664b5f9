"""The fused dropout attention (models/fused_attention.py, its C in models/attention_kernel.py)
against the composite path of models/dropout.py (torch ops, the same seeded mask): outputs and the
three gradients to float32 rounding, over head sizes, ragged lengths, bias shapes and head-split
strides; causal attention (decoders) over grouped k/v heads and head sizes of 1 to 8 vectors, at p = 0
and p > 0, from float32 and bfloat16 operands; the fallback where the kernel cannot take the
operands; thread-count independence."""

from __future__ import annotations

import pytest
import torch

from gradtune.models import attention_kernel, dropout, fused_attention
from gradtune.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.skipif(
    attention_kernel.load() is None or attention_kernel.load().attn_width() == 0,
    reason="no C compiler or no AVX2/AVX-512",
)


def _operands(b: int, h: int, t: int, s: int, d: int, seed: int = 0):
    """q (B, H, T, D), k, v (B, H, S, D) as transformers makes them: head-split views of (B, T, H, D)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(b, s, h, d, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(b, s, h, d, generator=g).transpose(1, 2).requires_grad_()
    return q, k, v, torch.randn(b, h, t, d, generator=g)


def _both(q, k, v, go, bias, p=0.3, seed=1234):
    drop, kq = dropout._drop(p)
    scale = q.shape[-1] ** -0.5
    fused = fused_attention.FusedAttention.apply(q, k, v, bias, seed, drop, scale, 1.0 / kq)
    ref = dropout._DropoutAttention.apply(q, k, v, bias, (seed, drop), scale, 1.0 / kq)
    return (fused, *torch.autograd.grad(fused, (q, k, v), go)), (ref, *torch.autograd.grad(ref, (q, k, v), go))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 2e-6 * max(b.abs().max().item(), 1.0)


@pytest.mark.parametrize(
    "t,s,bias",
    [(128, 128, None), (48, 40, "keys"), (37, 53, "square"), (5, 7, "full"), (9, 9, "causal"), (1, 33, None)],
)
@pytest.mark.parametrize("vectors", [1, 2, 4])
def test_fused_equals_the_composite_path(t, s, bias, vectors):
    width = attention_kernel.load().attn_width()
    d = width * vectors
    q, k, v, go = _operands(2, 3, t, s, d)
    g = torch.Generator().manual_seed(5)
    masked = torch.where(torch.rand(2, 1, t, s, generator=g) < 0.3, torch.finfo(torch.float32).min, 0.0)
    masked[..., 0] = 0.0  # every query sees a key
    b = {
        None: None,
        "keys": masked[:, :, :1, :],  # (B, 1, 1, S): a padding mask
        "square": masked[0, 0],  # (T, S)
        "full": torch.randn(2, 3, t, s, generator=g),
        "causal": torch.zeros(t, s).masked_fill_(~torch.ones(t, s, dtype=torch.bool).tril(), -3.0e38),
    }[bias]
    assert fused_attention.supports(q, k, v)
    for a, r in zip(*_both(q, k, v, go, b)):
        _close(a, r)


def test_output_is_heads_last_and_dropout_masks_match():
    """The output is (B, H, T, D) over (B, T, H, D) memory (the head merge after it is free), and a
    large p drops what the composite path drops: equal results show the mask is the same stream."""
    q, k, v, go = _operands(2, 2, 16, 16, attention_kernel.load().attn_width() * 2)
    (out, *grads), (ref, *rgrads) = _both(q, k, v, go, None, p=0.7)
    assert out.transpose(1, 2).is_contiguous()
    _close(out, ref)
    for a, r in zip(grads, rgrads):
        _close(a, r)


def test_threads_do_not_change_the_result():
    q, k, v, go = _operands(2, 3, 24, 24, attention_kernel.load().attn_width() * 2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _both(q, k, v, go, None)[0]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, _both(q, k, v, go, None)[0]):
        assert torch.equal(a, b)


def test_unsupported_operands_take_the_composite_path():
    """A head size off the vector width or over 8 vectors, float64, k/v heads not dividing the q
    heads: ``supports`` says no and ``dropout.attention`` still computes (through torch ops), seeded
    as before."""
    width = attention_kernel.load().attn_width()
    odd = torch.randn(1, 2, 5, width + 4)
    assert not fused_attention.supports(odd, odd, odd)
    wide = torch.randn(1, 2, 5, width * 9)
    assert not fused_attention.supports(wide, wide, wide)
    d = torch.randn(1, 2, 5, width, dtype=torch.float64)
    assert not fused_attention.supports(d, d, d)
    q, kv = torch.randn(1, 3, 5, width), torch.randn(1, 2, 5, width)
    assert not fused_attention.supports(q, kv, kv)
    assert fused_attention.supports(q[:, :2].repeat(1, 2, 1, 1), kv, kv)  # 4 heads over 2: grouped
    torch.manual_seed(3)
    a = dropout.attention(odd, odd, odd, None, False, 0.3)
    torch.manual_seed(3)
    assert torch.equal(a, dropout.attention(odd, odd, odd, None, False, 0.3))


def test_dropout_attention_takes_the_kernel_and_is_seeded():
    """``dropout.attention`` in float32 with p in (0, 1) runs the kernel; the same seed gives the same
    output bit for bit, another seed another mask."""
    q, k, v, _ = _operands(2, 2, 16, 16, attention_kernel.load().attn_width() * 2)
    outs = []
    for seed in (4, 4, 5):
        torch.manual_seed(seed)
        outs.append(dropout.attention(q, k, v, None, True, 0.2))
    assert outs[0].grad_fn.name() == "FusedAttentionBackward"
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_second_derivative_raises():
    """The C backward builds no graph: asking for a second derivative is an error, not a wrong zero."""
    q, k, v, go = _operands(1, 2, 8, 8, attention_kernel.load().attn_width())
    drop, kq = dropout._drop(0.2)
    out = fused_attention.FusedAttention.apply(q, k, v, None, 1, drop, 0.25, 1.0 / kq)
    (gq,) = torch.autograd.grad(out, q, go, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gq.sum(), k)


def test_empty_operands_take_the_composite_path():
    w = attention_kernel.load().attn_width()
    q, kv = torch.randn(0, 2, 5, w), torch.randn(0, 2, 5, w)
    assert not fused_attention.supports(q, kv, kv)
    assert dropout.attention(q, kv, kv, None, False, 0.3).shape == (0, 2, 5, w)


def _causal_reference(q, k, v, p, seed):
    """The composite path with the k/v heads repeated and the causal mask as an additive bias."""
    (t, s), g = (q.shape[2], k.shape[2]), q.shape[1] // k.shape[1]
    bias = torch.zeros(t, s).masked_fill_(
        ~torch.ones(t, s, dtype=torch.bool).tril(s - t), torch.finfo(torch.float32).min
    )
    drop, kq = dropout._drop(p) if p > 0 else (0, 1.0)
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return dropout._DropoutAttention.apply(q, kr, vr, bias, (seed, drop), q.shape[-1] ** -0.5, 1.0 / kq)


@pytest.mark.parametrize(
    "heads,kv,t,s,vectors",
    [(4, 2, 64, 64, 3), (3, 3, 37, 37, 1), (4, 1, 19, 30, 2), (6, 2, 23, 23, 5), (2, 2, 7, 7, 8), (2, 1, 1, 9, 6)],
)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_causal_grouped_equals_the_composite_path(heads, kv, t, s, vectors, p):
    """Causal attention (query i sees keys 0 .. i + S - T) over k/v heads shared by heads / kv query
    heads: output and gradients equal the composite path with the heads repeated and a causal bias,
    the same mask stream at p > 0 (the kernel computes a block's keys up to its last row only)."""
    w = attention_kernel.load().attn_width()
    g = torch.Generator().manual_seed(heads * 100 + t)
    q = torch.randn(2, t, heads, w * vectors, generator=g).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(2, s, kv, w * vectors, generator=g).transpose(1, 2).requires_grad_() for _ in range(2))
    go = torch.randn(2, heads, t, w * vectors, generator=g)
    drop, kq = dropout._drop(p) if p > 0 else (0, 1.0)
    out = fused_attention.FusedAttention.apply(q, k, v, None, 77, drop, q.shape[-1] ** -0.5, 1.0 / kq, True)
    ref = _causal_reference(q, k, v, p, 77)
    for a, r in zip((out, *torch.autograd.grad(out, (q, k, v), go)), (ref, *torch.autograd.grad(ref, (q, k, v), go))):
        _close(a, r)


def test_causal_at_p_zero_equals_sdpa_and_draws_no_seed():
    """``dropout.attention`` at p = 0, causal, no mask: the kernel, equal to torch's SDPA with
    enable_gqa, and torch's generator untouched (a run without dropout keeps its random stream)."""
    w = attention_kernel.load().attn_width()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 40, w * 3, generator=g).requires_grad_()
    k, v = (torch.randn(2, 2, 40, w * 3, generator=g).requires_grad_() for _ in range(2))
    state = torch.get_rng_state()
    out = dropout.attention(q, k, v, None, True, 0.0)
    assert torch.equal(state, torch.get_rng_state())
    assert out.grad_fn.name() == "FusedAttentionBackward"
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    go = torch.randn(out.shape, generator=g)
    for a, r in zip((out, *torch.autograd.grad(out, (q, k, v), go)), (ref, *torch.autograd.grad(ref, (q, k, v), go))):
        _close(a, r)


def test_bfloat16_operands_are_computed_in_float32():
    """Autocast's mixed operands (q, k float32 after rotation, v bfloat16): computed from their
    float32 values, the output bfloat16 as SDPA's is, gradients in each operand's dtype."""
    w = attention_kernel.load().attn_width()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 24, w * 2, generator=g).requires_grad_()
    k = torch.randn(1, 1, 24, w * 2, generator=g).requires_grad_()
    v = torch.randn(1, 1, 24, w * 2, generator=g).bfloat16().requires_grad_()
    assert fused_attention.takes_causal(q, k, v, 0.0)
    out = dropout.attention(q, k, v, None, True, 0.0)
    assert out.dtype == torch.bfloat16
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v.float(), is_causal=True, enable_gqa=True)
    assert (out.float() - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()  # bf16 rounding of the output
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and v.grad.dtype == torch.bfloat16


def test_gpt_attention_takes_the_kernel_and_equals_sdpa(monkeypatch):
    """Our GPT's causal windows go through the kernel with grouped heads and a head size of 3
    vectors (the recipe's shape); its loss and gradients equal SDPA's (the kernel refused)."""
    w = attention_kernel.load().attn_width()
    cfg = GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=4 * 3 * w, block_size=32, family="llama")
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, 64, (2, 32))

    def run():
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    calls = []
    causal = fused_attention.causal
    monkeypatch.setattr(fused_attention, "causal", lambda *a: calls.append(1) or causal(*a))
    loss, grads = run()
    assert len(calls) == cfg.n_layer
    monkeypatch.setattr(fused_attention, "takes_causal", lambda *a: False)
    ref_loss, ref_grads = run()
    assert len(calls) == cfg.n_layer
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    for a, r in zip(grads, ref_grads):
        assert (a - r).abs().max().item() <= 1e-4 * max(r.abs().max().item(), 1e-3)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_without_a_gradient_the_forward_keeps_no_probabilities_and_equals(p):
    """Under no_grad (evaluation, generation) the forward alone runs, its probabilities in scratch:
    the same output, bit for bit, as the forward autograd keeps them for; same seed, same mask."""
    q, k, v, _ = _operands(2, 4, 30, 30, attention_kernel.load().attn_width() * 3)
    k, v = k[:, :2], v[:, :2]
    torch.manual_seed(8)
    with_grad = dropout.attention(q, k, v, None, True, p)
    torch.manual_seed(8)
    with torch.no_grad():
        alone = dropout.attention(q, k, v, None, True, p)
    assert with_grad.grad_fn.name() == "FusedAttentionBackward" and alone.grad_fn is None
    assert torch.equal(with_grad.detach(), alone)


def test_long_causal_windows_keep_no_probabilities_at_p_zero():
    """At p = 0 with a gradient to follow, windows over KEPT_KEYS_PER_DIM x D keys take torch's flash
    attention (its backward recomputes the probabilities; ours would keep (B, H, T, S) floats);
    without a gradient, or with dropout, the kernel takes them."""
    w = attention_kernel.load().attn_width()
    d = w
    s = fused_attention.KEPT_KEYS_PER_DIM * d
    q, k, v = (torch.randn(1, 2, s + 1, d, requires_grad=True) for _ in range(3))
    assert not fused_attention.takes_causal(q, k, v, 0.0)
    assert fused_attention.takes_causal(q[:, :, :s], k[:, :, :s], v[:, :, :s], 0.0)
    assert fused_attention.takes_causal(q, k, v, 0.1)
    with torch.no_grad():
        assert fused_attention.takes_causal(q, k, v, 0.0)
    out = dropout.attention(q, k, v, None, True, 0.0)
    assert out.grad_fn.name() != "FusedAttentionBackward"
