"""The cheap CPU dropout (models/dropout.py) and the attention that uses it for HF models
(models/hf_attention.py): the keep rate and expectation of torch's dropout, the gradient through
the same mask, seeded reproducibility, and attention equal to transformers' eager attention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradtune.models.dropout import LEVELS, Dropout, dropout, keep_mask, swap_dropouts


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_expectation(p):
    n = 2_000_003  # odd: the last int64 draw is partly used
    torch.manual_seed(0)
    mask, q = keep_mask(torch.Size([n]), p, torch.device("cpu"))
    assert abs(q - (1 - p)) <= 0.5 / LEVELS
    sigma = (q * (1 - q) / n) ** 0.5
    assert abs(mask.float().mean().item() - q) < 5 * sigma
    y = dropout(torch.ones(n, dtype=torch.float64), p)
    assert abs(y.mean().item() - 1.0) < 5 * sigma / q  # E[y] = x: the kept values are scaled by 1/q
    assert torch.unique(y).tolist() == [0.0, pytest.approx(1 / q, rel=1e-12)]


def test_mask_elements_independent():
    torch.manual_seed(1)
    m, _ = keep_mask(torch.Size([1_000_000]), 0.5, torch.device("cpu"))
    f = m.double()
    for lag in (1, 2, 3, 4, 5):  # four elements per 64-bit draw: neighbours inside and across draws
        assert abs(torch.corrcoef(torch.stack([f[:-lag], f[lag:]]))[0, 1].item()) < 0.006


def test_gradient_uses_the_forward_mask():
    torch.manual_seed(2)
    x = torch.randn(64, 33, requires_grad=True)
    y = dropout(x, 0.3)
    g = torch.randn_like(y)
    y.backward(g)
    kept = y != 0
    scale = 1 / (1 - round(0.3 * LEVELS) / LEVELS)
    assert torch.allclose(y[kept], x[kept] * scale, rtol=1e-6, atol=0)
    assert torch.equal(x.grad == 0, ~kept)  # the same elements dropped forward and backward
    assert torch.allclose(x.grad[kept], g[kept] * scale, rtol=1e-6, atol=0)


def test_seeded_and_modes():
    x = torch.randn(16, 128, 48)
    torch.manual_seed(3)
    a = dropout(x, 0.1)
    torch.manual_seed(3)
    b = dropout(x, 0.1)
    assert torch.equal(a, b) and not torch.equal(a, dropout(x, 0.1))
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0) is x
    assert torch.count_nonzero(dropout(x, 1.0)) == 0
    d = Dropout(0.2)
    assert isinstance(d, nn.Dropout) and d.p == 0.2
    assert torch.equal(d.eval()(x), x)


def test_swap_keeps_p_and_state():
    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.25), nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 2)))
    keys = set(m.state_dict())
    assert swap_dropouts(m) == 2
    assert [type(x) for x in m.modules()].count(Dropout) == 2
    assert [x.p for x in m.modules() if isinstance(x, Dropout)] == [0.25, 0.5]
    assert set(m.state_dict()) == keys


def _with_dropout(model: nn.Module, p: float) -> nn.Module:
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = p
    return model


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_attention_equals_transformers_eager(tmp_path, kind):
    """Train mode with p below one level (no element dropped, but the dropout path runs) equals
    transformers' eager attention, padding mask (bert) and causal mask (llama) included."""
    pytest.importorskip("transformers")
    from transformers import AutoModel, AutoModelForCausalLM

    from gradtune.models import hf
    from tests import tiny_hf

    getattr(tiny_hf, kind)(tmp_path)
    ours = hf.load_model(tmp_path, "encoder" if kind == "bert" else "causal_lm")
    assert ours.config._attn_implementation == "gradtune_sdpa"
    cls = AutoModel if kind == "bert" else AutoModelForCausalLM
    ref = cls.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    _with_dropout(ours, 0.1 / LEVELS)  # rounds to zero drops, keeps the dropout branch
    if kind == "llama":
        ours.config.attention_dropout = 0.1 / LEVELS
        for layer in ours.model.layers:
            layer.self_attn.attention_dropout = 0.1 / LEVELS
    ids = torch.randint(4, 27, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    out = ours.train()(input_ids=ids, attention_mask=mask)
    exp = ref(input_ids=ids, attention_mask=mask)
    a, b = (o.last_hidden_state if kind == "bert" else o.logits for o in (out, exp))
    real = mask.bool()
    assert torch.allclose(a[real], b[real], atol=2e-5, rtol=1e-5)
    # eval mode is transformers' SDPA itself
    ours.eval()
    c = ours(input_ids=ids, attention_mask=mask)
    c = c.last_hidden_state if kind == "bert" else c.logits
    assert torch.allclose(c[real], b[real], atol=2e-5, rtol=1e-5)


def test_attention_dropout_seeded(tmp_path):
    pytest.importorskip("transformers")
    from gradtune.models import hf
    from tests import tiny_hf

    tiny_hf.bert(tmp_path)
    model = _with_dropout(hf.load_model(tmp_path, "encoder"), 0.3)
    ids = torch.randint(4, 27, (2, 9))
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(model(input_ids=ids).last_hidden_state)
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


def test_gpt_attention_dropout_path_equals_sdpa():
    """Our GPT with attention dropout on the CPU takes the math path with the cheap mask: with p
    below one level (nothing dropped) it equals SDPA's output; with p = 0.3 it is seeded."""
    from gradtune.models.gpt import GPT, GPTConfig

    for family, kv in (("gpt2", None), ("llama", 2)):
        torch.manual_seed(0)
        model = GPT(
            GPTConfig(family=family, n_layer=2, n_head=4, n_kv_head=kv, n_embd=32, block_size=16, dropout=0.1 / LEVELS)
        )
        ids = torch.randint(0, 256, (3, 16))
        train = model.train()(ids)
        ref = model.eval()(ids)  # SDPA, no dropout
        assert torch.allclose(train, ref, atol=1e-5, rtol=1e-5)
        assert isinstance(model.transformer.drop, Dropout)
    model.config.dropout = 0.3
    for m in model.modules():
        if isinstance(m, Dropout):
            m.p = 0.3
    model.train()
    torch.manual_seed(4)
    a = model(ids)
    torch.manual_seed(4)
    assert torch.equal(a, model(ids)) and not torch.allclose(a, ref, atol=1e-3)


@pytest.mark.parametrize("masked", ["none", "bool", "float", "causal"])
def test_fused_attention_equals_the_composite_path(masked):
    """float32 on the CPU takes the fused attention (its (B, H, T, S) temporaries its own): the
    same output and gradients as softmax, the same mask, matmul by autograd, bitwise."""
    from gradtune.models.dropout import attention, keep_mask

    torch.manual_seed(7)
    q, k, v = (torch.randn(2, 3, 9, 4, requires_grad=True) for _ in range(3))
    mask = None
    if masked == "bool":
        mask = torch.ones(2, 1, 9, 9, dtype=torch.bool)
        mask[1, :, :, 6:] = False
    elif masked == "float":
        mask = torch.randn(2, 1, 9, 9)
    g = torch.randn(2, 3, 9, 4)
    torch.manual_seed(8)
    out = attention(q, k, v, mask, masked == "causal", 0.3)
    grads = torch.autograd.grad(out, (q, k, v), g)
    torch.manual_seed(8)
    keep, kq = keep_mask(torch.Size([2, 3, 9, 9]), 0.3, torch.device("cpu"))
    scores = torch.matmul(q * 0.5, k.transpose(-1, -2))
    if masked == "bool":
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif masked == "float":
        scores = scores + mask
    elif masked == "causal":
        scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), torch.finfo(scores.dtype).min)
    ref = torch.matmul(torch.softmax(scores, -1) * keep, v) * (1.0 / kq)
    assert torch.equal(out, ref)
    for a, b in zip(grads, torch.autograd.grad(ref, (q, k, v), g)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kernel", [True, False])
def test_mask_paths_keep_rate_seed_and_threads(kernel, monkeypatch):
    """The C mask (models/mask_kernel.py) and the torch-ops fallback (no compiler) both keep
    with probability q, are fixed by torch.manual_seed, and the C mask does not depend on the
    thread count; the scaled float mask is the bool mask times 1/q, from the same draw."""
    from gradtune.models import mask_kernel
    from gradtune.models.dropout import scaled_keep

    if not kernel:
        monkeypatch.setattr(mask_kernel, "load", lambda: None)
    elif mask_kernel.load() is None:
        pytest.skip("no C compiler")
    n, p = 1_000_003, 0.1
    torch.manual_seed(9)
    m, q = keep_mask(torch.Size([n]), p, torch.device("cpu"))
    assert abs(m.float().mean().item() - q) < 5 * (q * (1 - q) / n) ** 0.5
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(9)
        one, _ = keep_mask(torch.Size([n]), p, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(m, one)
    torch.manual_seed(9)
    s = scaled_keep(torch.Size([n]), p, torch.device("cpu"), torch.float32, 1 / q)
    assert s.dtype == torch.float32 and torch.equal(s, m.float() * torch.tensor(1 / q, dtype=torch.float32))
    x = torch.randn(n, dtype=torch.float32, requires_grad=True)
    torch.manual_seed(9)
    y = dropout(x, p)  # with the kernel: the mask regenerated from its seed, never stored
    assert torch.equal(y, x.detach() * s)
    g = torch.randn(n)
    y.backward(g)
    assert torch.equal(x.grad, g * s)
