"""Text data: tokenizers, the token cache, windows, the causal-LM objective, the LM job, bad input.

Oracles: a tokenizer's own ``encode`` for the token file, ``tokens[1:]`` for the labels, the
one-shot gradient (float64) for micro-batched accumulation, PyTorch's mean cross-entropy.
"""

import contextlib
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradtune import datasets
from gradtune.cli import main
from gradtune.config import load_config
from gradtune.data import corpus, text, tokenizer
from gradtune.data.sampler import Sampler
from gradtune.jobs.registry import BUILDERS
from gradtune.jobs.text import build_text, save_tokenizer, text_job
from gradtune.loop.fit import fit
from gradtune.loop.gradient import accumulate
from gradtune.objectives.causal_lm import CausalLM
from gradtune.runtime import cache as cache_root
from gradtune.runtime.errors import GradtuneError

CPU = torch.device("cpu")
SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak. Ünïcødé ✓\n"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets its own token cache; nothing is written to ~/.cache."""
    monkeypatch.setenv(cache_root.ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokens"


def write(tmp_path, content, name="t.txt"):
    p = tmp_path / name
    p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return str(p)


def hf_tokenizer_file(tmp_path, corpus=SAMPLE * 5):
    """A tiny BPE tokenizer.json trained on the spot (no download), with an end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [corpus],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<unk>", "<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.enable_truncation(max_length=8)  # as a classifier's tokenizer.json may carry: must be ignored
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return str(path)


# ------------------------------------------------------------------------------- tokenizers
def test_byte_tokenizer_round_trip_and_invalid_bytes():
    tok = tokenizer.load("byte")
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8")) and max(ids) < tok.vocab_size == 256
    assert tok.decode(ids) == SAMPLE
    assert np.array_equal(tok.encode_array(SAMPLE), ids)
    assert tok.decode([0xC3]) == "\ufffd"  # half a character decodes to U+FFFD, no exception


def test_char_tokenizer_vocab_round_trip_and_save(tmp_path):
    tok = tokenizer.load("char", SAMPLE)
    assert tok.vocab_size == len(set(SAMPLE)) and tok.chars == sorted(set(SAMPLE))
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert np.array_equal(tok.encode_array(SAMPLE), tok.encode(SAMPLE))
    back = tokenizer.load(str(tokenizer.save(tok, tmp_path / "tok.json")))
    assert back.chars == tok.chars and back.fingerprint() == tok.fingerprint()
    with pytest.raises(GradtuneError, match="'Z' is not in its vocabulary"):
        tok.encode_array("Zed")


def test_hf_tokenizer_encodes_like_tokenizers_and_saves_byte_for_byte(tmp_path):
    from tokenizers import Tokenizer

    path = hf_tokenizer_file(tmp_path)
    tok = tokenizer.load(path)
    oracle = Tokenizer.from_file(path)
    oracle.no_truncation()
    assert tok.encode(SAMPLE) == oracle.encode(SAMPLE, add_special_tokens=False).ids
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert tok.vocab_size == oracle.get_vocab_size(with_added_tokens=True)
    assert tok.eos_id == oracle.token_to_id("<|endoftext|>")
    parts = list(tokenizer.pieces(SAMPLE * 5, 40))  # line-aligned pieces encode like the whole
    assert "".join(parts) == SAMPLE * 5 and len(parts) > 3
    assert [i for p in parts for i in tok.encode(p)] == tok.encode(SAMPLE * 5)
    assert np.array_equal(tok.encode_array(SAMPLE * 5), tok.encode(SAMPLE * 5))
    saved = tokenizer.save(tok, tmp_path / "out" / "tokenizer.json")
    assert saved.read_bytes() == open(path, "rb").read()


# ------------------------------------------------------------------------------- token file
@pytest.mark.parametrize("spec", ["byte", "char", "hf"])
def test_token_file_equals_encode_and_is_reused(tmp_path, monkeypatch, spec):
    spec = hf_tokenizer_file(tmp_path) if spec == "hf" else spec
    src = write(tmp_path, SAMPLE * 3)
    calls = []
    real = corpus.encode_texts
    monkeypatch.setattr(corpus, "encode_texts", lambda tok, texts: calls.append(1) or real(tok, texts))
    first = text.tokenize(src, spec)
    tok = tokenizer.load(spec, SAMPLE * 3)
    oracle = tok.encode(SAMPLE * 3) + ([tok.eos_id] if tok.eos_id is not None else [])  # a document ends with eos
    assert first.tokens.dtype == (np.uint8 if tok.vocab_size <= 256 else np.uint16)
    assert list(first.tokens) == oracle and not first.cache_hit
    assert first.n_tokens > 100  # a tokenizer.json's truncation (max_length=8) is switched off
    mtime, n_calls = os.stat(first.path).st_mtime_ns, len(calls)
    assert n_calls >= 1
    second = text.tokenize(src, spec)
    assert second.cache_hit and len(calls) == n_calls, "a second run must not tokenise again"
    assert second.path == first.path and os.stat(second.path).st_mtime_ns == mtime
    assert np.array_equal(second.tokens, first.tokens)
    eos = second.tokenizer.eos_id
    assert second.tokenizer.decode([t for t in second.tokens if t != eos]) == SAMPLE * 3


def test_cache_key_follows_content_and_tokenizer(tmp_path, cache):
    a = text.tokenize(write(tmp_path, SAMPLE), "byte")
    b = text.tokenize(write(tmp_path, SAMPLE + "x"), "byte")  # same path, new content
    c = text.tokenize(write(tmp_path, SAMPLE + "x"), "char")
    assert len({a.path, b.path, c.path}) == 3 and not b.cache_hit and not c.cache_hit
    assert a.path.parent.parent == cache
    b.path.write_bytes(b"\0\0")  # a damaged entry is rebuilt, not trusted
    again = text.tokenize(write(tmp_path, SAMPLE + "x"), "byte")
    assert not again.cache_hit and again.n_tokens == len((SAMPLE + "x").encode())


def test_large_vocab_uses_uint32(tmp_path, monkeypatch):
    class Wide(tokenizer.ByteTokenizer):
        vocab_size = 70_000

        def encode_array(self, s):
            return super().encode_array(s) + 69_000

        def fingerprint(self):
            return "wide"

    monkeypatch.setattr(tokenizer, "load", lambda spec, t=None: Wide())
    tf = text.tokenize(write(tmp_path, "hello"), "wide")
    assert tf.tokens.dtype == np.uint32 and list(tf.tokens) == [b + 69_000 for b in b"hello"]


def test_embedded_shakespeare():
    raw = datasets.text_bytes("shakespeare")
    assert 4_500_000 < len(raw) < 5_200_000 and "diabetes" in datasets.EMBEDDED  # all 37 plays
    s = datasets.text("shakespeare")
    assert s.startswith("HAMLET") and "To be, or not to be" in s and "\r" not in s
    assert "gutenberg" not in s.lower()
    assert (datasets.HERE / "shakespeare.txt.gz").stat().st_size < 2_500_000
    assert s.endswith("[Exit.]\n")  # the last play is whole: nothing cut
    tail = raw[len(raw) - len(raw) // 20 :]  # the 5% validation split: held-out whole plays
    assert b"TWELFTH NIGHT" in tail and b"HAMLET" not in tail


# ------------------------------------------------------------------------------- windows
def test_windows_shift_by_one_and_cover_every_label_once(tmp_path):
    tf = text.tokenize(write(tmp_path, SAMPLE * 4), "byte")
    T = 16
    train, val = text.split(tf, T, val_fraction=0.25)
    n_train = tf.n_tokens - int(tf.n_tokens * 0.25)
    assert len(train) == (n_train - 1) // T and len(val) == (tf.n_tokens - n_train - 1) // T
    b = train.get(torch.arange(len(train)))
    assert b["input_ids"].shape == b["labels"].shape == (len(train), T) and b["labels"].dtype == torch.long
    toks = torch.from_numpy(tf.tokens.astype(np.int64))
    assert torch.equal(b["input_ids"].reshape(-1), toks[: len(train) * T])  # inputs do not overlap
    assert torch.equal(b["labels"].reshape(-1), toks[1 : len(train) * T + 1])  # each token a label once
    assert int(b["labels"].shape[0] * T) < n_train  # no validation token is a training label
    v = val.get(torch.tensor([0]))
    assert torch.equal(v["input_ids"][0], toks[n_train : n_train + T])
    assert torch.equal(train.get(torch.tensor([3, 1]))["sample_id"], torch.tensor([3, 1]))


def test_sampler_over_windows_sees_each_window_once_per_epoch_reshuffled(tmp_path):
    tf = text.tokenize(write(tmp_path, SAMPLE * 8), "byte")
    train, _ = text.split(tf, 8, 0.0)
    s = Sampler(len(train), 5, seed=1)
    epochs = []
    for _ in range(2):
        ids = []
        while True:
            step = next(s)
            ids += [int(i) for m in step.micro for i in train.get(m)["sample_id"]]
            if step.epoch_end:
                break
        epochs.append(ids)
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(len(train))) and epochs[0] != epochs[1]


# ------------------------------------------------------------------------------- objective
class TinyLM(nn.Module):
    """Embedding + linear: enough of an 'LM' to test losses and plumbing."""

    def __init__(self, vocab: int, dim: int = 8) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)

    def forward(self, input_ids):
        return self.head(torch.tanh(self.emb(input_ids)))  # (B, T, V)


def test_causal_lm_accumulation_equals_one_shot_with_uneven_ignored_tokens():
    torch.manual_seed(0)
    V, B, T = 11, 6, 7
    model = TinyLM(V).double()
    ids = torch.randint(0, V, (B, T))
    labels = torch.randint(0, V, (B, T))
    labels[0, :5] = -100  # micro-batches below hold 5+0, 14+1 and 0 ignored labels: uneven counts
    labels[2, :] = -100
    labels[3, :7] = -100
    labels[4, 2] = -100

    class Data:
        def __len__(self):
            return B

        def get(self, idx):
            return {"input_ids": ids[idx], "labels": labels[idx], "sample_id": idx}

    obj = CausalLM()

    def grads(micro):
        model.zero_grad(set_to_none=True)
        loss_sum, count, _ = accumulate(model, obj, Data(), micro, CPU, contextlib.nullcontext())
        return torch.cat([p.grad.reshape(-1) / count for p in model.parameters()]), loss_sum / count

    one, loss1 = grads([torch.arange(B)])
    acc, loss2 = grads([torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5])])
    assert ((acc - one).norm() / one.norm()).item() < 1e-6
    oracle = F.cross_entropy(model(ids).reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(loss1, oracle) and torch.allclose(loss2, oracle)
    model.zero_grad(set_to_none=True)
    oracle.backward()
    ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert ((acc - ref).norm() / ref.norm()).item() < 1e-6
    assert int(obj(model, Data().get(torch.arange(B))).count) == int((labels != -100).sum())


# ------------------------------------------------------------------------------- the LM job
def tiny_cfg(tmp_path, *extra):
    src = write(tmp_path, SAMPLE * 20, "corpus.txt")
    return load_config(
        None,
        [
            "model=gpt",
            f"data={src}",
            "gpt.block_size=16",
            "val_fraction=0.1",
            "batch_size=8",
            "max_steps=4",
            "optimizer=adamw",
            "lr=0.01",
            "progress=off",
            "plot=false",
            f"out_dir={tmp_path / 'run'}",
            *extra,
        ],
    )


def test_text_job_trains_a_stand_in_model(tmp_path):
    cfg = tiny_cfg(tmp_path, "text.tokenizer=char", "weight_decay=0.1")
    job = text_job(cfg, lambda vocab, gpt: TinyLM(vocab))
    info = job.info
    assert job.task == "lm" and info["tokenizer"] == "char" and info["vocab_size"] == len(set(SAMPLE))
    assert info["n_train_tokens"] + info["n_val_tokens"] == info["n_tokens"] == len(SAMPLE * 20)
    assert os.path.exists(info["token_cache"]) and info["train_windows"] == len(job.train)
    assert [g.get("weight_decay") for g in job.param_groups] == [0.1, 0.0]
    json.dumps(info)  # job.json must be able to hold it
    result = fit(job, cfg)
    assert result.steps == 4 and np.isfinite(result.val_loss)
    saved = save_tokenizer(job, tmp_path / "run")
    assert tokenizer.load(str(saved)).decode(tokenizer.load(str(saved)).encode("hear me")) == "hear me"


def test_build_text_passes_gpt_section_fields(tmp_path, monkeypatch):
    """build_text builds GPT(GPTConfig(vocab_size, <cfg.gpt fields GPTConfig has>))."""
    import dataclasses

    from gradtune.jobs import text as jobs_text

    @dataclasses.dataclass
    class GPTConfig:
        vocab_size: int = 0
        block_size: int = 0
        n_layer: int = 0

    seen = {}

    class GPT(TinyLM):
        def __init__(self, c):
            seen["config"] = c
            super().__init__(c.vocab_size)

    monkeypatch.setattr(jobs_text, "GPT", GPT)
    monkeypatch.setattr(jobs_text, "GPTConfig", GPTConfig)
    job = build_text(tiny_cfg(tmp_path, "gpt.n_layer=3"))
    assert seen["config"] == GPTConfig(vocab_size=256, block_size=16, n_layer=3)
    assert job.info["tokenizer"] == "byte"


# ------------------------------------------------------------------------------- bad input
def bad(tmp_path, spec="byte", block=16, val=0.1, content=SAMPLE * 20, data=None):
    src = data if data is not None else write(tmp_path, content)
    with pytest.raises(GradtuneError) as e:
        tf = text.tokenize(src, spec)
        text.split(tf, block, val)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_bad_text_inputs(tmp_path):
    assert "data not found: /nope/t.txt" in bad(tmp_path, data="/nope/t.txt")
    assert "t.txt: empty shard" in bad(tmp_path, content="")
    msg = bad(tmp_path, content="to be or not", block=64)
    assert "12 tokens" in msg and "block_size + 1 = 65" in msg and "training split 11" in msg
    msg = bad(tmp_path, content="x" * 100, block=16, val=0.1)
    assert "validation split 10" in msg and "block_size + 1 = 17" in msg
    assert "t.txt:2: not UTF-8" in bad(tmp_path, content=b"ok\n\xff\xfe")
    assert "tabular" in bad(tmp_path, data="diabetes")


def test_bad_tokenizer_inputs(tmp_path, monkeypatch):
    assert "tokenizer file not found: /nope/tokenizer.json" in bad(tmp_path, "/nope/tokenizer.json")
    assert "not a valid tokenizer.json" in bad(tmp_path, write(tmp_path, "not json {", "a.json"))
    assert "not a valid tokenizer.json" in bad(tmp_path, write(tmp_path, '{"model": 1}', "b.json"))
    with pytest.raises(GradtuneError, match=r"vocab_size 4,294,967,297 does not fit a uint32"):
        text.token_dtype(2**32 + 1)

    class Liar(tokenizer.ByteTokenizer):
        name, vocab_size = "liar", 100  # but bytes go up to 255

    monkeypatch.setattr(tokenizer, "load", lambda spec, t=None: Liar())
    assert "tokenizer liar produced id 119, outside its vocab_size 100" in bad(tmp_path, "liar", content="hello world")


def test_cli_rejects_bad_text_in_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(BUILDERS, "gpt", lambda cfg: text_job(cfg, lambda v, g: TinyLM(v)))
    out = tmp_path / "out"
    for args, needle in [
        (["data=" + write(tmp_path, "", "e.txt")], "e.txt: empty shard"),
        (["data=" + write(tmp_path, "short", "s.txt"), "gpt.block_size=8"], "block_size + 1 = 9"),
        (["text.tokenizer=nope.json", "data=shakespeare"], "tokenizer file not found"),
        (["data=shakespeare", "loss=mse"], "does not fit a language model"),
    ]:
        code = main(["train", "model=gpt", *args, f"out_dir={out}", "progress=off"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
        assert not out.exists()
