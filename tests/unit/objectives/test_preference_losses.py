"""SimPO, ORPO and KTO (``dpo.loss``) against a closed form and TRL, on a tiny random Llama in
float64 with a LoRA policy whose adapters are non-zero:

* the closed form uses per-sequence log-probabilities computed independently (one unpadded
  forward per sequence, ``test_preference.independent_logps``): loss and gradients to 1e-10;
* TRL 1.16's own code fed the same log-probabilities: ``CPOTrainer.cpo_loss`` (loss_type
  "simpo", cpo_alpha 0: SimPO's loss), ``ORPOTrainer.odds_ratio_loss`` (the odds-ratio term;
  it computes in float32, hence 1e-6) and ``KTOTrainer._compute_loss`` (loss_type "kto", the
  KL term from the mismatched completions, precomputed reference).
"""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gradtune.data.preferences import load_preferences  # noqa: E402
from gradtune.data.sequences import IGNORE  # noqa: E402
from gradtune.data.text_tasks import DataError  # noqa: E402
from gradtune.data.unpaired import load_unpaired  # noqa: E402
from gradtune.finetune.lora import adapters_disabled, apply_lora  # noqa: E402
from gradtune.jobs.preference import precompute  # noqa: E402
from gradtune.models import hf  # noqa: E402
from gradtune.objectives.preference import Preference  # noqa: E402
from tests import tiny_hf  # noqa: E402
from tests.unit.objectives.test_preference import PAIRS, _per_token, independent_logps, lora_params  # noqa: E402

ROWS = [(p, c, True) for p, c, _ in PAIRS[:5]] + [(p, r, False) for p, _, r in PAIRS[3:]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(LoRA policy with non-zero B, fresh base, pairs, KTO rows, tokenizer): float64."""
    d = tmp_path_factory.mktemp("prefloss")
    tiny_hf.llama(d / "llama")
    (d / "p.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS)
    )
    (d / "k.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "completion": c, "label": y}) + "\n" for p, c, y in ROWS)
    )
    base = hf.load(str(d / "llama"), "causal_lm", torch.float64)[0]
    policy = hf.load(str(d / "llama"), "causal_lm", torch.float64)[0]
    torch.manual_seed(2)
    apply_lora(policy, rank=4, alpha=8.0)
    for n, p in policy.named_parameters():
        if "lora" in n:
            p.data = (torch.randn_like(p) * 0.3).double()
    tok = hf.load_tokenizer(str(d / "llama"))
    return policy, base, load_preferences(d / "p.jsonl", tok, 32), load_unpaired(d / "k.jsonl", tok, 32), d


def _check(out, expected, policy):
    ours = torch.autograd.grad(out.loss_sum / out.count, lora_params(policy))
    grads = torch.autograd.grad(expected, lora_params(policy))
    assert float(out.loss_sum.detach() / out.count) == pytest.approx(float(expected), abs=1e-10, rel=1e-10)
    for g, e in zip(ours, grads):
        assert (g - e).abs().max() < 1e-10 * max(1.0, float(e.abs().max()))


@pytest.mark.parametrize("beta,gamma,ls", [(2.0, 0.5, 0.0), (0.1, 1.0, 0.2)])
def test_simpo_equals_closed_form_and_trl(setup, beta, gamma, ls):
    policy, _, data, _, _ = setup
    out = Preference(beta, "simpo", ls, gamma=gamma)(policy, data.get(torch.arange(len(data))))
    pi_c, pi_r, n = independent_logps(policy, data)
    a_c, a_r = pi_c / n[:, 0], pi_r / n[:, 1]
    z = beta * (a_c - a_r) - gamma
    _check(out, (-(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)).mean(), policy)

    trl = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    me = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=ls)
    me.accelerator = SimpleNamespace(device=torch.device("cpu"))
    theirs, chosen, rejected = trl.CPOTrainer.cpo_loss(me, a_c.detach(), a_r.detach())
    assert float(out.loss_sum) / out.count == pytest.approx(float(theirs.mean()), abs=1e-10)
    assert float(out.metrics["rewards_chosen"]) == pytest.approx(float(chosen.sum()), abs=1e-10)
    assert int(out.metrics["reward_accuracy"]) == int((chosen > rejected).sum())


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_equals_closed_form_and_trl(setup, beta):
    policy, _, data, _, _ = setup
    out = Preference(beta, "orpo")(policy, data.get(torch.arange(len(data))))
    pi_c, pi_r, n = independent_logps(policy, data)
    a_c, a_r = pi_c / n[:, 0], pi_r / n[:, 1]
    log_odds = torch.log(torch.exp(a_c) / (1 - torch.exp(a_c))) - torch.log(torch.exp(a_r) / (1 - torch.exp(a_r)))
    _check(out, (-a_c - beta * torch.log(torch.sigmoid(log_odds))).mean(), policy)

    trl = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    me = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    ratio_term = trl.ORPOTrainer.odds_ratio_loss(me, a_c.detach(), a_r.detach())[0]  # beta log s(log odds), float32
    # TRL's loss is nll - mean(ratio_term); its nll is a token mean over the batch (ours per pair)
    ours_ratio = float(out.loss_sum) / out.count - float((-a_c).mean())
    assert ours_ratio == pytest.approx(-float(ratio_term.mean()), abs=1e-6)


class _Fake(torch.nn.Module):
    """TRL's fused-LM-head model stand-in: the per-token log-probs of whichever input it gets."""

    is_gradient_checkpointing = False

    def __init__(self, table: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.table = table  # id(input_ids) -> (B, T-1) per-token log-probs, 0 where not scored

    def forward(self, input_ids, **kwargs):
        lp = self.table[id(input_ids)]
        z = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z)


def trl_kto(policy, batch, rows, beta, w_d, w_u) -> torch.Tensor:
    from trl import KTOTrainer

    with torch.no_grad():
        pol = _per_token(policy, batch)
        with adapters_disabled(policy):
            ref = _per_token(policy, batch)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    inputs = {
        "input_ids": ids[:rows],
        "attention_mask": mask[:rows],
        "completion_mask": (labels[:rows] != IGNORE).long(),
        "KL_input_ids": ids[rows:],
        "KL_attention_mask": mask[rows:],
        "KL_completion_mask": (labels[rows:] != IGNORE).long(),
        "label": batch["label"],
        "ref_logps": ref[:rows].sum(-1),
        "ref_KL_logps": ref[rows:].sum(-1),
    }
    t = object.__new__(KTOTrainer)
    t.model = _Fake({id(inputs["input_ids"]): pol[:rows], id(inputs["KL_input_ids"]): pol[rows:]})
    t.accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    t.calculate_KL, t.precompute_ref_logps, t.aux_loss_enabled, t.loss_type = True, True, False, "kto"
    t.beta, t.desirable_weight, t.undesirable_weight = beta, w_d, w_u
    t._metrics = defaultdict(lambda: defaultdict(list))
    t._total_train_tokens, t._tp_size = 0, 1
    return KTOTrainer._compute_loss(t, t.model, inputs, return_outputs=False)


@pytest.mark.parametrize("beta,w_d,w_u", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.7)])
def test_kto_equals_closed_form_and_trl(setup, beta, w_d, w_u):
    policy, base, _, data, _ = setup
    rows = len(data)
    batch = data.get(torch.arange(rows))
    out = Preference(beta, "kto", reference=adapters_disabled, desirable_weight=w_d, undesirable_weight=w_u)(
        policy, batch
    )
    pi, pi_kl, _ = independent_logps(policy, data)  # (chosen, rejected) = (own, mismatched partner)
    with torch.no_grad():
        ref, ref_kl, _ = independent_logps(base, data)
    z0 = torch.clamp((pi_kl - ref_kl).detach().mean(), min=0)
    good = data.label
    per = torch.where(
        good, w_d * (1 - torch.sigmoid(beta * (pi - ref - z0))), w_u * (1 - torch.sigmoid(beta * (z0 - pi + ref)))
    )
    _check(out, per.mean(), policy)
    assert float(out.metrics["kl"]) / rows == pytest.approx(float(z0), abs=1e-12)
    pytest.importorskip("trl")
    assert float(out.loss_sum) / rows == pytest.approx(float(trl_kto(policy, batch, rows, beta, w_d, w_u)), abs=1e-10)


def test_kto_rows_pair_each_prompt_with_the_previous_completion(setup):
    _, _, _, data, d = setup
    tok = hf.load_tokenizer(str(d / "llama"))
    assert data.label.tolist() == [y for _, _, y in ROWS]
    last = tok(ROWS[-1][1], add_special_tokens=False)["input_ids"]
    ids, labels = data.rejected[0]  # row 0's partner: prompt 0 + the last row's completion
    scored = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert scored[: len(last)] == last


def test_precomputed_kto_reference_equals_the_live_one(setup):
    policy, base, _, data, _ = setup
    batch = data.get(torch.arange(len(data)))
    live = Preference(0.1, "kto", reference=adapters_disabled)(policy, batch)
    stored = data.subset(range(len(data)))
    precompute(base, stored, 3, torch.device("cpu"))
    pre = Preference(0.1, "kto")(policy, stored.get(torch.arange(len(data))))
    assert float(pre.loss_sum) == pytest.approx(float(live.loss_sum), abs=1e-12)


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "a", "completion": "b"}, "missing 'label'"),
        ({"prompt": "a", "completion": "b", "label": "yes"}, "'label' must be true or false"),
        ({"prompt": "a", "label": True}, "missing 'completion'"),
    ],
)
def test_bad_kto_rows_name_the_line(setup, tmp_path, row, message):
    _, _, _, _, d = setup
    path = tmp_path / "k.jsonl"
    path.write_text(json.dumps({"prompt": "x", "completion": "y", "label": True}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=f"k.jsonl:2: {message}"):
        load_unpaired(path, hf.load_tokenizer(str(d / "llama")), 32)


def test_each_rank_precomputes_only_its_share(setup, monkeypatch):
    """Under torchrun ``precompute`` forwards only this rank's contiguous share of the pairs (the
    all-reduce fills the rest): here rank 1 of 2, the all-reduce left out, sees pairs 4..7 only."""
    from gradtune.jobs import preference as job

    _, base, pairs, _, _ = setup
    whole = pairs.subset(range(len(pairs)))
    precompute(base, whole, 3, torch.device("cpu"))
    seen = []
    monkeypatch.setattr(job.distributed, "shard", lambda idx: idx.tensor_split(2)[1])
    real_get = type(pairs).get
    monkeypatch.setattr(type(pairs), "get", lambda self, idx: seen.extend(idx.tolist()) or real_get(self, idx))
    mine = pairs.subset(range(len(pairs)))
    precompute(base, mine, 3, torch.device("cpu"))
    assert sorted(seen) == [4, 5, 6, 7]
    assert torch.equal(mine.ref[4:], whole.ref[4:]) and not mine.ref[:4].any()
