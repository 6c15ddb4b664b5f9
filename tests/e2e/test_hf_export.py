"""``gradtune export RUN --hf OUT``: a GPT pretrained here, as a transformers folder.

Oracle: transformers. ``AutoModelForCausalLM.from_pretrained(OUT)`` gives the logits of the run as
``gradtune generate`` loads it (``load_run``) within 1e-5 in float32, and greedy generation of 50
tokens by transformers' ``generate`` equals ours (``models/generate.py``), for a Llama-family run
(grouped-query attention, untied head, a BPE tokenizer.json with an end-of-text token), one with
the family's default q/k norms (Qwen3ForCausalLM, byte tokenizer) and a GPT-2-family run (char
tokenizer, tied head). ``AutoTokenizer`` / ``tokenizers`` loaded from the
folder encode a sample to the run's ids (byte, char and tokenizer.json). Exporting twice, or into
a folder of the user's, is one line, exit 2, everything byte-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradtune.cli import main
from gradtune.data.tokenizer import ByteTokenizer, CharTokenizer
from gradtune.data.tokenizer_json import hf_tokenizer_json
from gradtune.finetune import gpt_hf_export
from gradtune.jobs.reload import load_run
from gradtune.models.generate import generate
from gradtune.models.gpt import GPT, GPTConfig
from gradtune.runtime.errors import GradtuneError
from tests.e2e.test_output_safety import QUIET, refused, snapshot

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = (
    "the quick brown fox jumps over the lazy dog. what time is it? answer the question now, "
    "hello world 12345 free prize call me at home.\n"
) * 30
SAMPLE = "the lazy fox answers, hello world 123."
UNICODE = "naïve café — 😀 \t\n ok"  # multi-byte UTF-8: byte ids are its bytes
# fp32, lr high enough that 60 steps give logits far from ties (greedy decoding must not hinge
# on a 1e-7 difference between two implementations)
TINY = [
    "model=gpt",
    "gpt.n_layer=2",
    "gpt.n_embd=32",
    "gpt.n_head=4",
    "gpt.block_size=64",
    "batch_size=8",
    "max_steps=60",
    "lr=0.01",
    "precision=fp32",
    "val_fraction=0",
    *QUIET,
]
RUNS = {
    "llama": [
        "gpt.family=llama",
        "gpt.qk_norm=false",
        "gpt.n_kv_head=2",
        "gpt.tie_embeddings=false",
        "text.tokenizer=BPE",
    ],
    "qwen3": ["gpt.family=llama", "text.tokenizer=byte"],  # the family's default q/k norms: Qwen3's block
    "gpt2": ["gpt.family=gpt2", "text.tokenizer=char"],
}


@pytest.fixture(autouse=True)
def _offline(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _bpe(path: Path) -> Path:
    """A small byte-level BPE with <|endoftext|> (id 0), trained on TEXT, as a tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{family: (run folder, exported folder)} of two tiny finished runs."""
    root = tmp_path_factory.mktemp("hf_export")
    (root / "text.txt").write_text(TEXT)
    bpe = _bpe(root / "bpe.json")
    out = {}
    for family, args in RUNS.items():
        run, dest = root / f"run-{family}", root / f"hf-{family}"
        args = [a.replace("=BPE", f"={bpe}") for a in args]
        assert main(["train", f"data={root / 'text.txt'}", f"out_dir={run}", *TINY, *args]) == 0
        assert main(["export", str(run), "--hf", str(dest)]) == 0
        out[family] = (run, dest)
    return out


@pytest.mark.parametrize("family", list(RUNS))
def test_transformers_gives_our_logits_and_greedy_tokens(exported, family):
    run_dir, dest = exported[family]
    run = load_run(run_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(dest)).eval()
    expected_class = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]
    assert type(theirs).__name__ == expected_class and next(theirs.parameters()).dtype == torch.float32
    ids = torch.tensor([run.tokenizer.encode(SAMPLE)])[:, :12]  # (1, 12): 12 + 50 new <= block_size 64
    with torch.no_grad():
        ours_logits, their_logits = run.model(ids), theirs(ids).logits  # (1, 12, V)
    assert ours_logits.abs().max() > 1.0  # trained: not a near-uniform model where argmax is a coin toss
    torch.testing.assert_close(their_logits, ours_logits, atol=1e-5, rtol=0)
    ours = generate(run.model, ids, 50, temperature=0, eos_id=run.tokenizer.eos_id)
    their = theirs.generate(ids, max_new_tokens=50, do_sample=False)
    assert their.tolist() == ours.tolist() and ours.shape[1] == ids.shape[1] + 50  # 50 compared, no early EOS
    cfg = json.loads((dest / "config.json").read_text())
    gen = json.loads((dest / "generation_config.json").read_text())
    eos = run.tokenizer.eos_id
    assert cfg["eos_token_id"] == eos and gen.get("eos_token_id") == eos
    if family == "llama":  # the run's settings as transformers names them
        assert (cfg["num_key_value_heads"], cfg["tie_word_embeddings"], cfg["hidden_act"]) == (2, False, "silu")
        assert (cfg["rope_theta"], cfg["rms_norm_eps"], eos) == (10000.0, 1e-5, 0)
    elif family == "qwen3":
        assert (cfg["model_type"], cfg["use_sliding_window"], cfg["head_dim"], eos) == ("qwen3", False, 8, None)
    else:
        assert (cfg["activation_function"], cfg["n_inner"], eos) == ("gelu_new", 128, None)


@pytest.mark.parametrize("family", list(RUNS))
def test_the_folders_tokenizer_encodes_the_runs_ids(exported, family):
    run_dir, dest = exported[family]
    run = load_run(run_dir)
    expected = run.tokenizer.encode(SAMPLE)
    auto = transformers.AutoTokenizer.from_pretrained(str(dest))
    assert auto(SAMPLE)["input_ids"] == expected
    assert auto.decode(expected) == SAMPLE
    assert tokenizers.Tokenizer.from_file(str(dest / "tokenizer.json")).encode(SAMPLE).ids == expected
    if family == "llama":  # a tokenizer.json run: its own file, byte for byte, and its end-of-text token
        assert (dest / "tokenizer.json").read_bytes() == (run_dir / "tokenizer.json").read_bytes()
        assert auto.eos_token == "<|endoftext|>" and auto.eos_token_id == 0


def test_byte_and_char_tokenizers_as_tokenizer_json():
    for tok, text in ((ByteTokenizer(), UNICODE + SAMPLE), (CharTokenizer.from_text(TEXT), SAMPLE)):
        hf = tokenizers.Tokenizer.from_str(hf_tokenizer_json(tok))
        ids = tok.encode(text)
        assert hf.encode(text).ids == ids and hf.decode(ids) == text
        assert hf.get_vocab_size() == tok.vocab_size
    assert tokenizers.Tokenizer.from_str(hf_tokenizer_json(ByteTokenizer())).encode("é").ids == [0xC3, 0xA9]


def test_exporting_twice_or_into_a_users_folder_is_refused(exported, capsys, tmp_path):
    run, dest = exported["gpt2"]
    before = snapshot(dest, run)
    refused(capsys, ["export", str(run), "--hf", str(dest)], "not empty")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    refused(capsys, ["export", str(run), "--hf", str(mine)], "not empty")
    assert snapshot(dest, run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert (mine / "notes.txt").read_text() == "keep" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_a_gpt2_model_without_biases_gets_zero_biases_and_unexpressible_shapes_are_refused(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny-gpt2", vocab_size=256, bias=False)).eval()
    gpt_hf_export.export_gpt_hf(model, ByteTokenizer(), tmp_path / "nobias")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "nobias")).eval()
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), atol=1e-5, rtol=0)
    odd = GPT(GPTConfig.preset("tiny-gpt2", head_dim=16))  # 2 heads of 16 in a width of 64
    with pytest.raises(GradtuneError, match="head size"):
        gpt_hf_export.export_gpt_hf(odd, ByteTokenizer(), tmp_path / "odd")
    biased = GPT(GPTConfig.preset("tiny-llama", bias=True))
    with pytest.raises(GradtuneError, match="biases"):
        gpt_hf_export.export_gpt_hf(biased, ByteTokenizer(), tmp_path / "biased")
    with pytest.raises(GradtuneError, match="do not belong together"):
        gpt_hf_export.export_gpt_hf(GPT(GPTConfig.preset("tiny-gpt2", vocab_size=100)), ByteTokenizer(), tmp_path / "v")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nobias"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_speedrun_settings_export_or_are_refused_by_name(tmp_path, family):
    """zero_init_proj changes only the starting weights: exported, transformers gives our logits; so
    does qk_norm on a llama block (written as Qwen3ForCausalLM). logit_softcap, an MLP other than the
    family's and a gpt2 block's qk_norm have no counterpart: refused, nothing written."""
    torch.manual_seed(0)
    qk = dict(qk_norm=True) if family == "llama" else {}
    model = GPT(GPTConfig.preset(f"tiny-{family}", vocab_size=256, zero_init_proj=True, **qk)).eval()
    with torch.no_grad():  # trained-looking projections: a zero one dropped on export would show
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(0.0, 0.05)
            elif name.endswith("norm.weight"):  # q/k norms away from 1: a dropped one would show
                p.normal_(1.0, 0.2)
    gpt_hf_export.export_gpt_hf(model, ByteTokenizer(), tmp_path / "zero")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "zero")).eval()
    assert type(theirs).__name__ == ("Qwen3ForCausalLM" if family == "llama" else "GPT2LMHeadModel")
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), atol=1e-5, rtol=0)
    other = "swiglu" if family == "gpt2" else "gelu"
    refused_qk = [("gpt.qk_norm=true", dict(qk_norm=True))] if family == "gpt2" else []
    for setting, kw in [
        *refused_qk,
        ("gpt.logit_softcap=30", dict(logit_softcap=30.0)),
        ("gpt.mlp=relu2", dict(mlp="relu2")),
        (f"gpt.mlp={other}", dict(mlp=other)),
    ]:
        m = GPT(GPTConfig.preset(f"tiny-{family}", vocab_size=256, **kw))
        with pytest.raises(GradtuneError, match=f"^export --hf: {setting} .*has no counterpart"):
            gpt_hf_export.export_gpt_hf(m, ByteTokenizer(), tmp_path / "refused")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zero"]
