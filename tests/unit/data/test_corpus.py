"""Streaming corpora (data/records.py, data/corpus.py), mixtures (data/mixture.py), BPE training
(data/bpe.py).

Oracles: the tokenizers package encoding the whole corpus at once (documents joined by the
end-of-text token) for the token file; the weights for a mixture's shares; a fresh sampler for
a resumed one; the source text for the BPE's round trip.
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from gradtune import datasets
from gradtune.data import bpe, corpus, mixture, records, text
from gradtune.data import tokenizer as tokenizers
from gradtune.runtime import cache as cache_root
from gradtune.runtime.errors import GradtuneError

SHAKESPEARE = datasets.text("shakespeare")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache_root.ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokens"


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    """A 600-token byte-level BPE trained on a slice of Shakespeare (data/bpe.py)."""
    d = tmp_path_factory.mktemp("bpe")
    (d / "s.txt").write_text(SHAKESPEARE[:300_000])
    return str(bpe.save(bpe.train([records.resolve(str(d / "s.txt"))], 600), d / "tok.json"))


def docs_folder(root, n_docs=40, size=3000):
    """A folder of every format, each document a slice of Shakespeare; returns (folder, documents
    in shard order)."""
    import datasets as hf_datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir()
    docs = [SHAKESPEARE[i * size : (i + 1) * size] for i in range(n_docs)]
    order = []
    (root / "a.txt").write_text(docs[0])
    gzip.open(root / "b.txt.gz", "wt", encoding="utf-8").write(docs[1])
    (root / "c.jsonl").write_text("".join(json.dumps({"text": d, "id": 1}) + "\n" for d in docs[2:12]))
    with gzip.open(root / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in docs[12:20]))
    pq.write_table(pa.table({"text": docs[20:30]}), root / "e.parquet")
    hf_datasets.Dataset.from_dict({"text": docs[30:40]}).save_to_disk(str(root / "f"))
    order = [docs[0], docs[1], *docs[2:40]]
    return root, order


def test_every_format_streams_into_the_whole_text_encoding(tmp_path, bpe_file, monkeypatch):
    """Six formats, parallel workers, small pieces: the token file equals one encode of the whole
    corpus with the documents joined by <|endoftext|> (the tokenizers package's own answer)."""
    folder, docs = docs_folder(tmp_path / "corpus")
    monkeypatch.setattr(corpus, "SMALL", 0)  # a small corpus, but worker processes all the same
    monkeypatch.setattr(records, "PIECE", 1000)  # many pieces per .txt document (workers see it: spawn
    # re-imports, so only the in-process path uses it; the oracle covers both)
    tf = text.tokenize(str(folder), bpe_file, workers=2)
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(bpe_file)
    oracle = hf.encode("<|endoftext|>".join(docs) + "<|endoftext|>", add_special_tokens=False).ids
    assert tf.tokens.dtype == np.uint16 and np.array_equal(np.asarray(tf.tokens), oracle)
    assert tf.meta["docs"] == len(docs) and tf.meta["bytes"] == sum(len(d.encode()) for d in docs)
    assert tf.meta["workers"] == 2 and not tf.cache_hit
    one = text.tokenize(str(folder), bpe_file, workers=1, cache=tmp_path / "other")
    assert np.array_equal(one.tokens, tf.tokens)
    assert text.tokenize(str(folder), bpe_file).cache_hit  # found without reading the corpus
    piecewise = text.tokenize(str(folder / "a.txt"), bpe_file, workers=1)  # PIECE=1000 in-process
    assert list(piecewise.tokens) == hf.encode(docs[0] + "<|endoftext|>").ids


def test_glob_list_and_byte_tokenizer(tmp_path):
    folder, docs = docs_folder(tmp_path / "corpus")
    tf = text.tokenize([str(folder / "*.txt*"), str(folder / "c.jsonl")], "byte", workers=1)
    # byte and char tokenizers have no end-of-text id: documents follow one another
    assert bytes(np.asarray(tf.tokens)) == "".join(docs[:12]).encode() and tf.tokens.dtype == np.uint8


def test_killed_build_resumes_at_the_unfinished_shard(tmp_path, monkeypatch):
    """A build that dies after 2 of 4 shards: the next one encodes shards 2 and 3 only."""
    folder, docs = docs_folder(tmp_path / "corpus")
    calls = []
    real = corpus.encode_shard
    monkeypatch.setattr(corpus, "encode_shard", lambda s, *a, **k: calls.append(s.path.name) or real(s, *a, **k))
    shards = records.resolve([str(folder / n) for n in ("a.txt", "b.txt.gz", "c.jsonl", "e.parquet")])

    def boom(point):
        if point == "tokenize.shard" and len(calls) == 2:
            raise KeyboardInterrupt  # stands in for the kill (tests/e2e kill a real process)

    monkeypatch.setattr(corpus.testhooks, "hit", boom)
    tok = tokenizers.load("byte")
    entry = tmp_path / "entry"
    with pytest.raises(KeyboardInterrupt):
        corpus.build(entry, "x", shards, tok, "text", workers=1)
    assert calls == ["a.txt", "b.txt.gz"] and corpus.cached(entry) is None
    monkeypatch.setattr(corpus.testhooks, "hit", lambda point: None)
    meta, hit = corpus.build(entry, "x", shards, tok, "text", workers=1)
    assert calls[2:] == ["c.jsonl", "e.parquet"] and meta["encoded_shards"] == [2, 3] and not hit
    want = "".join(docs[:12] + docs[20:30]).encode()
    assert (entry / "tokens").read_bytes() == want and not (entry / "shards").exists()


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda p: p / "x.csv", "x.csv: unknown data format"),
        (lambda p: p / "e.jsonl", "e.jsonl: empty shard"),
        (lambda p: str(p / "nothing*.txt"), "nothing*.txt: the glob matches no file"),
        (lambda p: p / "t.txt.gz", "t.txt.gz: truncated or corrupt gzip"),
        (lambda p: p / "m.jsonl", "m.jsonl:2: no field 'text'"),
        (lambda p: p / "j.jsonl", "j.jsonl:1: not valid JSON"),
        (lambda p: p / "n.parquet", "n.parquet: no column 'text'"),
    ],
)
def test_bad_shards_name_the_file_and_line(tmp_path, make, needle):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "x.csv").write_text("a,b\n")
    (tmp_path / "e.jsonl").write_text("\n")
    raw = gzip.compress(SHAKESPEARE[:100_000].encode())
    (tmp_path / "t.txt.gz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "m.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    (tmp_path / "j.jsonl").write_text("{oops\n")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "n.parquet")
    with pytest.raises(GradtuneError) as e:
        text.tokenize(str(make(tmp_path)), "byte", workers=1)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not list((tmp_path / "cache" / "tokens").glob("*/tokens"))


# --------------------------------------------------------------------------------- mixtures
def windows(n_tokens, T=8):
    return text.TextWindows(np.arange(n_tokens, dtype=np.int64) % 251, T)


def test_mixture_shares_follow_the_weights_over_1000_steps():
    data = mixture.MixtureWindows([windows(4000), windows(900), windows(20_000)], ["a", "b", "c"], [0.5, 0.3, 0.2])
    s = data.make_sampler(16, None, seed=3)
    src = np.concatenate([np.searchsorted(data.offsets, next(s).micro[0].numpy(), "right") - 1 for _ in range(1000)])
    share = np.bincount(src, minlength=3) / len(src)
    assert np.abs(share - [0.5, 0.3, 0.2]).max() < 0.02 * 0.2, share  # within 2% of even the smallest weight
    # without replacement within a source's pass: source b's first 900 draws are its 900 windows
    s2 = data.make_sampler(16, None, seed=3)
    ids = np.concatenate([next(s2).micro[0].numpy() for _ in range(400)])
    b = ids[(ids >= data.offsets[1]) & (ids < data.offsets[2])][:112]  # b has 112 windows
    assert sorted(b - data.offsets[1]) == list(range(112))


def test_mixture_sampler_resumes_exactly_and_batches_carry_their_source():
    data = mixture.MixtureWindows([windows(3000), windows(700)], ["a", "b"], [0.7, 0.3])
    run = data.make_sampler(8, 4, seed=1)
    steps = [torch.cat(next(run).micro) for _ in range(300)]
    again = data.make_sampler(8, 4, seed=1)
    for _ in range(123):
        next(again)
    state, digest = again.state(), again.order_digest()
    fresh = data.make_sampler(8, 4, seed=1)
    fresh.load_state(state)
    assert fresh.order_digest() == digest
    assert all(torch.equal(torch.cat(next(fresh).micro), steps[i]) for i in range(123, 300))
    batch = data.get(steps[0])
    assert torch.equal(batch["source"], torch.from_numpy(np.searchsorted(data.offsets, steps[0].numpy(), "right") - 1))
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])


def test_bpe_round_trips_every_byte(bpe_file):
    tok = tokenizers.load(bpe_file)
    sample = SHAKESPEARE[-50_000:] + " ünïcødé ✓ \t\r\n  tabs  and 😀 <|im_start|>"
    assert tok.decode(tok.encode(sample)) == sample and tok.eos_id == 0
    assert tok.vocab_size == 600 and tok.tok.token_to_id("<|im_end|>") == 2


def test_source_tokens_sums_each_sources_trained_tokens():
    from gradtune.objectives.causal_lm import CausalLM

    data = mixture.MixtureWindows([windows(400), windows(300)], ["a", "b"], [0.5, 0.5])
    batch = data.get(torch.tensor([0, 60, 1, 2]))  # a, b, a, a (source a has 49 windows)
    model = torch.nn.Sequential(torch.nn.Embedding(251, 251))
    out = mixture.SourceTokens(CausalLM(), ["a", "b"])(model, batch)
    assert int(out.metrics["tokens_a"]) == 3 * 8 and int(out.metrics["tokens_b"]) == 8
    assert int(out.metrics["tokens_a"] + out.metrics["tokens_b"]) == int(out.count)
