"""Packed windows train exactly what unpacked documents train: on a tiny random Llama in float64,
the loss sum, the token count and every parameter's gradient of a packed batch equal those of
the same documents padded one per row (the oracle), to 1e-10, with SDPA and eager attention.
The check can fail: the same windows without the block-diagonal mask (documents attending to
each other) give another loss. (Restarted positions are checked in tests/unit/data: with RoPE,
attention within a document depends only on relative positions, so the loss barely sees them.)"""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from gradtune.data.instructions import load_instructions  # noqa: E402
from gradtune.data.packing import pack  # noqa: E402
from gradtune.data.sequences import IGNORE, SequenceDataset  # noqa: E402
from gradtune.objectives.causal_lm import CausalLM  # noqa: E402
from gradtune.objectives.logits import packed_mask  # noqa: E402
from gradtune.runtime.errors import GradtuneError  # noqa: E402
from tests import tiny_hf  # noqa: E402

WINDOW = 48


def _instructions(tmp_path) -> SequenceDataset:
    """Prompt/response pairs of mixed lengths through the real loader (prompt labels IGNORE)."""
    rng = random.Random(0)
    words = tiny_hf.WORDS
    rows = [
        {
            "prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))),
            "response": " ".join(rng.choice(words) for _ in range(rng.randint(1, 14))),
        }
        for _ in range(14)
    ]
    path = tmp_path / "ins.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_instructions(path, tiny_hf.tokenizer("llama"), max_length=WINDOW)
    assert any(IGNORE in lab[1:] for lab in data.labels)  # prompts masked beyond the first token
    return data


def _loss_and_grads(model: nn.Module, batch) -> tuple[torch.Tensor, int, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = CausalLM(shift=True)(model, batch)
    out.loss_sum.backward()
    return out.loss_sum.detach(), int(out.count), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_unpacked(tmp_path, impl):
    docs = _instructions(tmp_path)
    model = tiny_hf.llama().double()
    model.set_attn_implementation(impl)
    unpacked = docs.get(torch.arange(len(docs)))  # one document per row, right padding
    loss_u, count_u, grads_u = _loss_and_grads(model, unpacked)
    packed = pack(docs, WINDOW, seed=0)
    assert len(packed) < len(docs)  # several documents share a window
    batch = packed.get(torch.arange(len(packed)))
    loss_p, count_p, grads_p = _loss_and_grads(model, batch)
    assert count_p == count_u
    # transformers' eager attention takes its softmax in float32 even for a float64 model, so
    # rows of other lengths (a window vs a padded row) round differently there: 1e-6, not 1e-10.
    tol = 1e-10 if impl == "sdpa" else 1e-6
    assert abs(loss_p - loss_u).item() <= tol * max(1.0, abs(loss_u).item())
    for gu, gp in zip(grads_u, grads_p):
        assert (gu - gp).abs().max().item() <= tol * max(1.0, gu.abs().max().item())
    # Micro-batches of windows sum to the same gradient (the loop divides once by the count).
    model.zero_grad(set_to_none=True)
    for idx in torch.arange(len(packed)).split(2):
        CausalLM(shift=True)(model, packed.get(idx)).loss_sum.backward()
    for gu, p in zip(grads_u, model.parameters()):
        assert (gu - p.grad).abs().max().item() <= tol * max(1.0, gu.abs().max().item())


def test_the_oracle_fails_without_the_mask(tmp_path):
    docs = _instructions(tmp_path)
    model = tiny_hf.llama().double()
    objective = CausalLM(shift=True)
    with torch.no_grad():
        loss_u = objective(model, docs.get(torch.arange(len(docs)))).loss_sum
        packed = pack(docs, WINDOW, seed=0)
        batch = packed.get(torch.arange(len(packed)))
        no_mask = {k: v for k, v in batch.items() if k != "document_ids"}
        no_mask["attention_mask"] = (batch["document_ids"] >= 0).long()  # plain causal over the window
        no_mask.pop("position_ids")
        cross = objective(model, no_mask).loss_sum
    assert abs(cross - loss_u).item() > 1e-6


def test_mask_form_follows_the_attention_implementation():
    doc = torch.tensor([[0, 0, 1, -1]])

    def model(impl: str) -> nn.Module:
        m = nn.Module()
        m.config = SimpleNamespace(_attn_implementation=impl)
        return m

    assert packed_mask(model("sdpa"), doc).dtype == torch.bool
    assert packed_mask(model("eager"), doc).dtype == torch.float32  # additive: 0 / -inf
    wrapped = nn.Module()
    wrapped.module = model("sdpa")  # DDP keeps the model in .module
    assert packed_mask(wrapped, doc).dtype == torch.bool
    with pytest.raises(GradtuneError, match="sdpa or eager"):
        packed_mask(model("flash_attention_2"), doc)
