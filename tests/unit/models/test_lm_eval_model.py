"""``GradtuneLM`` (gradtune's model as lm-eval's LM) against lm-eval's own ``hf`` model on the same
tiny random Llama: the same per-request log-likelihoods (multiple choice, rolling) and the same
greedy generations, and so the same task accuracy; a task YAML file with its JSONL beside it."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

import torch  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from gradtune.models import hf  # noqa: E402
from gradtune.models import lm_eval_model as lme  # noqa: E402
from gradtune.runtime.errors import GradtuneError  # noqa: E402
from tests import tiny_hf  # noqa: E402

QUESTIONS = [
    ("what is the answer", ["yes good", "no", "hello world", "call me"], 0),
    ("hello", ["world", "prize", "the time is bad", "a"], 0),
    ("call me at", ["home", "free", "now", "what"], 0),
    ("meet me", ["now", "at home", "bad bad", "ok"], 1),
    ("the question is", ["good", "what time", "win", "a prize"], 0),
    ("is it good", ["yes it is good", "no", "the", "me"], 0),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval")
    tiny_hf.llama(d / "llama")
    (d / "q.jsonl").write_text("".join(json.dumps({"q": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (d / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: q.jsonl\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: choices\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    torch.manual_seed(0)
    model = hf.load(str(d / "llama"), "causal_lm", torch.float32)[0].eval()
    ours = lme.lm_class()(model, hf.load_tokenizer(str(d / "llama")), batch_size=3)
    theirs = HFLM(pretrained=str(d / "llama"), batch_size=3, device="cpu", dtype="float32")
    return d, ours, theirs


def _responses(results, task):
    return [float(r[0][0]) for s in results["samples"][task] for r in s["resps"]]


@pytest.mark.slow
def test_multiple_choice_equals_lm_evals_hf_model(tiny):
    d, ours, theirs = tiny
    tasks = lme.resolve_tasks(str(d / "tiny_mc.yaml"))
    a = simple_evaluate(model=ours, tasks=tasks, bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    b = simple_evaluate(model=theirs, tasks=tasks, bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    assert a["results"]["tiny_mc"]["acc,none"] == b["results"]["tiny_mc"]["acc,none"]
    assert a["results"]["tiny_mc"]["acc_norm,none"] == b["results"]["tiny_mc"]["acc_norm,none"]
    la, lb = _responses(a, "tiny_mc"), _responses(b, "tiny_mc")
    assert len(la) == sum(len(c) for _, c, _ in QUESTIONS)
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-5


def test_rolling_and_generation_equal_lm_evals_hf_model(tiny):
    _, ours, theirs = tiny
    texts = ["hello world call me now", "the answer is good " * 20]  # the second spans several windows
    ours._max_length = theirs._max_length = 16  # force the rolling windows

    def rolling(lm):
        return lm.loglikelihood_rolling(
            [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)], disable_tqdm=True
        )

    try:
        for x, y in zip(rolling(ours), rolling(theirs)):
            assert x == pytest.approx(y, abs=1e-4)
    finally:
        ours._max_length = theirs._max_length = None
        ours._max_length = lme.context_length(ours.model) or lme.DEFAULT_MAX_LENGTH
    gen = [
        Instance("generate_until", {}, ("hello world", {"until": ["time"], "max_gen_toks": 6, "do_sample": False}), 0),
        Instance("generate_until", {}, ("what is", {"max_gen_toks": 4}), 1),
    ]
    assert ours.generate_until(gen) == theirs.generate_until(gen, disable_tqdm=True)


@pytest.mark.slow
def test_unknown_task_and_missing_package_are_one_line_errors(tiny, monkeypatch):
    with pytest.raises(GradtuneError, match="unknown task 'no_such_task'"):
        lme.resolve_tasks("shakespeare_cloze,no_such_task")
    with pytest.raises(GradtuneError, match="no such task file"):
        lme.resolve_tasks("missing.yaml")
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)  # installed, but does not import
    with pytest.raises(GradtuneError, match="the lm-eval package does not import"):
        lme.lm_class.__wrapped__()  # past the cache: the class is made once per process
    monkeypatch.setattr(lme, "AVAILABLE", False)
    with pytest.raises(GradtuneError, match="needs the lm-eval package"):
        lme.resolve_tasks("shakespeare_cloze")
