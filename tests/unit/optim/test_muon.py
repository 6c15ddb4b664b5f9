"""Muon against its oracle, torch.optim.Muon (with torch.optim.AdamW for what Muon does not take):
same trajectory, state_dict round trips, schedules, and the hidden-matrix split of real models.

Error measure as test_optim.py: per tensor, max|ours - torch| / max|torch|, 1e-6 in float32.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from gradtune.config import load_config
from gradtune.models.gpt import GPT, GPTConfig
from gradtune.optim import newton_schulz as newton_schulz_module
from gradtune.optim.build import make_optimizer
from gradtune.optim.groups import decay_groups, hidden_matrices, muon_groups
from gradtune.optim.hyper import MuonHyper
from gradtune.optim.muon import Muon, muon_reference, newton_schulz
from gradtune.optim.muon_adamw import MuonAdamW

STEPS = 20
NS = (3.4445, -4.7750, 2.0315)
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, muon_lr=0.02, momentum=0.95, nesterov=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


class Small(nn.Module):
    """Embedding, two hidden matrices (one tall, one wide), a bias, a norm, a 3-D tensor, a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 8)
        self.up = nn.Linear(8, 24)  # weight (24, 8): tall
        self.down = nn.Linear(24, 8, bias=False)  # weight (8, 24): wide
        self.norm = nn.LayerNorm(8)
        self.mix = nn.Parameter(torch.randn(2, 3, 8) * 0.1)
        self.head = nn.Linear(8, 5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # idx (B, T) -> (B, T, 5)
        x = self.emb(idx)
        x = x + self.down(torch.relu(self.up(x))) + self.mix.sum((0, 1))
        return self.head(self.norm(x))


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, 11, (4, 6), generator=g)
    return model(idx).pow(2).mean()


def pair() -> tuple[Small, MuonAdamW, Small, list[torch.optim.Optimizer]]:
    """Ours (one MuonAdamW) and the oracle (torch Muon on the hidden matrices, AdamW on the rest)."""
    ours, ref = Small(), Small()
    ref.load_state_dict(ours.state_dict())
    opt = MuonAdamW(muon_groups(ours, decay_groups(ours, 0.1), HYPER["lr"], HYPER["muon_lr"]), **HYPER)
    hidden = [ref.up.weight, ref.down.weight]
    rest = [p for p in ref.parameters() if all(p is not h for h in hidden)]
    torch_opts = [
        torch.optim.Muon(hidden, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True),
        torch.optim.AdamW(
            [
                {"params": [p for p in rest if p.dim() >= 2], "weight_decay": 0.1},
                {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=3e-3,
            betas=(0.9, 0.95),
            eps=1e-8,
        ),
    ]
    return ours, opt, ref, torch_opts


def one_step(model: nn.Module, opts: list, step: int) -> None:
    for o in opts:
        o.zero_grad()
    loss_of(model, step).backward()
    for o in opts:
        o.step()


def test_the_split_is_the_hidden_matrices_only():
    model = Small()
    assert hidden_matrices(model) == {id(model.up.weight), id(model.down.weight)}
    groups = muon_groups(model, decay_groups(model, 0.1), 3e-3, 0.02)
    assert [g["muon"] for g in groups] == [False, False, True]  # AdamW first: param_groups[0]["lr"] is lr
    assert groups[2]["lr"] == 0.02 and groups[2]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0


def test_equals_torch_muon_plus_adamw_every_step():
    ours, opt, ref, torch_opts = pair()
    for step in range(STEPS):
        one_step(ours, [opt], step)
        one_step(ref, torch_opts, step)
        for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
            assert rel_err(a.detach(), b.detach()) <= 1e-6, (step, name)
    moved = rel_err(ours.up.weight.detach(), Small().up.weight.detach())
    assert moved > 1e-3  # the comparison is not of two unmoved models


def test_drop_in_muon_equals_torch_bitwise_with_every_option():
    for kw in (dict(nesterov=False), dict(adjust_lr_fn="match_rms_adamw", ns_steps=3), dict(momentum=0.0)):
        g = torch.Generator().manual_seed(1)
        a = [torch.randn(s, generator=g).requires_grad_() for s in ((7, 5), (5, 9))]
        b = [p.detach().clone().requires_grad_() for p in a]
        o1, o2 = Muon(a, lr=0.05, **kw), torch.optim.Muon(b, lr=0.05, **kw)
        for _ in range(4):
            for p, q in zip(a, b):
                p.grad = torch.randn(p.shape, generator=g)
                q.grad = p.grad.clone()
            o1.step(), o2.step()
        assert all(torch.equal(p, q) for p, q in zip(a, b)), kw
        assert o1.state_dict()["state"].keys() == o2.state_dict()["state"].keys()
    with pytest.raises(ValueError, match="2D"):
        Muon([torch.zeros(3, requires_grad=True)])


def test_newton_schulz_makes_singular_values_near_one():
    g = torch.randn(32, 12, generator=torch.Generator().manual_seed(0)) * 1e-3  # scale does not matter
    s = torch.linalg.svdvals(newton_schulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7).float())
    assert s.min() > 0.5 and s.max() < 1.3


def test_state_dict_round_trip_midway_continues_bitwise():
    ours, opt, _, _ = pair()
    for step in range(STEPS // 2):
        one_step(ours, [opt], step)
    buf = io.BytesIO()
    torch.save({"model": ours.state_dict(), "opt": opt.state_dict()}, buf)
    twin = copy.deepcopy(ours)
    for step in range(STEPS // 2, STEPS):
        one_step(ours, [opt], step)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    twin.load_state_dict(saved["model"])
    opt2 = MuonAdamW(muon_groups(twin, decay_groups(twin, 0.1), 3e-3, 0.02), **{**HYPER, "muon_lr": 9.0})
    opt2.load_state_dict(saved["opt"])  # the saved groups' hyper-parameters win, as torch's
    for step in range(STEPS // 2, STEPS):
        one_step(twin, [opt2], step)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), twin.parameters()))
    kinds = {tuple(sorted(v)) for v in saved["opt"]["state"].values()}  # one state dict, both sides' states
    assert kinds == {("momentum_buffer",), ("exp_avg", "exp_avg_sq", "step")}


def test_an_lr_schedule_scales_both_sides_and_zero_lr_freezes():
    model = Small()
    opt = MuonAdamW(muon_groups(model, list(model.parameters()), 3e-3, 0.02), **HYPER)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** (s + 1))
    assert [g["lr"] for g in opt.param_groups] == [1.5e-3, 0.01]
    one_step(model, [opt], 0)
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [7.5e-4, 0.005]
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    one_step(model, [opt], 0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_make_optimizer_on_a_gpt_gives_attention_and_mlp_matrices_to_muon():
    cfg = load_config(None, ["model=gpt", "optimizer=muon", "lr=3e-3", "weight_decay=0.1"])
    for tie in (True, False):
        gpt = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, tie_embeddings=tie))
        opt = make_optimizer(cfg, decay_groups(gpt, 0.1), gpt)
        names = {id(p): n for n, p in gpt.named_parameters()}
        muon = sorted(names[id(p)] for p in opt.muon_params())
        assert muon == sorted(
            n for n in names.values() if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
        )
        assert sum(len(g["params"]) for g in opt.param_groups) == len(names)  # every parameter, once


def test_the_rule_on_the_mlp_the_linear_model_and_a_hugging_face_llama():
    mlp = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1))  # the 10-5-1 MLP
    assert hidden_matrices(mlp) == {id(mlp[0].weight)}  # the last layer is the output layer
    assert hidden_matrices(nn.Linear(3, 1)) == set()  # nothing hidden: all AdamW
    pytest.importorskip("transformers")
    from tests import tiny_hf

    llama = tiny_hf.llama()
    llama.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # frozen: in no group
    names = {id(p): n for n, p in llama.named_parameters()}
    got = {names[i].split(".")[-2] for i in hidden_matrices(llama)}
    assert got == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(hidden_matrices(llama)) == 2 * 7 - 1


def test_batched_orthogonalisation_equals_one_matrix_at_a_time():
    """``orthogonalise`` (equally shaped float32 matrices as one batch, tall ones transposed) gives
    the reference's bits: on first sight it compares the two and keeps the batch only where they
    agree, so later steps of the same shapes equal the reference too."""
    g = torch.Generator().manual_seed(2)
    shapes = [(24, 16), (16, 24), (16, 24), (48, 16), (16, 48), (5, 7), (7, 5), (32, 32)]
    for step in range(3):
        updates = [torch.randn(s, generator=g) for s in shapes]
        got = newton_schulz_module.orthogonalise(updates, NS, 5, 1e-7)
        for u, o in zip(updates, got):
            assert torch.equal(o, newton_schulz(u, NS, 5, 1e-7)), (step, tuple(u.shape))


def test_the_batched_iteration_itself_orthogonalises_like_the_reference():
    """The batched products on their own, not through the equality check that guards them (which would
    fall back silently to the reference if the batch computed something else): each matrix of a batch
    of tall ones (transposed as the reference does) agrees with ``newton_schulz`` to bfloat16 rounding."""
    g = torch.Generator().manual_seed(4)
    updates = [torch.randn(40, 16, generator=g) for _ in range(3)]
    x = newton_schulz_module._iterate(torch.stack([newton_schulz_module._normalised(u, 1e-7) for u in updates]), NS, 5)
    for u, batched in zip(updates, x):
        ref = newton_schulz(u, NS, 5, 1e-7)
        assert (batched.T.float() - ref.float()).abs().max().item() <= 2e-2 * ref.float().abs().max().item()


def test_muon_step_batches_the_recipe_shapes_and_equals_the_reference():
    """A GPT's hidden matrices (repeated shapes): the optimizer's step equals ``muon_reference``
    bitwise over 5 steps, with the batched path taken where this machine's products allow it."""
    model = GPT(GPTConfig(vocab_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, block_size=16, family="llama"))
    hidden = [p for p in model.parameters() if id(p) in hidden_matrices(model)]
    ref = [p.detach().clone() for p in hidden]
    opt = Muon(hidden, lr=0.02)
    bufs = [torch.zeros_like(p) for p in ref]
    hyper = MuonHyper.of(opt.param_groups[0])
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        for p in hidden:
            p.grad = torch.randn(p.shape, generator=g)
        muon_reference(ref, [p.grad.clone() for p in hidden], bufs, hyper)
        opt.step()
        assert all(torch.equal(a.detach(), b) for a, b in zip(hidden, ref))
    tried = [k for k in newton_schulz_module._BATCH_EQUAL if k[-1] == 3]  # one matrix of each kind a layer
    assert tried, "the repeated shapes were not batched"
