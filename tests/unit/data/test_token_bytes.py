"""A loss per byte: each token's UTF-8 bytes (byte, char and byte-level BPE tokenizers: the sum over
a text's tokens is the text's bytes), the objective's byte sums and a run's ``val_nats_per_byte``;
and a run's own BPE (``text.tokenizer: train``) learns from its training text only."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gradtune import datasets
from gradtune.cli import main
from gradtune.data import bpe, records, text
from gradtune.data import tokenizer as tokenizers
from gradtune.data.token_bytes import token_bytes
from gradtune.objectives.causal_lm import CausalLM

pytest.importorskip("tokenizers")

TEXTS = [
    "ROMEO: But soft, what light through yonder window breaks?",
    "naïve café, Ærøskøbing, 日本語のテキスト, emoji 🙂🎭 and ZWJ 👩‍👩‍👧",
    "  leading spaces\n\n\ttabs and\r\nCRLF  ",
    "",
    "x",
]
CORPUS = datasets.text("shakespeare")[:60_000] + "".join(TEXTS) * 20


def _trained(tmp_path, text: str, vocab: int = 600) -> tokenizers.Tokenizer:
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    shards = records.resolve(str(tmp_path / "c.txt"))
    return tokenizers.load(str(bpe.save(bpe.train([shards], vocab), tmp_path / "tok.json")))


def test_byte_and_char_tables():
    assert torch.equal(token_bytes(tokenizers.ByteTokenizer()), torch.ones(256, dtype=torch.int64))
    char = tokenizers.CharTokenizer.from_text("aé日🙂")
    assert token_bytes(char).tolist() == [1, 2, 3, 4]


def test_a_byte_level_bpe_counts_every_texts_bytes(tmp_path):
    tok = _trained(tmp_path, CORPUS)
    table = token_bytes(tok)
    assert table.shape == (tok.vocab_size,) and table[tok.eos_id] == 0  # <|endoftext|> is not text
    assert table.max() > 3  # merges: tokens of several bytes
    for sample in [*TEXTS, CORPUS[:5000], "a<|endoftext|>b"]:
        ids = tok.encode(sample)
        assert int(table[ids].sum()) == len(sample.replace("<|endoftext|>", "").encode("utf-8")), sample


def test_tokenizers_whose_tokens_have_no_fixed_bytes_have_no_table(tmp_path):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    word = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    word.save(str(tmp_path / "word.json"))
    assert token_bytes(tokenizers.load(str(tmp_path / "word.json"))) is None  # spaces are not tokens
    spec = json.loads(_trained(tmp_path, CORPUS).to_json())
    spec["normalizer"] = json.loads(normalizers.NFKC().__getstate__())
    (tmp_path / "nfkc.json").write_text(json.dumps(spec))
    assert token_bytes(tokenizers.load(str(tmp_path / "nfkc.json"))) is None  # bytes of the text, not the tokens
    spec["normalizer"], spec["decoder"] = None, json.loads(decoders.Metaspace().__getstate__())
    (tmp_path / "meta.json").write_text(json.dumps(spec))
    assert token_bytes(tokenizers.load(str(tmp_path / "meta.json"))) is None


def test_the_objective_sums_the_predicted_tokens_bytes(tmp_path):
    tok = _trained(tmp_path, CORPUS)
    ids = torch.tensor([tok.encode(CORPUS[:400])[:41], tok.encode(TEXTS[1])[:41]])  # (2, 41)
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[1, :7] = -100  # ignored labels (a prompt): not counted
    model = torch.nn.Sequential(torch.nn.Embedding(tok.vocab_size, 8), torch.nn.Linear(8, tok.vocab_size))
    out = CausalLM(token_bytes=token_bytes(tok))(model, {"input_ids": x, "labels": y})
    want = len(tok.decode(y[0].tolist()).encode()) + len(tok.decode(y[1, 7:].tolist()).encode())
    assert int(out.metrics["bytes"]) == want
    assert "bytes" not in CausalLM()(model, {"input_ids": x, "labels": y}).metrics


def test_the_runs_bpe_never_learns_the_held_out_tail(tmp_path):
    """A word found only in the last 4% of a corpus becomes a token when the BPE sees everything,
    and not when it learns from the training share; per source for a mixture."""
    common = datasets.text("shakespeare")[:40_000]
    (tmp_path / "a.txt").write_text(common + " Quuxzorbify" * 120)
    (tmp_path / "b.txt").write_text(common[::-1] + " Vrooglemax" * 120)
    a, b = (records.resolve(str(tmp_path / f)) for f in ("a.txt", "b.txt"))

    def learnt(sources, share: float = 1.0) -> set[str]:
        vocab = json.loads(bpe.train(sources, 700, share=share))["model"]["vocab"]
        return {w for w in ("Quux", "Vroog") if any(w in t for t in vocab)}

    assert learnt([a + b]) == {"Quux", "Vroog"}
    share = bpe.train_share(0.05)
    assert learnt([a + b], share) == {"Quux"}  # one stream: the first source's tail leaks
    assert learnt([a, b], share) == set()
    assert bpe.train_share(0.0) == 1.0 and bpe.train_share(0.05) == pytest.approx(0.95)


@pytest.mark.parametrize("val_fraction", [0.05, 0.1, 0.37])
def test_validation_is_the_same_text_whatever_the_tokenizer(tmp_path, val_fraction, monkeypatch):
    """The split holds the last val_fraction of the bytes: the same text under bytes and a BPE
    (within one token), at most that share; the BPE's token split alone would move it. Small scan
    slices: the tail is counted across several."""
    body = datasets.text("shakespeare")[:30_000] + "Zqxv jwpf ghkm, " * 400  # a tail no BPE merge saw
    tok = _trained(tmp_path, datasets.text("shakespeare")[:30_000])
    (tmp_path / "corpus.txt").write_text(body, encoding="utf-8")
    monkeypatch.setattr(text, "SCAN", 97)
    total = len(body.encode())
    byte_tf = text.tokenize(str(tmp_path / "corpus.txt"), "byte", cache=tmp_path / "cache")
    bpe_tf = text.tokenize(str(tmp_path / "corpus.txt"), str(tmp_path / "tok.json"), cache=tmp_path / "cache")
    n_byte, n_bpe = (text.val_tokens(tf, val_fraction) for tf in (byte_tf, bpe_tf))
    assert n_byte == int(total * val_fraction)  # bytes: the token rule, unchanged
    held = tok.decode(bpe_tf.tokens[bpe_tf.n_tokens - n_bpe :].tolist()).encode().replace(b"<|endoftext|>", b"")
    next_token = tok.decode(bpe_tf.tokens[bpe_tf.n_tokens - n_bpe - 1 : bpe_tf.n_tokens - n_bpe].tolist()).encode()
    assert len(held) <= total * val_fraction < len(held) + len(next_token)  # the most that fit
    assert body.encode().endswith(held)
    assert n_bpe != int(bpe_tf.n_tokens * val_fraction)  # a token share would hold other text
    train, val = text.split(bpe_tf, 16, val_fraction)
    assert (train.n_tokens, val.n_tokens) == (bpe_tf.n_tokens - n_bpe, n_bpe)


def test_a_run_reports_validation_nats_per_byte(tmp_path, capsys):
    (tmp_path / "c.txt").write_text(datasets.text("shakespeare")[:60_000], encoding="utf-8")
    common = ["model=gpt", "gpt.n_layer=1", "gpt.n_head=2", "gpt.n_embd=16", "gpt.block_size=16", "batch_size=4"]
    common += [f"data={tmp_path / 'c.txt'}", "max_steps=4", "eval_every=2", "progress=off", "plot=false"]
    runs = {}
    for name, tok in (("bpe", "train"), ("byte", "byte")):
        out = tmp_path / name
        assert main(["train", *common, "text.vocab_size=600", f"text.tokenizer={tok}", f"out_dir={out}"]) == 0
        runs[name] = json.loads((out / "summary.json").read_text())
    assert "val_nats_per_byte" not in runs["byte"]["metrics"]  # each token is a byte: val_loss is per byte
    m = runs["bpe"]["metrics"]
    # the final validation (full): val_loss per token x tokens / bytes of the predicted text
    assert 1.5 < m["val_loss"] / m["val_nats_per_byte"] < 5  # ~3 bytes a token
    rows = [json.loads(r) for r in (tmp_path / "bpe" / "metrics.jsonl").read_text().splitlines()]
    assert all("val_nats_per_byte" in r and "nats_per_byte" in r for r in rows if "val_loss" in r)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "bpe")]) == 0
    printed = dict(kv.split("=") for kv in capsys.readouterr().out.split() if "=" in kv)
    assert math.isclose(float(printed["nats_per_byte"]), m["val_nats_per_byte"], rel_tol=1e-4)
