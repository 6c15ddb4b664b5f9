"""The "did it train?" audit catches silent no-ops after the first optimizer step."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradtune.config import FreezeSection, LoraSection
from gradtune.data.sequences import SequenceDataset
from gradtune.finetune import audit, methods
from gradtune.finetune.audit import AuditError
from gradtune.objectives.causal_lm import CausalLM

pytest.importorskip("transformers")
from tests import tiny_hf  # noqa: E402

SEQS = [[2, 5, 6, 7, 8, 3], [2, 9, 10, 3], [2, 11, 12, 13, 14, 15, 3], [2, 16, 3]]
DATA = SequenceDataset(SEQS, [list(s) for s in SEQS], 0)


def lora_llama():
    return methods.apply(tiny_hf.llama(), "lora", lora=LoraSection(rank=4))


def one_step(model, expect=None, opt_params=None, between=None):
    snapshot = audit.before(model, expect)
    params = opt_params if opt_params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    out = CausalLM(shift=True, token_accuracy=True)(model, DATA.get(torch.arange(4)))
    (out.loss_sum / out.count).backward()
    opt.step()
    if between is not None:
        between()
    audit.check(model, snapshot)


@pytest.mark.parametrize("method", ["lora", "full", "bitfit_free", "freeze"])
def test_healthy_runs_pass(method):
    name, freezing = {
        "lora": ("lora", None),
        "full": ("full", None),
        "bitfit_free": ("freeze", FreezeSection(patterns=["*norm*"])),
        "freeze": ("freeze", FreezeSection(train_last_blocks=1)),
    }[method]
    model, trainable = methods.apply(tiny_hf.llama(), name, freeze=freezing)
    one_step(model, trainable)  # no error; the lora_a exemption (B = 0) is exercised by "lora"


def test_frozen_by_mistake_is_named():
    model, trainable = lora_llama()
    model.model.layers[0].self_attn.q_proj.lora_b.weight.requires_grad_(False)  # the planted bug
    with pytest.raises(
        AuditError,
        match=r"expected trainable but frozen: "
        r"model\.layers\.0\.self_attn\.q_proj\.lora_b\.weight",
    ):
        one_step(model, trainable)


def test_trainable_without_gradient_is_named():
    model, trainable = lora_llama()
    model.unused = nn.Linear(4, 4)  # trainable, never called by forward
    with pytest.raises(AuditError, match=r"trainable but no gradient.*: unused\.weight, unused\.bias"):
        one_step(model)
    with pytest.raises(AuditError, match=r"trainable but not expected: unused\.bias, unused\.weight"):
        one_step(model, trainable)


def test_left_out_of_the_optimizer_is_named():
    model, _ = lora_llama()
    params = [p for n, p in model.named_parameters() if p.requires_grad and "layers.1.self_attn.v_proj" not in n]
    with pytest.raises(AuditError, match=r"did not move.*layers\.1\.self_attn\.v_proj\.lora_b\.weight"):
        one_step(model, opt_params=params)


def test_frozen_but_changed_is_named():
    model, _ = lora_llama()

    def corrupt():
        with torch.no_grad():
            model.model.norm.weight.add_(1.0)

    with pytest.raises(AuditError, match=r"frozen but changed: model\.norm\.weight"):
        one_step(model, between=corrupt)


def test_non_finite_gradient_is_named():
    model, _ = lora_llama()
    p = model.model.layers[1].self_attn.o_proj.lora_b.weight
    p.register_hook(lambda g: g * float("nan"))
    with pytest.raises(AuditError, match=r"non-finite gradient: model\.layers\.1\.self_attn\.o_proj\.lora_b"):
        one_step(model)


class _CheckpointedNet(nn.Module):
    """Frozen embedding -> a block run under reentrant activation checkpointing -> head."""

    def __init__(self, fix: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)
        self.fix = fix

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        if self.fix:  # the known fix (transformers' enable_input_require_grads)
            h.requires_grad_(True)
        h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=True)
        return self.head(h).sum()


@pytest.mark.parametrize("fix", [False, True])
def test_lora_with_reentrant_activation_checkpointing_trap_is_caught(fix):
    """Frozen embeddings + reentrant checkpointing: the block input does not require grad, so
    the checkpointed block is cut out of the graph and its LoRA factors get no gradient; only
    the head trains. (transformers 5 now applies the fix itself in gradient_checkpointing_enable,
    peft did before; a hand-rolled checkpoint or another library still falls in.)"""
    from gradtune.finetune import lora

    model = lora.apply_lora(_CheckpointedNet(fix), rank=2, targets=["block.0"])
    model.head.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        model.block[0].lora_b.weight.normal_()  # as after some steps: both factors get gradients
    snapshot = audit.before(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that no checkpoint input requires grad
        model(torch.tensor([1, 2, 3])).backward()
    opt.step()
    if fix:
        audit.check(model, snapshot)
    else:
        with pytest.raises(AuditError, match=r"trainable but no gradient.*block\.0\.lora_a\.weight"):
            audit.check(model, snapshot)


def fit(model, objective, data, steps, trainable, batch_size=2, lr=1e-2):
    """``steps`` AdamW steps of the one loop (gradtune.train.fit), audited after the first."""
    from gradtune.config import load_config
    from gradtune.jobs.job import Job
    from gradtune.jobs.pretrained import _audit_hook
    from gradtune.loop.fit import fit as loop_fit

    cfg = load_config(
        None,
        [
            "optimizer=adamw",
            f"lr={lr}",
            f"batch_size={batch_size}",
            f"max_steps={steps}",
            "epochs=1000",
            "val_fraction=0",
            "progress=off",
            "plot=false",
        ],
    )
    job = Job(model, objective, data, None, "lm", after_first_step=_audit_hook(model, trainable))
    return loop_fit(job, cfg)


def test_the_loop_runs_the_audit():
    from gradtune.runtime.errors import GradtuneError

    model, trainable = lora_llama()
    assert fit(model, CausalLM(shift=True, token_accuracy=True), DATA, 5, trainable).steps == 5
    model, trainable = lora_llama()
    wrong = trainable | {"model.embed_tokens.weight"}  # declared trainable, but frozen by LoRA
    with pytest.raises(GradtuneError, match="expected trainable but frozen: model.embed_tokens.weight"):
        fit(model, CausalLM(shift=True, token_accuracy=True), DATA, 5, wrong)
