"""GRPO's loss against two oracles, on a tiny random Llama in float64 with 3 prompts x 4 fixed
completions and fixed rewards:

* a closed form written out here: per-sequence log-probabilities from one unpadded forward per
  sequence (log_softmax of logits / temperature at the completion tokens), the reference a
  separately loaded copy of the base, advantages from ``statistics`` (mean, sample stdev), the
  token loss -A + beta (exp(ref - logp) - (ref - logp) - 1) in value with d/dlogp = -A + beta
  (1 - exp(ref - logp)), summed and divided by the number of completion tokens: loss and
  gradients equal to 1e-10;
* TRL's own GRPO loss code (``GRPOTrainer._compute_loss``, trl 1.16) fed the same per-token
  log-probabilities: ``loss_type="dapo"`` (and ``"bnpo"``, the same in one process without
  accumulation) equal to 1e-10, loss and gradients.

Both with each row's whole forward. The shared-prompt forward (objectives/shared_prompt.py, what
GRPO runs on transformers causal LMs) gives the same loss to 1e-12 and the same gradients to float32
rounding (the model's RMSNorm computes in float32 even in a float64 model, and the G rows'
gradients are summed before it, not after): its own test below (conftest.py: the others run whole rows).
"""

from __future__ import annotations

import contextlib
import json
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from gradtune.data.prompts import load_prompts  # noqa: E402
from gradtune.finetune.lora import adapters_disabled, apply_lora  # noqa: E402
from gradtune.models import hf  # noqa: E402
from gradtune.objectives import grpo, rewards, shared_prompt  # noqa: E402
from tests import tiny_hf  # noqa: E402

PROMPTS = ["what is the answer", "hello world", "call me now"]
G, EOS = 4, 3
REWARDS = [1.0, 0.0, 0.5, 2.0, 0.0, 0.0, 1.0, 0.0, 0.25, 1.5, 1.5, 0.0]  # 3 groups of 4


def _completions() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(len(PROMPTS) * G):
        n = int(torch.randint(1, 7, (1,), generator=g))
        toks = torch.randint(4, 27, (n,), generator=g).tolist()
        out.append(toks + [EOS] if i % 3 else toks)  # some end with eos, some were cut
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    tiny_hf.llama(d / "llama")
    (d / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": "yes"}) + "\n" for p in PROMPTS))
    base = hf.load(str(d / "llama"), "causal_lm", torch.float64)[0]
    policy, tok = hf.load(str(d / "llama"), "causal_lm", torch.float64)
    torch.manual_seed(1)
    apply_lora(policy, rank=4, alpha=8.0)
    for n, p in policy.named_parameters():
        if "lora" in n:
            p.data = (torch.randn_like(p) * 0.3).double()  # B != 0: the policy differs from the base
    data = load_prompts(d / "p.jsonl", tok)
    return policy, base, data, tok


def objective(data, tok, beta, temperature=1.0, scale=True):
    fixed = rewards.Reward("fixed", lambda prompts, completions, **_: REWARDS, 1.0)
    return grpo.GRPO(
        [fixed],
        tok,
        {0: data},
        grpo.Sampling(G, 8, temperature, 1.0),
        beta=beta,
        scale_rewards=scale,
        reference=adapters_disabled,
    )


def rollout(obj, data):
    batch = data.get(torch.arange(len(data)))
    prompts = [data.input_ids[i] for i in range(len(data)) for _ in range(G)]
    comps = _completions()
    return obj.scored(batch, prompts, comps, ["" for _ in comps]), prompts, comps


def lora_params(model):
    return [p for n, p in model.named_parameters() if "lora" in n]


def independent(model, prompts, comps, temperature):
    """Per completion: its tokens' log-probs (list of 0-d tensors), one unpadded forward each."""
    out = []
    for p, c in zip(prompts, comps):
        ids = p + c
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0] / temperature, -1)
        out.append([lp[t - 1, ids[t]] for t in range(len(p), len(ids))])
    return out


def closed_form(policy, base, prompts, comps, beta, temperature, scale):
    adv = []
    for k in range(len(PROMPTS)):
        grp = REWARDS[k * G : (k + 1) * G]
        m, s = statistics.mean(grp), statistics.stdev(grp)
        adv += [(r - m) / (s + 1e-4) if scale else r - m for r in grp]
    pol = independent(policy, prompts, comps, temperature)
    with torch.no_grad():
        ref = independent(base, prompts, comps, temperature)
    total, n = 0.0, 0
    for a, lps, rps in zip(adv, pol, ref):
        for lp, rp in zip(lps, rps):
            ratio = torch.exp(lp - lp.detach())  # 1 in value, d/dlp = 1
            total = total - ratio * a + beta * (torch.exp(rp - lp) - (rp - lp) - 1)
            n += 1
    return total / n, n


CASES = [(0.04, 1.0, True), (0.5, 0.7, True), (0.0, 1.0, False), (0.1, 1.3, False)]


@pytest.mark.parametrize("beta,temperature,scale", CASES)
def test_loss_and_gradients_equal_the_closed_form(setup, beta, temperature, scale):
    policy, base, data, tok = setup
    obj = objective(data, tok, beta, temperature, scale)
    roll, prompts, comps = rollout(obj, data)
    out = obj.loss(policy, roll)
    ours = torch.autograd.grad(out.loss_sum / out.count, lora_params(policy))
    expected, n = closed_form(policy, base, prompts, comps, beta, temperature, scale)
    assert int(out.count) == n == sum(len(c) for c in comps)
    grads = torch.autograd.grad(expected, lora_params(policy))
    assert float(out.loss_sum.detach() / out.count) == pytest.approx(float(expected.detach()), abs=1e-10, rel=1e-10)
    for g, e in zip(ours, grads):
        assert (g - e).abs().max() < 1e-10 * max(1.0, float(e.abs().max()))
    assert float(out.metrics["clipped"]) == 0.0  # one update per rollout: the ratio is 1


def test_advantages_are_trls_group_normalisation():
    r = torch.tensor([[1.0, 0.0, 0.5, 2.0], [3.0, 3.0, 3.0, 3.0]], dtype=torch.float64)
    a = grpo.advantages(r)
    assert torch.allclose(a[0], (r[0] - r[0].mean()) / (r[0].std(unbiased=True) + 1e-4), atol=0, rtol=1e-15)
    assert torch.equal(a[1], torch.zeros(4, dtype=torch.float64))  # equal rewards: no signal


def test_seeds_depend_on_step_and_prompt_only():
    assert grpo.seed_for(0, 3, 0, 7) == grpo.seed_for(0, 3, 0, 7)
    assert len({grpo.seed_for(0, s, 0, i) for s in range(5) for i in range(5)}) == 25


# --- TRL's loss code on the same log-probabilities ------------------------------------------------------


class _Fake(torch.nn.Module):
    """Stands for a model under TRL's fused LM head: returns the per-token log-probs it holds."""

    def __init__(self, per_token: torch.Tensor) -> None:
        super().__init__()
        self.per_token = per_token  # (S, C), 0 where not scored

    def forward(self, **kwargs):
        z = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token, entropy=z)


def _padded(rows: list[list[torch.Tensor]], width: int) -> torch.Tensor:
    return torch.stack(
        [torch.stack(r + [torch.zeros((), dtype=torch.float64)] * (width - len(r))) for r in rows]
    )  # (S, C)


def trl_loss(pol, ref, comps, adv, loss_type, beta) -> torch.Tensor:
    from trl import GRPOTrainer

    width = max(len(c) for c in comps)
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in comps])
    t = object.__new__(GRPOTrainer)
    t.model = _Fake(_padded(pol, width))
    t.accelerator = SimpleNamespace(
        device=torch.device("cpu"),
        num_processes=1,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x,
        autocast=contextlib.nullcontext,
        sync_gradients=True,
        is_main_process=True,
    )
    t.args = SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1)
    t.loss_type, t.beta, t.epsilon_low, t.epsilon_high = loss_type, beta, 0.2, 0.2
    t.importance_sampling_level, t.top_entropy_quantile, t.off_policy_mask_threshold = "token", 1.0, None
    t.use_vllm, t._entropy_bonus_enabled, t.aux_loss_enabled = False, False, False
    t.current_gradient_accumulation_steps = 1
    t._metrics = defaultdict(lambda: defaultdict(list))
    inputs = {
        "prompt_ids": torch.ones(len(comps), 1, dtype=torch.long),
        "prompt_mask": torch.ones(len(comps), 1, dtype=torch.long),
        "completion_ids": torch.ones(len(comps), width, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "ref_per_token_logps": _padded(ref, width),
        "num_items_in_batch": mask.sum(),
    }
    return GRPOTrainer._compute_loss(t, t.model, inputs)


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo"])
@pytest.mark.parametrize("beta", [0.04, 0.3])
def test_equals_trl(setup, loss_type, beta):
    pytest.importorskip("trl")
    policy, _, data, tok = setup
    obj = objective(data, tok, beta)
    roll, prompts, comps = rollout(obj, data)
    out = obj.loss(policy, roll)
    ours = torch.autograd.grad(out.loss_sum / out.count, lora_params(policy))
    pol = independent(policy, prompts, comps, 1.0)
    with torch.no_grad(), adapters_disabled(policy):
        ref = independent(policy, prompts, comps, 1.0)
    adv = grpo.advantages(roll["rewards"].view(-1, G)).reshape(-1)
    theirs = trl_loss(pol, ref, comps, adv, loss_type, beta)
    grads = torch.autograd.grad(theirs, lora_params(policy))
    assert float(out.loss_sum.detach() / out.count) == pytest.approx(float(theirs.detach()), abs=1e-10, rel=1e-10)
    for g, e in zip(ours, grads):
        assert (g - e).abs().max() < 1e-10 * max(1.0, float(e.abs().max()))


@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.3, 0.7)])
def test_shared_prompt_forward_equals_whole_rows(setup, beta, temperature, monkeypatch):
    """Each prompt's forward once for its G rows (prompts of 3 lengths, left-padded; completions
    of 1-7 tokens, right-padded): the loss of the whole rows' forward to 1e-12, gradients to float32
    rounding (see the module docstring); the reference's log-probs take the same path."""
    policy, _, data, tok = setup
    assert shared_prompt.supports(policy)
    obj = objective(data, tok, beta, temperature)
    roll, _, _ = rollout(obj, data)
    # the rows qualify: the first loss below runs the shared path, not the whole rows again
    assert shared_prompt.group_logps(policy, roll["input_ids"], roll["attention_mask"], roll["labels"], G) is not None
    out = obj.loss(policy, roll)
    shared = torch.autograd.grad(out.loss_sum / out.count, lora_params(policy))
    monkeypatch.setattr(shared_prompt, "supports", lambda model: False)
    whole = obj.loss(policy, roll)
    grads = torch.autograd.grad(whole.loss_sum / whole.count, lora_params(policy))
    assert int(out.count) == int(whole.count)
    assert float(out.loss_sum) == pytest.approx(float(whole.loss_sum), abs=1e-12, rel=1e-12)
    for g, e in zip(shared, grads):
        assert (g - e).abs().max() < 1e-6 * max(1e-3, float(e.abs().max()))


def test_shared_prompt_refuses_rows_of_different_prompts():
    ids, mask = torch.ones(4, 6, dtype=torch.long), torch.ones(4, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="share one prompt"):
        shared_prompt.token_logps(None, ids, mask, torch.tensor([3, 3, 2, 3]), 2)
    with pytest.raises(ValueError, match="at least one token"):
        shared_prompt.token_logps(None, ids, mask, torch.tensor([0, 0, 2, 2]), 2)


def test_shared_prompt_only_where_the_model_takes_a_cache_on():
    """transformers causal LMs without activation checkpointing (which turns the cache off); our
    GPT and an FSDP2-sharded model keep the whole rows."""
    from gradtune.models.gpt import GPT, GPTConfig

    llama = tiny_hf.llama()
    assert shared_prompt.supports(llama)
    llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not shared_prompt.supports(llama)
    assert not shared_prompt.supports(GPT(GPTConfig(vocab_size=32, n_layer=1, n_head=2, n_embd=16, block_size=8)))

    class FSDPModule:  # FSDP2's fully_shard makes the model's class a subclass of one of this name
        pass

    sharded = tiny_hf.llama()
    sharded.__class__ = type("FSDPLlamaForCausalLM", (FSDPModule, type(sharded)), {})
    assert not shared_prompt.supports(sharded)
