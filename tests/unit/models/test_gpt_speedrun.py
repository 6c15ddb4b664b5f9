"""The speedrun's model choices (gpt.mlp, gpt.qk_norm, gpt.logit_softcap, gpt.zero_init_proj):
each does what it says (hand-written formulas, bounds, identities), the KV cache still equals the
full forward, and the defaults build today's model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gradtune.cli import main
from gradtune.models.generate import generate
from gradtune.models.gpt import GPT, GPTConfig, KVCache
from gradtune.models.gpt_mlp import MLP

SETTINGS = {
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(mlp="relu2"),
    "softcap": dict(logit_softcap=3.0),
    "zero_init": dict(zero_init_proj=True),
    "all": dict(qk_norm=True, mlp="relu2", logit_softcap=3.0, zero_init_proj=True),
}


def model_with(family: str, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset(f"tiny-{family}", **kw)).eval()


def scrambled(model: GPT) -> GPT:
    """Every parameter random (norms away from 1, projections away from 0): a setting that did
    nothing, or a norm applied in the wrong place, shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_defaults_are_the_settings_off(family: str) -> None:
    """The new settings' defaults build the model as before: same keys, same draws, same logits."""
    base = model_with(family)
    own = "gelu" if family == "gpt2" else "swiglu"
    off = model_with(family, mlp=own, qk_norm=False, logit_softcap=None, zero_init_proj=False)
    assert base.config.mlp == own and base.config.intermediate_size == off.config.intermediate_size
    assert list(base.state_dict()) == list(off.state_dict())
    assert not any("q_norm" in k or "k_norm" in k for k in base.state_dict())
    x = torch.randint(0, 256, (2, 12))
    assert torch.equal(base(x), off(x))


def test_relu2_mlp_matches_the_formula() -> None:
    torch.manual_seed(0)
    mlp = MLP(16, 64, "relu2", bias=True)
    x = torch.randn(2, 5, 16)
    h = x @ mlp.c_fc.weight.T + mlp.c_fc.bias
    expected = torch.where(h > 0, h * h, torch.zeros_like(h)) @ mlp.c_proj.weight.T + mlp.c_proj.bias
    torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=0)
    cfg = GPTConfig.preset("tiny-llama", mlp="relu2", intermediate_size=None)
    assert cfg.intermediate_size == 4 * cfg.n_embd  # a plain 4x MLP, as in GPT-2, not SwiGLU's 8/3
    assert GPT(cfg).transformer.h[0].mlp.c_fc.weight.shape == (4 * cfg.n_embd, cfg.n_embd)
    with pytest.raises(ValueError, match="mlp must be one of"):
        GPTConfig(mlp="relu3")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_softcap_bounds_logits_and_is_tanh_of_the_uncapped(family: str) -> None:
    capped = scrambled(model_with(family, logit_softcap=3.0))
    plain = model_with(family)
    plain.load_state_dict(capped.state_dict())
    x = torch.randint(0, 256, (2, 12))
    raw, got = plain(x), capped(x)
    assert raw.abs().max() > 6.0  # the cap binds
    assert got.abs().max() <= 3.0
    torch.testing.assert_close(got, 3.0 * torch.tanh(raw / 3.0), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="logit_softcap"):
        GPTConfig(logit_softcap=0.0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_zero_init_projections_make_each_block_the_identity(family: str) -> None:
    model = model_with(family, zero_init_proj=True)
    base = model_with(family)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert torch.count_nonzero(p) == 0, name
        else:  # the other tensors drew the same numbers as without the setting
            assert torch.equal(p, base.state_dict()[name]), name
    x = torch.randn(2, 7, model.config.n_embd)
    rope = None if family == "gpt2" else (model.rope_cos[:7], model.rope_sin[:7])
    for block in model.transformer.h:
        assert torch.equal(block(x, rope), x)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_qk_norm_adds_per_head_weights_and_normalises_q_and_k(family: str) -> None:
    model = scrambled(model_with(family, qk_norm=True))
    cfg = model.config
    extra = set(model.state_dict()) - set(model_with(family).state_dict())
    assert extra == {f"transformer.h.{i}.attn.{n}_norm.weight" for i in range(cfg.n_layer) for n in "qk"}
    assert model.transformer.h[0].attn.q_norm.weight.shape == (cfg.head_dim,)
    # Hand-written attention: q, k RMS-normalised per head (times their weights), then rotary.
    attn, B, T = model.transformer.h[0].attn, 2, 9
    x = torch.randn(B, T, cfg.n_embd)
    q, k, v = attn.c_attn(x).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q, k, v = (t.view(B, T, -1, cfg.head_dim).transpose(1, 2) for t in (q, k, v))

    def rms(t, w):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    rope = None
    if family == "llama":
        from gradtune.models.gpt import apply_rotary

        rope = (model.rope_cos[:T], model.rope_sin[:T])
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    rep = cfg.n_head // cfg.n_kv_head
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
    torch.testing.assert_close(attn(x, rope, None), attn.c_proj(y), atol=1e-5, rtol=0)
    plain = model_with(family)
    plain.load_state_dict(model.state_dict(), strict=False)
    ids = torch.randint(0, 256, (2, 12))
    assert not torch.allclose(plain(ids), model(ids), atol=1e-3)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_and_generation_equal_the_full_forward(family: str, setting: str) -> None:
    model = model_with(family, **SETTINGS[setting])
    if setting != "zero_init":  # zero projections would make every position's logits alike
        scrambled(model)
    x = torch.randint(0, 256, (2, 14))
    full = model(x)
    cache = KVCache(model.config, 2, torch.float32, torch.device("cpu"))
    parts = [model(x[:, :5], cache=cache), model(x[:, 5:9], cache=cache)]  # prefill, then a chunk
    parts += [model(x[:, i : i + 1], cache=cache) for i in range(9, 14)]  # one token at a time
    # logits up to ~10 after scrambling: float32 rounding of ~1e-6 of that scale differs between one pass
    # and the cached chunks (other GEMM shapes, SDPA vs the C attention), so 3e-5 on small entries too
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=3e-5)
    prompt = x[:, :4]
    a = generate(model, prompt, 12, temperature=1.0, seed=3)
    b = generate(model, prompt, 12, temperature=1.0, seed=3, use_cache=False)
    assert torch.equal(a, b)


def test_a_run_with_every_setting_trains_reloads_generates_and_evaluates(tmp_path: Path, capsys) -> None:
    """Train a tiny llama with all four settings, checkpoint, reload the run and its checkpoint:
    the settings come back (the q/k norm weights trained away from 1), ``generate`` prints what the
    reloaded model decodes, ``eval`` gives the run's final validation loss again."""
    from gradtune.jobs.reload import load_run

    (tmp_path / "t.txt").write_text("to be or not to be, that is the question. " * 200)
    run = tmp_path / "run"
    args = ["model=gpt", f"data={tmp_path / 't.txt'}", "gpt.family=llama", "gpt.n_layer=1", "gpt.n_embd=32"]
    args += ["gpt.n_head=2", "gpt.block_size=32", "batch_size=4", "max_steps=6", "checkpoint_every=3"]
    args += ["gpt.qk_norm=true", "gpt.mlp=relu2", "gpt.logit_softcap=15", "gpt.zero_init_proj=true"]
    args += ["lr=1e-2", "progress=off", "plot=false", f"out_dir={run}"]
    assert main(["train", *args]) == 0
    checkpoint = sorted((run / "checkpoints").iterdir())[0]
    for folder in (run, checkpoint):
        r = load_run(folder)
        cfg = r.model.config
        assert (cfg.qk_norm, cfg.mlp, cfg.logit_softcap, cfg.zero_init_proj) == (True, "relu2", 15.0, True)
        assert not torch.equal(r.model.transformer.h[0].attn.q_norm.weight, torch.ones(cfg.head_dim))
        assert torch.count_nonzero(r.model.transformer.h[0].mlp.c_proj.weight) > 0  # trained away from zero
        ids = torch.tensor([r.tokenizer.encode("to be")])
        expected = generate(r.model.eval(), ids, 8, temperature=None)[0, ids.shape[1] :].tolist()
        capsys.readouterr()
        assert main(["generate", str(folder), "--prompt", "to be", "--temperature", "0", "--max-new-tokens", "8"]) == 0
        assert capsys.readouterr().out.strip() == r.tokenizer.decode(expected).strip()
    assert main(["eval", str(run)]) == 0  # the reloaded model gives the run's own final validation loss
    out = capsys.readouterr().out
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"loss={last['val_loss']:.6g}" in out, (out, last)


def test_runs_saved_before_qk_norm_existed_reload_without_it(tmp_path: Path, capsys) -> None:
    """A llama run's config.yaml from before gpt.qk_norm (no such key) trained without q/k norms:
    it reloads and evaluates as trained, not as today's llama default (QK-norm on); a config
    saved with the key unset keeps the family's; weights without the norms given to a QK-norm
    model name the setting that fits them."""
    from gradtune.jobs.reload import load_run

    (tmp_path / "t.txt").write_text("to be or not to be, that is the question. " * 200)
    args = ["model=gpt", f"data={tmp_path / 't.txt'}", "gpt.family=llama", "gpt.n_layer=1", "gpt.n_embd=32"]
    args += ["gpt.n_head=2", "gpt.block_size=32", "batch_size=4", "max_steps=2", "progress=off", "plot=false"]
    old, new = tmp_path / "old", tmp_path / "new"
    assert main(["train", *args, "gpt.qk_norm=false", f"out_dir={old}"]) == 0
    assert main(["train", *args, f"out_dir={new}"]) == 0
    assert "qk_norm: null" in (new / "config.yaml").read_text()
    saved = (old / "config.yaml").read_text()
    assert "  qk_norm: false\n" in saved
    (old / "config.yaml").write_text(saved.replace("  qk_norm: false\n", ""))  # as a run saved then
    assert load_run(old).model.config.qk_norm is False
    assert load_run(new).model.config.qk_norm is True
    capsys.readouterr()
    assert main(["eval", str(old)]) == 0
    last = json.loads((old / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"loss={last['val_loss']:.6g}" in capsys.readouterr().out
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    assert main(["train", *args, f"init={old / 'model.safetensors'}", f"out_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors: weights do not fit the model" in err[0], err
    assert err[0].endswith("the weights have no q/k norms: set gpt.qk_norm=false"), err
    assert before == {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
