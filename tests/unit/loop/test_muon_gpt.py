"""optimizer=muon through the loop: a tiny GPT trains (the loss falls), the schedule drives both
sides' rates, and a run interrupted mid-way resumes from its checkpoint to the same weights, bit
for bit, as the uninterrupted run (the oracle)."""

import json
from pathlib import Path

import torch

from gradtune.config import load_config
from gradtune.jobs.registry import build
from gradtune.loop import loop as loop_module
from gradtune.loop.callbacks import Callback
from gradtune.loop.fit import fit
from gradtune.optim.build import make_optimizer
from gradtune.runtime import testhooks as faults

ARGS = [
    "model=gpt",
    "gpt.n_layer=1",
    "gpt.n_head=2",
    "gpt.n_embd=32",
    "gpt.block_size=32",
    "optimizer=muon",
    "lr=3e-3",
    "muon_lr=0.02",
    "weight_decay=0.01",
    "schedule=cosine",
    "warmup_steps=2",
    "batch_size=8",
    "max_steps=10",
    "eval_every=5",
    "checkpoint_every=3",
    "val_fraction=0.01",
    "progress=off",
    "plot=false",
    "seed=5",
]


class Interrupt(BaseException):
    """Stands for a kill: not an Exception, so nothing in the loop can swallow it."""


class Rates(Callback):
    """Each step's (logged lr, AdamW groups' lrs, Muon groups' lrs) from the optimizer the loop built."""

    def __init__(self) -> None:
        self.opts: list = []
        self.seen: list[tuple[float, set, set]] = []

    def on_step_end(self, step, loss, lr):  # noqa: ANN001
        groups = self.opts[-1].param_groups
        self.seen.append((lr, {g["lr"] for g in groups if not g["muon"]}, {g["lr"] for g in groups if g["muon"]}))


def run(out: Path, callbacks=None):
    cfg = load_config(None, [*ARGS, f"out_dir={out}"])
    job = build(cfg)
    fit(job, cfg, out, callbacks=callbacks)
    return job


def test_muon_gpt_trains_follows_the_schedule_and_resumes_bitwise(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADTUNE_CACHE", str(tmp_path / "cache"))
    rates = Rates()

    def capture(*args):  # noqa: ANN002
        rates.opts.append(make_optimizer(*args))
        return rates.opts[-1]

    monkeypatch.setattr(loop_module, "make_optimizer", capture)
    ref = run(tmp_path / "ref", [rates])
    lrs = [r[0] for r in rates.seen]
    assert len(lrs) == 10 and lrs[0] < lrs[2] == 3e-3 and lrs[2] > lrs[5] > lrs[-1]  # warm-up, then cosine
    for lr, adamw, muon in rates.seen:  # every group follows the schedule: one ratio, muon_lr / lr
        assert adamw == {lr} and len(muon) == 1 and abs(muon.pop() - lr * 0.02 / 3e-3) <= 1e-12
    rows = [json.loads(r) for r in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.1, evals  # trains

    # Interrupted at step 5 (checkpoint at 3), resumed: the same weights as the reference.
    out = tmp_path / "resumed"
    seen = {"n": 0}

    def hit(point: str) -> None:
        if point == "step":
            seen["n"] += 1
            if seen["n"] == 5:
                raise Interrupt()

    monkeypatch.setattr(faults, "hit", hit)
    try:
        run(out)
        raise AssertionError("not interrupted")
    except Interrupt:
        pass
    monkeypatch.setattr(faults, "hit", lambda point: None)
    resumed = run(out)
    assert any(json.loads(r)["kind"] == "resume" for r in (out / "metrics.jsonl").read_text().splitlines())
    a, b = ref.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
