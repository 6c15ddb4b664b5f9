"""Reinforcement learning (task: rl, GRPO) through the CLI and the one loop.

On a tiny random Llama in float32: micro-batched steps equal the one-shot step and a 2-process
torchrun run equals the one-process run (prompts split across ranks; each prompt's completions
are seeded from (seed, step, prompt) alone, so they are the same completions), and a run killed
inside a step resumes bitwise to the uninterrupted one. Bad reward functions and settings are
refused (exit 2, one line, nothing written). On the real SmolLM2-135M-Instruct (GGUF, slow):
LoRA GRPO on "the sum of two small numbers inside <answer></answer>" raises the mean reward.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from gradtune.cli import main  # noqa: E402
from tests import hooks, tiny_hf  # noqa: E402
from tests.e2e.conftest import smollm2_gguf  # noqa: E402
from tests.e2e.test_distributed import _finish, torchrun, worst_rel  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["what is the answer", "hello world", "call me now", "free prize", "the question", "meet me"]
PROMPTS += ["what time", "is it good"]


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("rl")
    tiny_hf.llama(d / "llama")
    (d / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": "yes"}) + "\n" for p in PROMPTS))
    return d


def settings(tiny: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model={tiny / 'llama'}",
        f"data={tiny / 'p.jsonl'}",
        "task=rl",
        "method=lora",
        "optimizer=sgd",  # AdamW's 1/sqrt(v) would magnify float32 rounding in tiny gradients
        "momentum=0.9",
        "lr=2.0",
        "batch_size=4",
        "max_steps=4",
        "epochs=10",
        "val_fraction=0",
        "eval_every=2",
        "rl.rewards=[{fn: 'tests.e2e.rl_rewards:yes_share'}]",
        "rl.num_generations=4",
        "rl.max_new_tokens=6",
        "rl.beta=0.1",
        "seed=3",
        "device=cpu",
        "precision=fp32",
        "progress=off",
        "plot=false",
        f"out_dir={out}",
        *extra,
    ]


def rl_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rl.jsonl").read_text().splitlines()]


def train(args: list[str], capsys) -> None:
    assert main(["train", *args]) == 0, capsys.readouterr().err


def test_micro_batches_equal_the_one_shot_update(tiny, tmp_path, capsys):
    train(settings(tiny, tmp_path / "one"), capsys)
    train(settings(tiny, tmp_path / "micro", "micro_batch_size=1"), capsys)  # one prompt group each
    one, micro = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("one", "micro"))
    assert max(v.abs().max().item() for k, v in one.items() if "lora_b" in k) > 1e-3  # the update is not vacuous
    assert worst_rel(micro, one) < 1e-6
    a, b = rl_rows(tmp_path / "one"), rl_rows(tmp_path / "micro")
    assert [r["step"] for r in a] == [1, 2, 3, 4] and 0 < max(r["reward_std"] for r in a)
    for ra, rb in zip(a, b):
        assert rb["reward"] == ra["reward"] and rb["completion_length"] == ra["completion_length"]
        assert rb["kl"] == pytest.approx(ra["kl"], rel=1e-4, abs=1e-9)
    # metrics.jsonl's evaluation rows (eval_every=2) hold the mean reward of the steps since the
    # previous one (every step samples 4 x 4 completions: the mean of the steps' means)
    for run in ("one", "micro"):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        evals = {r["step"]: r for r in rows if r["kind"] == "eval"}
        assert sorted(evals) == [2, 4], evals
        for step in (2, 4):
            want = (a[step - 2]["reward"] + a[step - 1]["reward"]) / 2
            assert evals[step]["reward"] == pytest.approx(want, abs=1e-6)
            assert 0 <= evals[step]["clip_fraction"] <= 1 and evals[step]["kl"] >= 0


@pytest.mark.slow
def test_two_processes_equal_one(tiny, tmp_path, capsys):
    """torchrun --nproc_per_node 2: each rank takes 1 of each micro-batch's 2 prompts."""
    extra = ["micro_batch_size=2"]
    train(settings(tiny, tmp_path / "one", *extra), capsys)
    _finish(torchrun(2, ["-m", "gradtune", "train", *settings(tiny, tmp_path / "two", *extra)]))
    one, two = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("one", "two"))
    assert worst_rel(two, one) < 1e-6
    for ra, rb in zip(rl_rows(tmp_path / "one"), rl_rows(tmp_path / "two")):  # rewards summed over ranks
        assert rb["reward"] == pytest.approx(ra["reward"], abs=1e-12)


@pytest.mark.slow
def test_kill_inside_a_step_and_resume_is_bitwise(tiny, tmp_path):
    """SIGKILL inside step 4's accumulation window, then the same command again: the weights and
    the reward curve equal the uninterrupted run's, bit for bit."""
    extra = ["micro_batch_size=2", "checkpoint_every=2", "max_steps=6"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # the same threads: the same rounding
    ref = [sys.executable, "-m", "gradtune", "train", *settings(tiny, tmp_path / "ref", *extra)]
    assert subprocess.run(ref, cwd=ROOT, env=env, capture_output=True, timeout=300).returncode == 0
    args = [sys.executable, "-m", "gradtune", "train", *settings(tiny, tmp_path / "run", *extra)]
    killed = subprocess.run(args, cwd=ROOT, env={**env, hooks.FAULTS: "micro@7"}, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rl: step 1 " not in done.stdout and "rl: step 3 " in done.stdout  # resumed at step 2's checkpoint
    run, ref = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("run", "ref"))
    assert run.keys() == ref.keys() and all(torch.equal(run[k], ref[k]) for k in ref)
    assert rl_rows(tmp_path / "run") == rl_rows(tmp_path / "ref")


BAD = [
    ("rl.rewards=[{fn: 'tests.e2e.no_such_module:f'}]", "cannot import tests.e2e.no_such_module:f"),
    ("rl.rewards=[{fn: 'tests.e2e.rl_rewards:no_arguments'}]", "must take (prompts, completions, **columns)"),
    ("rl.rewards=[{fn: 'tests.e2e.rl_rewards:wrong_length'}]", "returned 3 rewards for 2 completions"),
    ("rl.rewards=[{fn: 'tests.e2e.rl_rewards:not_a_number'}]", "rewards must be finite"),
    ("rl.rewards=[{fn: exact}]", "unknown reward 'exact'"),
    ("rl.num_generations=1", "rl.num_generations"),
]


@pytest.mark.parametrize("setting,message", BAD)
def test_bad_rewards_exit_2_with_one_line_and_write_nothing(tiny, tmp_path, capsys, setting, message):
    out = tmp_path / "run"
    assert main(["train", *settings(tiny, out, setting)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


# --- the real model -------------------------------------------------------------------------------


SYSTEM = "Reply with the sum inside <answer></answer>."


def sums(path: Path, n: int, seed: int) -> None:
    """n prompts "a + b" (one-digit numbers) after a one-shot example of the answer format (what
    examples/rl/sums.jsonl holds): the 135M model follows the format sometimes, not always, so
    that both rewards vary within a group from the first step. The row's own system turn stands in
    for SmolLM2's default one (which its chat template adds when a conversation has none): ~50
    prompt tokens instead of ~90, and the step's forward and backward run on ~60 tokens, not ~100."""
    rng = random.Random(seed)
    shot = [{"role": "system", "content": SYSTEM}]
    shot += [{"role": "user", "content": "2 + 3"}, {"role": "assistant", "content": "<answer>5</answer>"}]
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"prompt": [*shot, {"role": "user", "content": f"{a} + {b}"}], "answer": str(a + b)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


SMOL_STEPS = 6


@pytest.mark.slow
def test_smollm2_lora_grpo_raises_the_mean_reward(tmp_path, capsys):
    sums(tmp_path / "sums.jsonl", 64, 0)
    out = tmp_path / "run"
    started = time.perf_counter()
    args = [
        f"model={smollm2_gguf()}",
        f"data={tmp_path / 'sums.jsonl'}",
        "task=rl",
        "method=lora",
        "optimizer=adamw",
        "lr=2e-3",  # 5e-3 learns the format in one step, then the curve swings (one step at 0.5)
        "batch_size=4",
        f"max_steps={SMOL_STEPS}",
        "val_fraction=0",
        "rl.num_generations=4",
        "rl.max_new_tokens=10",  # "<answer>17</answer>" and the end token are 9
        "text.max_length=64",  # the prompts: ~50 tokens
        "rl.beta=0",  # no reference forward: a quarter less time per step (the KL path is checked above)
        "precision=fp32",  # bfloat16 would be faster where the CPU has AMX, not on CI's AVX2 machines
        "progress=off",
        "plot=false",
        f"out_dir={out}",
    ]
    train(args, capsys)
    rows = rl_rows(out)
    curve = [r["reward"] for r in rows]
    print(f"reward curve over {SMOL_STEPS} steps: {curve} ({time.perf_counter() - started:.0f} s)")
    # Measured (one thread, CPU capability AVX512, torch 2.13; the same on an Intel and an AMD CPU):
    # 0.75, 1.25, 1.44, 1.56, 2.0, 1.75 (10 steps went on 1.75, 1.75, 0.88, 1.5) - the format learnt
    # by step 2, then the sums too; the last half's mean 1.77 against the untrained step's 0.75.
    # 6 steps: 70 s alone on one thread, about half of it sampling. Control, lr 1e-12 (no
    # learning): 0.75, 0.25, 0.44, 0.38, 0.44, 0.56 - the last half 0.46, its format reward under
    # 0.4: both assertions fail.
    assert len(curve) == SMOL_STEPS
    half = SMOL_STEPS // 2
    trained = sum(curve[half:]) / (SMOL_STEPS - half)
    # Step 1 samples the untrained model (the first update comes after it): the last half beats it.
    assert trained > curve[0] + 0.3, curve
    assert sum(r["reward/format"] for r in rows[half:]) / (SMOL_STEPS - half) > 0.8, rows  # the format is learnt


def test_eval_on_an_rl_run_repeats_the_final_validation_rewards(tiny, tmp_path, capsys):
    """`gradtune eval RUN` on the run's own validation split samples the same completions as the
    final validation of training did (the same seeds, the same weights): the same mean reward."""
    out = tmp_path / "run"
    train(settings(tiny, out, "val_fraction=0.25"), capsys)
    final = [r for r in rl_rows(out) if "val_reward" in r][-1]
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    got = dict(kv.split("=") for kv in line.split(": ", 1)[1].split())
    assert float(got["n"]) == 2
    assert float(got["reward"]) == pytest.approx(final["val_reward"], abs=1e-6)
    assert float(got["completion_length"]) == pytest.approx(final["val_completion_length"], abs=1e-6)
    other = tmp_path / "held_out.jsonl"
    other.write_text(json.dumps({"prompt": "yes yes", "answer": "yes"}) + "\n")
    assert main(["eval", str(out), "--data", str(other)]) == 0
    assert "reward/yes_share=" in capsys.readouterr().out
