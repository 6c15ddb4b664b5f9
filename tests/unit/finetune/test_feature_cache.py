"""method head's feature cache (finetune/feature_cache.py): a frozen body's pooled features in
eval mode, computed once per text, equal to the body run directly; invalidated when a body
weight changes; off when the body trains."""

from __future__ import annotations

import pytest
import torch

from gradtune.finetune.heads import add_head, pool


@pytest.fixture
def body():
    pytest.importorskip("transformers")
    from gradtune.models.dropout import swap_dropouts
    from tests import tiny_hf

    model = tiny_hf.bert()
    for m in model.modules():  # dropout on, so train mode differs from eval mode
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.3
    model.config.attention_probs_dropout_prob = 0.3
    swap_dropouts(model)
    return model.requires_grad_(False)


def _batch():
    torch.manual_seed(0)
    ids = torch.randint(4, 60, (4, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 8:] = 0
    mask[3, 3:] = 0
    return ids, mask


def _counted(model):
    calls = []
    model.body.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    return calls


def test_features_are_the_eval_body_once_per_text(body):
    model = add_head(body, 3, dropout=0.0, cache_features=True).train()
    calls = _counted(model)
    ids, mask = _batch()
    out = model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        body.eval()
        ref = model.head(pool(body(input_ids=ids, attention_mask=mask).last_hidden_state, mask, "mean"))
        body.train()
    del calls[1:]  # the reference's own body call
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)
    assert model.training and body.training  # the body's mode is left as it was
    # The same texts again (one re-padded shorter, one new row): only the new row runs the body.
    ids2, mask2 = ids[:, :8].clone(), mask[:, :8].clone()
    ids2[0] = torch.arange(4, 12)
    out2 = model(input_ids=ids2, attention_mask=mask2)
    assert calls == [4, 1]
    assert torch.equal(out2[1:], out[1:])  # read back, not recomputed
    # The head trains: gradients reach it, the body has none.
    out2.sum().backward()
    assert model.head.weight.grad is not None and all(p.grad is None for p in body.parameters())


def test_a_batch_repeating_a_text_runs_the_body(body):
    """The evaluation chunk's probe (one text, then two copies) measures the body's forward."""
    model = add_head(body, 2, cache_features=True).eval()
    calls = _counted(model)
    ids, mask = _batch()
    one = model(input_ids=ids[:1], attention_mask=mask[:1])
    two = model(input_ids=ids[:1].repeat(2, 1), attention_mask=mask[:1].repeat(2, 1))
    assert calls == [1, 2] and torch.allclose(two, one.expand(2, -1), atol=1e-6, rtol=1e-5)


def test_a_changed_body_weight_empties_the_cache(body):
    model = add_head(body, 2, cache_features=True).eval()
    calls = _counted(model)
    ids, mask = _batch()
    a = model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        body.encoder.layer[0].output.dense.weight.mul_(1.5)
    b = model(input_ids=ids, attention_mask=mask)
    assert calls == [4, 4] and not torch.allclose(a, b)


def test_off_or_a_training_body_runs_every_step(body):
    ids, mask = _batch()
    for cache, trains in ((False, False), (True, True)):
        model = add_head(body.requires_grad_(trains), 2, cache_features=cache)
        calls = _counted(model)
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids, attention_mask=mask)
        assert calls == [4, 4]
