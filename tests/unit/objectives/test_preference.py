"""DPO / IPO against two oracles, on a tiny random Llama in float64 with 8 preference pairs:

* a closed form written out here from per-sequence log-probabilities computed independently
  (one unpadded forward per sequence, log_softmax gathered at the response tokens, the
  reference a separately loaded copy of the base): loss and gradients equal to 1e-10;
* TRL's own DPO loss code (``DPOTrainer._compute_loss``, trl 1.16) fed the same per-token
  log-probabilities, for sigmoid, ipo and label smoothing.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gradtune.data.preferences import load_preferences  # noqa: E402
from gradtune.data.sequences import IGNORE  # noqa: E402
from gradtune.finetune.lora import adapters_disabled, apply_lora  # noqa: E402
from gradtune.jobs.preference import precompute  # noqa: E402
from gradtune.models import hf  # noqa: E402
from gradtune.objectives import shared_prompt  # noqa: E402
from gradtune.objectives.preference import Preference, model_sequence_logps  # noqa: E402
from tests import tiny_hf  # noqa: E402

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


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(LoRA policy with non-zero B, fresh base model, 8 pairs): float64."""
    d = tmp_path_factory.mktemp("dpo")
    tiny_hf.llama(d / "llama")
    (d / "p.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS)
    )
    base = hf.load(str(d / "llama"), "causal_lm", torch.float64)[0]
    policy = hf.load(str(d / "llama"), "causal_lm", torch.float64)[0]
    torch.manual_seed(1)
    apply_lora(policy, rank=4, alpha=8.0)
    for n, p in policy.named_parameters():
        if "lora" in n:
            p.data = (torch.randn_like(p) * 0.3).double()  # B != 0: the policy differs from the base
    data = load_preferences(d / "p.jsonl", hf.load_tokenizer(str(d / "llama")), max_length=32)
    return policy, base, data


def independent_logps(model, data) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen log-probs (N,), rejected (N,), response token counts (N, 2)), one unpadded
    sequence at a time: sum over t of log_softmax(logits[t-1])[ids[t]] where labels[t] is scored."""
    out, counts = [[], []], [[], []]
    for side, seqs in enumerate((data.chosen, data.rejected)):
        for ids, labels in seqs:
            logits = model(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
            lp = torch.log_softmax(logits, -1)
            scored = [t for t in range(1, len(ids)) if labels[t] != IGNORE]
            out[side].append(sum(lp[t - 1, ids[t]] for t in scored))
            counts[side].append(len(scored))
    return torch.stack(out[0]), torch.stack(out[1]), torch.tensor(counts, dtype=torch.float64).T


def closed_form(pi_c, pi_r, ref_c, ref_r, n, beta, loss, ls):
    if loss == "ipo":
        h = (pi_c - ref_c) / n[:, 0] - (pi_r - ref_r) / n[:, 1]
        return ((h - 1 / (2 * beta)) ** 2).mean()
    z = beta * (pi_c - pi_r - ref_c + ref_r)
    return (-F.logsigmoid(z) * (1 - ls) - F.logsigmoid(-z) * ls).mean()


def lora_params(model):
    return [p for n, p in model.named_parameters() if "lora" in n]


CASES = [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0), ("ipo", 0.7, 0.0)]


@pytest.mark.parametrize("loss,beta,ls", CASES)
def test_loss_and_gradients_equal_the_closed_form(setup, loss, beta, ls):
    policy, base, data = setup
    objective = Preference(beta, loss, ls, reference=adapters_disabled)
    out = objective(policy, data.get(torch.arange(len(data))))
    assert out.count == len(PAIRS)
    ours = torch.autograd.grad(out.loss_sum / out.count, lora_params(policy))

    pi_c, pi_r, n = independent_logps(policy, data)
    with torch.no_grad():
        ref_c, ref_r, _ = independent_logps(base, data)
    expected = closed_form(pi_c, pi_r, ref_c, ref_r, n, beta, loss, ls)
    grads = torch.autograd.grad(expected, lora_params(policy))
    assert float(out.loss_sum.detach() / out.count) == pytest.approx(float(expected), abs=1e-10, rel=1e-10)
    for g, e in zip(ours, grads):
        assert (g - e).abs().max() < 1e-10 * max(1.0, float(e.abs().max()))
    # the metrics: TRL's rewards, means over pairs
    r_c, r_r = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    assert float(out.metrics["reward_margin"]) / 8 == pytest.approx(float((r_c - r_r).mean()), abs=1e-10)
    assert float(out.metrics["rewards_chosen"]) == pytest.approx(float(r_c.sum()), abs=1e-10)
    assert int(out.metrics["reward_accuracy"]) == int((r_c > r_r).sum())


def test_adapters_disabled_is_the_base_bit_for_bit(setup):
    policy, base, data = setup
    ids = data.get(torch.arange(2))["input_ids"]
    with torch.no_grad():
        with adapters_disabled(policy):
            off = policy(input_ids=ids).logits
        on = policy(input_ids=ids).logits  # the adapters are back after the block
        assert torch.equal(off, base(input_ids=ids).logits)
        assert (on - off).abs().max() > 1e-3


def test_precomputed_reference_equals_the_live_one(setup):
    """The non-LoRA path (reference log-probs stored with the pairs before training) gives the
    LoRA path's numbers: the base computes the same log-probs in either place."""
    policy, base, data = setup
    batch = data.get(torch.arange(len(data)))
    live = Preference(0.1, reference=adapters_disabled)(policy, batch)
    stored = data.subset(range(len(data)))
    precompute(base, stored, 3, torch.device("cpu"))
    pre = Preference(0.1)(policy, stored.get(torch.arange(len(data))))
    assert float(pre.loss_sum) == pytest.approx(float(live.loss_sum), abs=1e-12)


# --- TRL's loss code on the same log-probabilities ------------------------------------------------------


class _Fake(torch.nn.Module):
    """Stands for a model under TRL's fused LM head: returns the per-token log-probs it holds."""

    is_gradient_checkpointing = False

    def __init__(self, per_token: torch.Tensor) -> None:
        super().__init__()
        self.per_token = per_token  # (2B, T-1), 0 where not scored

    def forward(self, **kwargs):
        z = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token, entropy=z, mean_logits=z, is_top1=z.bool())


def _per_token(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp.masked_fill(labels == IGNORE, 0.0)


def trl_loss(policy_tok, ref_tok, batch, loss_type, beta, ls) -> torch.Tensor:
    from trl import DPOTrainer

    t = object.__new__(DPOTrainer)
    t.model, t.ref_model = _Fake(policy_tok), _Fake(ref_tok)
    t.accelerator = SimpleNamespace(
        device=torch.device("cpu"),
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        unwrap_model=lambda m: m,
        autocast=contextlib.nullcontext,
    )
    t.args = SimpleNamespace(gradient_checkpointing_kwargs=None)
    t.aux_loss_enabled, t.precompute_ref_logps, t.ld_alpha, t.use_weighting = False, False, None, False
    t.f_divergence_type, t.loss_types, t.loss_weights = "reverse_kl", [loss_type], [1.0]
    t.beta, t.label_smoothing = beta, ls
    t._metrics = defaultdict(lambda: defaultdict(list))
    t._total_train_tokens, t._tp_size = 0, 1
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != IGNORE).long(),
    }
    return DPOTrainer._compute_loss(t, t.model, inputs, return_outputs=False)


@pytest.mark.parametrize("loss,beta,ls", CASES)
def test_equals_trl(setup, loss, beta, ls):
    pytest.importorskip("trl")
    policy, _, data = setup
    batch = data.get(torch.arange(len(data)))
    ours = Preference(beta, loss, ls, reference=adapters_disabled)(policy, batch)
    with torch.no_grad():
        pol = _per_token(policy, batch)
        with adapters_disabled(policy):
            ref = _per_token(policy, batch)
    if not ls:
        theirs = trl_loss(pol, ref, batch, loss, beta, ls)
    else:
        # trl 1.16's "sigmoid" ignores label_smoothing; its conservative-DPO form lives on in the
        # "aot" loss, which sorts log-ratios across the batch: per pair (B=1) it is exactly cDPO.
        B = len(data)
        theirs = torch.stack(
            [
                trl_loss(
                    pol[[i, B + i]],
                    ref[[i, B + i]],
                    {k: v[[i, B + i]] for k, v in batch.items() if k != "sample_id"},
                    "aot",
                    beta,
                    ls,
                )
                for i in range(B)
            ]
        ).mean()
    assert float(ours.loss_sum.detach() / ours.count) == pytest.approx(float(theirs), abs=1e-10, rel=1e-10)


def test_shared_prompt_pairs_equal_whole_rows(setup, monkeypatch):
    """Each pair's prompt run once for its chosen and rejected rows (rows i and B + i): the summed
    log-probabilities of the whole rows' forward to 1e-12, gradients to float32 rounding (the model's
    RMSNorm, conftest.py); rows whose prompts differ (KTO's mismatched half) run whole."""
    policy, _, data = setup
    batch = data.get(torch.arange(len(data)))
    labels = batch["labels"]
    assert shared_prompt.pair_logps(policy, batch, labels) is not None
    a, n_a = model_sequence_logps(policy, batch, labels)
    ga = torch.autograd.grad(a.sum(), [p for p in policy.parameters() if p.requires_grad])
    with monkeypatch.context() as m:
        m.setattr(shared_prompt, "supports", lambda model: False)
        b, n_b = model_sequence_logps(policy, batch, labels)
    gb = torch.autograd.grad(b.sum(), [p for p in policy.parameters() if p.requires_grad])
    assert torch.equal(n_a, n_b)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for x, y in zip(ga, gb):
        assert (x - y).abs().max() < 1e-6 * max(1e-3, float(y.abs().max()))
    half = len(data)
    swapped = {k: torch.cat([v[:half], v[half:].roll(1, 0)]) for k, v in batch.items() if v.dim() == 2}
    assert shared_prompt.pair_logps(policy, swapped, swapped["labels"]) is None
