"""``gradtune export RUN --gguf``: a LoRA-tuned SmolLM2-135M (GGUF base) and our llama-family
GPT written as GGUF reload in our GGUF loader and in transformers with the run's own logits
(f32 equal, q8_0 within a measured bound) and the same tokenizer; bad input exits 2, one line,
nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradtune.cli import main
from gradtune.commands import export as export_cmd
from gradtune.jobs.reload import load_run
from gradtune.models.gpt_gguf import load_gguf
from tests.e2e.conftest import SMOLLM2_RUN
from tests.e2e.test_output_safety import QUIET, refused

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
from tests.unit.finetune.test_gguf_export import TEXT, bpe_folder  # noqa: E402

SAMPLE = "What is the capital of Italy? ANSWER: Rome. 2024 <|im_start|>user\nhi<|im_end|>"
# q8_0 against the run's float32 logits on SAMPLE (49152 logits x 25 positions, spanning about
# -25..30): measured max |diff| 1.07 and mean 0.154, the same top-1 token at every position (the
# base's Q4_1 weights re-quantised to 8 bits: 0.6% relative RMS error per matrix); asserted at
# ~2x. f32: measured max 5.7e-5.
Q8_MAX, Q8_MEAN = 2.0, 0.3
# q4_k_m against the f32 export of the hidden-256 run below (logits -1.28..2.53 on its prompt):
# measured max |diff| 0.145; asserted at ~2x
K4M_MAX = 0.3
TINY_GPT = [
    "model=gpt",
    "gpt.n_layer=2",
    "gpt.n_embd=32",
    "gpt.n_head=4",
    "gpt.block_size=16",
    "batch_size=4",
    "max_steps=2",
    "val_fraction=0",
    *QUIET,
]


@pytest.mark.slow
@SMOLLM2_RUN
def test_smollm2_lora_run_exports_f32_and_q8_0(smollm2_lora_run, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = smollm2_lora_run
    runs = []  # one load of the run (a GGUF base load is the slow part) for both exports and the reference
    monkeypatch.setattr(
        export_cmd, "load_run", lambda folder: runs[0] if runs else runs.append(load_run(folder)) or runs[0]
    )
    out = tmp_path / "gguf"
    for qtype in ("f32", "q8_0"):
        assert main(["export", str(run_dir), "--gguf", str(out / f"{qtype}.gguf"), "--type", qtype]) == 0
    run = runs[0]
    ids = torch.tensor([run.tokenizer(SAMPLE)["input_ids"]])  # (1, T)
    with torch.no_grad():
        expected = run.model(ids).logits  # (1, T, V): the merged LoRA model the run holds
        for qtype, check in (("f32", None), ("q8_0", (Q8_MAX, Q8_MEAN))):
            ours = load_gguf(out / f"{qtype}.gguf")(ids)
            theirs = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=f"{qtype}.gguf").eval()(ids).logits
            for got in (ours, theirs):
                diff = (got - expected).abs()
                same_top = (got.argmax(-1) == expected.argmax(-1)).float().mean()
                print(f"{qtype}: max |logit diff| {diff.max():.4g}, mean {diff.mean():.4g}, same top-1 {same_top:.2f}")
                if check is None:
                    # the run reloads as base + adapter (x W + x BA), the file holds W + BA merged: float32
                    # rounding of the two orders, ~1e-4 on logits of magnitude ~30
                    assert diff.max() < 2e-4
                else:
                    assert 0 < diff.max() < check[0] and diff.mean() < check[1]
    tok = AutoTokenizer.from_pretrained(str(out), gguf_file="q8_0.gguf")
    assert tok(SAMPLE)["input_ids"] == ids[0].tolist()
    assert tok.eos_token == run.tokenizer.eos_token and tok.chat_template == run.tokenizer.chat_template


def _bpe_tokenizer(tmp_path: Path) -> Path:
    bpe_folder(tmp_path / "tok")
    (tmp_path / "text.txt").write_text(TEXT * 3)
    return tmp_path / "tok" / "tokenizer.json"


def test_our_llama_gpt_run_exports_with_its_bpe_tokenizer(tmp_path, capsys):
    from transformers import AutoTokenizer

    tok = _bpe_tokenizer(tmp_path)
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                f"data={tmp_path / 'text.txt'}",
                f"text.tokenizer={tok}",
                "gpt.family=llama",
                f"out_dir={run_dir}",
                *TINY_GPT,
            ]
        )
        == 0
    ), capsys.readouterr().err
    out = tmp_path / "m.gguf"
    assert main(["export", str(run_dir), "--gguf", str(out), "--type", "f32"]) == 0
    run = load_run(run_dir)
    ids = torch.tensor([run.tokenizer.encode("the lazy dog jumps")])
    with torch.no_grad():
        torch.testing.assert_close(load_gguf(out)(ids), run.model(ids), atol=1e-5, rtol=0)
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert hf_tok("the lazy dog jumps")["input_ids"] == ids[0].tolist()
    assert hf_tok.eos_token == "<|endoftext|>"
    # a quantised type with its Ollama Modelfile: a plain LM (no chat template) continues the prompt
    q4 = tmp_path / "ollama" / "m-q4_0.gguf"
    assert main(["export", str(run_dir), "--gguf", str(q4), "--type", "q4_0", "--ollama"]) == 0
    said = capsys.readouterr().out
    assert f"gguf: {q4} (q4_0;" in said and f"ollama: {q4.parent / 'Modelfile'}" in said
    assert (q4.parent / "Modelfile").read_text() == (
        'FROM ./m-q4_0.gguf\nTEMPLATE """{{ .Prompt }}"""\nPARAMETER stop "<|endoftext|>"\n'
    )
    with torch.no_grad():
        assert 0 < (load_gguf(q4)(ids) - run.model(ids)).abs().max() < 0.5 * run.model(ids).abs().max()
    assert main(["export", str(run_dir), "--gguf", str(q4), "--type", "q4_0", "--ollama"]) == 0  # ours: replaced
    (q4.parent / "Modelfile").write_text("FROM mine\n")  # the user's: refused, nothing written
    refused(capsys, ["export", str(run_dir), "--gguf", str(tmp_path / "ollama" / "b.gguf"), "--ollama"], "--ollama")
    assert (q4.parent / "Modelfile").read_text() == "FROM mine\n" and not (tmp_path / "ollama" / "b.gguf").exists()


def test_our_llama_gpt_run_exports_q4_k_m(tmp_path, capsys):
    """--type q4_k_m on a run of hidden 256 (rows are whole K-quant super-blocks): llama-quantize's
    mix, and the logits of our loader and transformers' within a measured bound of the f32 export's."""
    from transformers import AutoModelForCausalLM

    tok = _bpe_tokenizer(tmp_path)
    run_dir = tmp_path / "run"
    args = ["train", f"data={tmp_path / 'text.txt'}", f"text.tokenizer={tok}", "gpt.family=llama", f"out_dir={run_dir}"]
    # llama's block, not the family's default Qwen3 one: transformers' GGUF reader takes a qwen3 file's
    # head size as 128 (tests/unit/finetune/test_gguf_export.py checks qwen3 at that size)
    args.append("gpt.qk_norm=false")
    assert main([*args, *TINY_GPT, "gpt.n_embd=256"]) == 0, capsys.readouterr().err  # SwiGLU width 768
    run = load_run(run_dir)
    ids = torch.tensor([run.tokenizer.encode("the lazy dog jumps over")[:16]])  # block_size 16
    for qtype in ("f32", "q4_k_m"):
        assert main(["export", str(run_dir), "--gguf", str(tmp_path / "out" / f"{qtype}.gguf"), "--type", qtype]) == 0
    q = tmp_path / "out" / "q4_k_m.gguf"
    assert f"gguf: {q} (q4_k_m;" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(q))
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_down.weight"] == "Q4_K"
    assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == "Q6_K"  # use_more_bits(1, 2)
    assert types.get("output.weight", types["token_embd.weight"]) == "Q6_K"
    with torch.no_grad():
        f32 = load_gguf(tmp_path / "out" / "f32.gguf")(ids)
        torch.testing.assert_close(f32, run.model(ids), atol=1e-5, rtol=0)
        ours = load_gguf(q)(ids)
        theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), gguf_file=q.name).eval()(ids).logits
    err = (ours - f32).abs().max().item()
    print(f"q4_k_m: max |logit - f32 export's| {err:.4g} (logits {f32.min():.2f}..{f32.max():.2f})")
    assert 0 < err < K4M_MAX
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_runs_gguf_cannot_express_are_refused_and_nothing_is_written(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 3)
    assert main(["train", f"data={text}", "gpt.family=gpt2", f"out_dir={tmp_path / 'gpt2'}", *TINY_GPT]) == 0
    assert main(["train", f"data={text}", "gpt.family=llama", f"out_dir={tmp_path / 'byte'}", *TINY_GPT]) == 0
    capsys.readouterr()  # training's own lines
    before = sorted(p.name for p in tmp_path.iterdir())
    refused(capsys, ["export", str(tmp_path / "gpt2"), "--gguf", str(tmp_path / "a.gguf")], "gpt.family: gpt2")
    refused(
        capsys,
        ["export", str(tmp_path / "byte"), "--gguf", str(tmp_path / "a.gguf")],
        "byte tokenizer",
        "llama.cpp cannot express",
    )
    refused(capsys, ["export", str(tmp_path / "byte"), "--gguf", str(tmp_path / "byte" / "a.gguf")], "inside the input")
    refused(capsys, ["export", str(tmp_path / "byte"), "--gguf", str(tmp_path / "a.bin")], "ending in .gguf")
    refused(capsys, ["export", str(tmp_path / "byte"), "--type", "f16"], "--gguf")
    refused(
        capsys,
        ["export", str(tmp_path / "byte"), "--merged", str(tmp_path / "m"), "--gguf", str(tmp_path / "m" / "a.gguf")],
        "inside the export folder",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    (tmp_path / "old.gguf").write_text("keep")
    refused(capsys, ["export", str(tmp_path / "byte"), "--gguf", str(tmp_path / "old.gguf")], "exists")
    assert (tmp_path / "old.gguf").read_text() == "keep"
    refused(  # a K-quant mix not written here: one line naming the types gradtune writes and llama.cpp's quantizer
        capsys,
        ["export", str(tmp_path / "byte"), "--gguf", str(tmp_path / "q.gguf"), "--type", "Q3_K_M"],
        "--type 'Q3_K_M' is not one of f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_k_s, q5_1, q5_0, q4_k_m, q4_k_s,",
        "llama-quantize",
    )
    assert not (tmp_path / "q.gguf").exists()
