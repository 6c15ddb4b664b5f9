"""Packing documents into windows (gradtune/data/packing.py), against oracles written out here:
every document once, no window over capacity, the windows a pure function of (data, seed); each
window's tokens / labels / positions / document ids rebuilt from the documents by hand; the mask
against a double loop; no target crosses a document boundary; instruction prompt masking kept."""

from __future__ import annotations

import json
import random

import pytest
import torch

from gradtune.data.causal_text import load_causal_text
from gradtune.data.packing import block_causal_mask, pack, pack_bins
from gradtune.data.sequences import IGNORE, SequenceDataset


def _docs(n: int = 40, seed: int = 0, longest: int = 30) -> SequenceDataset:
    rng = random.Random(seed)
    ids, labels = [], []
    for _ in range(n):
        length = rng.randint(1, longest)
        toks = [rng.randint(4, 60) for _ in range(length)]
        prompt = rng.randint(0, length - 1)  # instruction-like: the first `prompt` tokens untrained
        ids.append(toks)
        labels.append([IGNORE] * prompt + toks[prompt:])
    data = SequenceDataset(ids, labels, pad_id=0)
    data.pad_multiple = 8
    return data


def test_bins_hold_every_document_once_within_capacity_and_are_seeded():
    lengths = [random.Random(1).randint(0, 32) for _ in range(300)]
    bins = pack_bins(lengths, 32, seed=5)
    flat = sorted(i for b in bins for i in b)
    assert flat == [i for i, n in enumerate(lengths) if n > 0]  # empty documents left out
    assert all(sum(lengths[i] for i in b) <= 32 for b in bins)
    assert bins == pack_bins(lengths, 32, seed=5)
    # Best-fit decreasing is within 11/9 OPT + 1 windows; OPT >= total / capacity.
    assert len(bins) <= 11 / 9 * -(-sum(lengths) // 32) + 1
    with pytest.raises(ValueError, match="does not fit"):
        pack_bins([3, 40], 32, seed=0)


def test_bins_known_optimum():
    # 6+4, 6+4, 5+5, 10: four full windows of 10, the only perfect packing.
    bins = pack_bins([6, 4, 5, 6, 4, 5, 10], 10, seed=0)
    assert sorted(sorted([6, 4, 5, 6, 4, 5, 10][i] for i in b) for b in bins) == [[4, 6], [4, 6], [5, 5], [10]]


def test_windows_rebuilt_from_documents_by_hand():
    docs = _docs()
    packed = pack(docs, 32, seed=3)
    batch = packed.get(torch.arange(len(packed)))
    T = batch["input_ids"].shape[1]
    assert T % 8 == 0 and T >= 32 - 7
    seen = []
    for r, window in enumerate(packed.windows):
        ids, labels, pos, doc = [], [], [], []
        for k, i in enumerate(window):
            n = len(docs.input_ids[i])
            ids += docs.input_ids[i]
            labels += [IGNORE] + docs.labels[i][1:]
            pos += list(range(n))
            doc += [k] * n
        pad = T - len(ids)
        assert batch["input_ids"][r].tolist() == ids + [0] * pad
        assert batch["labels"][r].tolist() == labels + [IGNORE] * pad
        assert batch["position_ids"][r].tolist() == pos + list(range(pad))
        assert batch["document_ids"][r].tolist() == doc + [-1] * pad
        seen += window
    assert sorted(seen) == list(range(len(docs)))
    real = sum(len(s) for s in docs.input_ids)
    assert packed.efficiency == pytest.approx(real / (len(packed) * 32))
    assert packed.window_lengths.sum().item() == real
    assert not hasattr(packed, "lengths")  # the sampler must not group windows by length


def test_same_targets_as_unpacked_and_none_across_a_boundary():
    docs = _docs(60, seed=2)
    packed = pack(docs, 32, seed=0)
    b = packed.get(torch.arange(len(packed)))
    lab, doc = b["labels"][:, 1:], b["document_ids"]  # targets after the shift
    target = lab != IGNORE
    assert (doc[:, :-1][target] == doc[:, 1:][target]).all()  # predicted from its own document
    assert (doc[:, 1:][target] >= 0).all()
    # The multiset of (input token, next token) target pairs equals the unpacked one.
    u = docs.get(torch.arange(len(docs)))
    ut = u["labels"][:, 1:] != IGNORE
    unpacked = sorted(zip(u["input_ids"][:, :-1][ut].tolist(), u["labels"][:, 1:][ut].tolist()))
    packed_pairs = sorted(zip(b["input_ids"][:, :-1][target].tolist(), lab[target].tolist()))
    assert packed_pairs == unpacked


def test_packing_is_a_pure_function_of_data_and_seed():
    a, b = pack(_docs(), 32, seed=7), pack(_docs(), 32, seed=7)
    idx = torch.arange(len(a))
    assert all(torch.equal(x, y) for x, y in zip(a.get(idx).values(), b.get(idx).values()))
    assert pack(_docs(), 32, seed=8).windows != a.windows  # the seed orders equal lengths


def test_block_causal_mask_against_a_double_loop():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 1, 1, 1, 1, 1, 1, -1]])
    want = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    for b in range(2):
        for t in range(8):
            for s in range(8):
                want[b, 0, t, s] = s <= t and doc[b, t] == doc[b, s]
    assert torch.equal(block_causal_mask(doc), want)
    add = block_causal_mask(doc, torch.float32)
    assert torch.equal(add == 0, want) and torch.isneginf(add[~want]).all()
    assert want.any(-1).all()  # no empty row: padding attends to itself


def test_causal_text_documents_are_windowed_on_their_own(tmp_path):
    pytest.importorskip("transformers")
    from tests import tiny_hf

    tok = tiny_hf.tokenizer("llama")
    words = tiny_hf.WORDS
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 25))) for _ in range(12)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    data = load_causal_text(path, tok, max_length=10, documents=True)
    eos = tok.eos_token_id
    streams = [tok(t)["input_ids"] + [eos] for t in texts]
    # Every window lies inside one document; every token but a document's first is a target once.
    targets = sorted((tuple(w[:j]), w[j]) for w in data.input_ids for j in range(1, len(w)))
    want = []
    for s in streams:
        for i in range(0, len(s) - 1, 9):
            w = s[i : i + 10]
            want += [(tuple(w[:j]), w[j]) for j in range(1, len(w))]
    assert targets == sorted(want)
    assert sum(len(s) - 1 for s in streams) == len(want)
    packed = pack(data, 10, seed=0)
    assert packed.efficiency > 0.5
    # Without documents: the old joined stream, windows cross document boundaries.
    joined = load_causal_text(path, tok, max_length=10)
    assert joined.input_ids[0] == [t for s in streams for t in s][:10]
