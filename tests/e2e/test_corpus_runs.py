"""Corpora, mixtures and your own tokenizer through the CLI, in real processes.

Oracles: the corpus's own bytes (byte tokenizer) for the token file; the uninterrupted run for a
killed one; the 1-process run for torchrun; the tokenizers package / transformers for the BPE.
Large test data is generated here from the embedded Shakespeare and deleted with tmp_path.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gradtune import datasets
from gradtune.cli import main
from gradtune.data import bpe, corpus
from gradtune.jobs.reload import load_run
from gradtune.models.gpt_gguf import load_gguf
from tests import hooks
from tests.e2e.test_distributed import _env, _finish, torchrun, worst_rel

ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE = datasets.text("shakespeare")
QUIET = ["progress=off", "plot=false", "device=cpu"]
TINY = ["model=gpt", "gpt.n_layer=1", "gpt.n_embd=16", "gpt.n_head=2", "gpt.block_size=16", "batch_size=8"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def shards(folder: Path, n: int, size: int, copies: int = 1) -> list[bytes]:
    """``n`` shards alternating .txt.gz (one document) and .jsonl (documents of ~5000 chars),
    each ``copies`` x a slice of Shakespeare; returns each shard's document bytes in order."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        start = (i * size) % len(SHAKESPEARE)
        part = (SHAKESPEARE + SHAKESPEARE)[start : start + size] * copies  # size chars (size <= the text)
        if i % 2 == 0:
            with gzip.open(folder / f"s{i:03d}.txt.gz", "wt", encoding="utf-8", compresslevel=1) as f:
                f.write(part)
            out.append(part.encode())
        else:
            docs = [part[j : j + 5000] for j in range(0, len(part), 5000)]
            with open(folder / f"s{i:03d}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
            out.append("".join(docs).encode())
    return out


# Runs the command given as its arguments, then prints the peak RSS (KiB) of the largest process
# among them and their children: a fresh parent, so no other test's process is counted.
PEAK = "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); " + (
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)"
)


def gradtune(args: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m gradtune args`` (``args[0] == "-"``: under PEAK, the peak RSS last on stderr)."""
    cmd = [sys.executable, "-m", "gradtune", *args]
    if args and args[0] == "-":
        cmd = [sys.executable, "-c", PEAK, sys.executable, "-m", "gradtune", *args[1:]]
    return subprocess.run(
        cmd,
        cwd=ROOT,
        env=_env(**(env or {}), GRADTUNE_CACHE=os.environ["GRADTUNE_CACHE"]),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def entry_meta(cache: Path) -> dict:
    (meta,) = cache.glob("tokens/*/meta.json")
    return json.loads(meta.read_text())


@pytest.mark.slow
def test_killed_tokenisation_resumes_at_the_unfinished_shard(tmp_path):
    """SIGKILL as the 3rd of 6 shards finishes (2 workers): the rerun encodes only the shards
    that were not finished, and the token file is the corpus's bytes, bitwise."""
    docs = shards(tmp_path / "corpus", 6, 2_400_000, copies=2)  # ~20 MB of files: worker processes (corpus.SMALL)
    args = ["train", *TINY, f"data={tmp_path / 'corpus'}", "text.workers=2", "max_steps=1", *QUIET]
    killed = gradtune([*args, f"out_dir={tmp_path / 'a'}"], {hooks.FAULTS: "tokenize.shard@3"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    # finished as the build counts it: the token file and, written after it, its .json count (a
    # worker killed between the two leaves a token file the rerun rightly encodes again)
    files = (tmp_path / "cache").glob("tokens/*/shards/*.tokens")
    done = sorted(p.name for p in files if p.with_suffix(".json").exists())
    assert 3 <= len(done) < 6  # the kill came as the 3rd shard finished (the other worker may finish one more)
    again = gradtune([*args, f"out_dir={tmp_path / 'b'}"])
    assert again.returncode == 0, again.stderr[-2000:]
    meta = entry_meta(tmp_path / "cache")
    finished = {int(name.split(".")[0]) for name in done}
    assert set(meta["encoded_shards"]) == set(range(6)) - finished != set()
    assert f"{6 - len(finished)} of 6 shards encoded" in again.stderr
    tokens = (tmp_path / "cache").glob("tokens/*/tokens")
    assert next(tokens).read_bytes() == b"".join(docs)


MIX = "data=[{{path: {a}, weight: 0.7}}, {{path: {b}, weight: 0.3}}]"


def mixture_args(tmp_path: Path) -> list[str]:
    a, b = tmp_path / "corpus", tmp_path / "plays.txt"
    if not a.exists():
        shards(a, 4, 100_000)
        b.write_text(SHAKESPEARE[-300_000:])
    return [*TINY, MIX.format(a=a, b=b), "text.workers=2", "dtype=float64", "seed=5", "val_fraction=0.05"]


@pytest.mark.slow
def test_torchrun_mixture_tokenises_once_and_samples_the_batches_of_one_process(tmp_path):
    """2 processes: one tokenises each source (the other waits on the cache lock and maps it),
    the global batches are the 1-process run's, and so are the final weights."""
    base = mixture_args(tmp_path)
    run = ["-m", "gradtune", "train", *base, "max_steps=6", "eval_every=3", *QUIET]
    out = _finish(torchrun(2, [*run, f"out_dir={tmp_path / 'two'}"], **{hooks.PROBE: str(tmp_path / "p2")}))
    assert out.count("tokenised ") == 2, out[-3000:]  # two sources, each tokenised by one process
    one = gradtune([*run[2:], f"out_dir={tmp_path / 'one'}"], {hooks.PROBE: str(tmp_path / "p1")})
    assert one.returncode == 0 and "tokenised" not in one.stderr  # the cache is shared
    assert hooks.probe_steps(tmp_path / "p2") == hooks.probe_steps(tmp_path / "p1")
    w2, w1 = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("two", "one"))
    assert worst_rel(w2, w1) < 1e-9  # float64: the same run up to the order of the ranks' sums


@pytest.mark.slow
def test_mixture_kill_resume_is_bitwise(tmp_path):
    base = [*mixture_args(tmp_path), "max_steps=12", "checkpoint_every=2", "resume=auto", *QUIET]
    ref = gradtune(["train", *base, f"out_dir={tmp_path / 'ref'}"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = gradtune(["train", *base, f"out_dir={tmp_path / 'run'}"], {hooks.FAULTS: "step.begin@8"})
    assert killed.returncode == -9
    resumed = gradtune(["train", *base, f"out_dir={tmp_path / 'run'}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ref", "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("kind") == "resume" for r in metrics), "the rerun must continue from a checkpoint"
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())["job"]
    assert [s["weight"] for s in summary["sources"]] == [0.7, 0.3]


@pytest.mark.slow
def test_own_tokenizer_round_trips_pretrains_generates_and_exports(tmp_path, capsys):
    """``tokenizer train`` on the embedded Shakespeare at vocab 4096: every byte round-trips; a
    llama GPT pretrains with it, generates, and its GGUF loads in our loader and in transformers
    with the same tokens; ``text.tokenizer: train`` trains one on the training plays, once."""
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    tok_path = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "shakespeare", "--vocab-size", "4096", "--out", str(tok_path)]) == 0
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tok_path))
    ids = hf.encode(SHAKESPEARE).ids
    assert hf.decode(ids) == SHAKESPEARE and hf.get_vocab_size() == 4096  # every byte back
    assert len(SHAKESPEARE.encode()) / len(ids) > 2.5  # a real BPE: ~3 bytes per token
    assert main(["tokenizer", "train", "shakespeare", "--vocab-size", "4096", "--out", str(tok_path)]) == 2
    run_dir = tmp_path / "run"
    gpt = [*TINY, "gpt.family=llama", "gpt.block_size=32", "max_steps=2", "val_fraction=0.05", *QUIET]
    assert main(["train", *gpt, "data=shakespeare", f"text.tokenizer={tok_path}", f"out_dir={run_dir}"]) == 0
    cache = json.loads((run_dir / "summary.json").read_text())["job"]["token_cache"]
    want = hf.encode(SHAKESPEARE + "<|endoftext|>").ids  # streamed in pieces, encoded as the whole text
    assert np.array_equal(np.fromfile(cache, dtype=np.uint16), want)
    assert main(["generate", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "5", "--seed", "0", "--echo"]) == 0
    assert "ROMEO:" in capsys.readouterr().out
    out = tmp_path / "m.gguf"
    assert main(["export", str(run_dir), "--gguf", str(out), "--type", "f32"]) == 0
    run = load_run(run_dir)
    sample = "ROMEO: But soft, what light through yonder window breaks?<|endoftext|>"
    ids = torch.tensor([run.tokenizer.encode(sample)])
    with torch.no_grad():
        torch.testing.assert_close(load_gguf(out)(ids), run.model(ids), atol=1e-5, rtol=0)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert theirs(sample)["input_ids"] == ids[0].tolist() == hf.encode(sample).ids
    # The ChatML markers it was trained with come out as a chat template: in the GGUF, in the
    # transformers folder, and as Ollama's ChatML template with <|im_end|> as a stop.
    chat = [{"role": "user", "content": "Who art thou?"}]
    want_text = "<|im_start|>user\nWho art thou?<|im_end|>\n<|im_start|>assistant\n"
    assert theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == want_text
    assert main(["export", str(run_dir), "--hf", str(tmp_path / "hf")]) == 0
    folder_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert folder_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == want_text
    q = tmp_path / "ollama" / "m.gguf"
    assert main(["export", str(run_dir), "--gguf", str(q), "--type", "q8_0", "--ollama"]) == 0
    modelfile = (q.parent / "Modelfile").read_text()
    assert "<|im_start|>assistant" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile, modelfile
    # text.tokenizer: train learns from the training text alone (not the held-out plays), once.
    trained = tmp_path / "trained"
    for _ in range(2):
        assert main(["train", *gpt, "data=shakespeare", "text.tokenizer=train", f"out_dir={trained}"]) == 0
    (shard,) = corpus.shards_of("shakespeare")[1:]
    want = bpe.train([shard], 4096, share=bpe.train_share(0.05))
    assert (trained / "tokenizer.json").read_text() == want != tok_path.read_text()
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.json"))) == 1


def _sha(chunks) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


@pytest.mark.slow
@pytest.mark.long
def test_2gib_corpus_tokenises_in_bounded_memory_and_pretrains(tmp_path):
    """A 2 GiB folder of .txt.gz and .jsonl shards: the tokenising process (and its workers)
    peak under 1.5 GiB RSS, the token file is the corpus's bytes, and a GPT trains on it.
    The corpus and its tokens are deleted at the end, pass or fail (not left for pytest's
    retention of the last runs' tmp folders)."""
    try:
        copies, size = 46, 1_200_000  # 40 shards x 46 x 1.2 MB ~ 2.06 GiB of text
        docs = shards(tmp_path / "big", 40, size, copies)
        total = sum(len(d) for d in docs)
        assert total >= 2 << 30
        want = _sha(docs)
        del docs
        args = ["train", *TINY, f"data={tmp_path / 'big'}", "max_steps=2", "val_fraction=0.0001", "precision=fp32"]
        p = gradtune(["-", *args, *QUIET, f"out_dir={tmp_path / 'out'}"], timeout=1800)  # "-": measured by PEAK
        assert p.returncode == 0, p.stderr[-3000:]
        peak_kib = int(p.stderr.strip().splitlines()[-1])  # the largest of the gradtune process and its workers
        print(f"2 GiB corpus: peak RSS {peak_kib / (1 << 20):.2f} GiB; {p.stderr.strip().splitlines()[0]}")
        assert peak_kib < 1.5 * (1 << 20), f"peak RSS {peak_kib / (1 << 20):.2f} GiB"
        (tokens,) = (tmp_path / "cache").glob("tokens/*/tokens")
        assert tokens.stat().st_size == total
        with open(tokens, "rb") as f:
            assert _sha(iter(lambda: f.read(1 << 24), b"")) == want
        assert np.memmap(tokens, dtype=np.uint8, mode="r")[:5].tobytes() == SHAKESPEARE[:5].encode()
    finally:
        shutil.rmtree(tmp_path / "big", ignore_errors=True)
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
