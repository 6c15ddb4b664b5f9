"""Divergence guard: NaN and spike injection through an objective hook.

The oracle for "the bad step touched nothing": the weights and optimizer state seen by the call
after the bad one equal those seen by the bad one (skip) or the checkpoint's (rollback)."""

import json
from pathlib import Path

import pytest
import torch

from gradtune.config import load_config
from gradtune.jobs.registry import build
from gradtune.loop.fit import fit
from gradtune.objectives.output import Output
from gradtune.state import checkpoint


class Inject:
    """Wraps an objective: the batch holding ``bad_id`` gets its loss multiplied by ``factor``
    (nan or a spike), or a NaN gradient with a finite loss (``factor="grad"``), on the first
    ``times`` visits. Records the weights every call sees."""

    def __init__(self, objective, bad_id: int, factor, times: int = 1) -> None:
        self.objective, self.bad_id, self.factor, self.times = objective, bad_id, factor, times
        self.calls: list[tuple[bool, dict]] = []

    def __call__(self, model, batch) -> Output:
        out = self.objective(model, batch)
        bad = bool((batch["sample_id"] == self.bad_id).any()) and self.times > 0
        self.calls.append((bad, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        if bad:
            self.times -= 1
            if self.factor == "grad":
                # sqrt'(0) = inf, times 0 = NaN: a NaN gradient under a finite loss.
                zero = sum(p.sum() for p in model.parameters()) * 0.0
                return Output(out.loss_sum + torch.sqrt(zero), out.count, out.metrics)
            return Output(out.loss_sum * self.factor, out.count, out.metrics)
        return out


def setup(out: Path, extra: list[str], bad_id: int, factor, times: int = 1):
    cfg = load_config(
        None,
        [
            "model=mlp",
            "hidden=[6]",
            "standardize_target=true",
            "lr=0.05",
            "momentum=0.5",
            "batch_size=1",
            "max_steps=60",
            "eval_every=20",
            "progress=off",
            "plot=false",
            f"out_dir={out}",
            "keep_checkpoints=20",
            *extra,
        ],
    )
    job = build(cfg)
    hook = Inject(job.objective, bad_id, factor, times)
    job.objective = hook
    return job, cfg, hook


def rows(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def bad_call(hook: Inject) -> int:
    return next(i for i, (bad, _) in enumerate(hook.calls) if bad)


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def first_bad_id(cfg) -> int:
    """The sample of step 30: late enough for the spike window to be full."""
    from gradtune.data.sampler import epoch_order

    return int(epoch_order(len(build(cfg).train), cfg.seed, 0)[30])


@pytest.mark.parametrize("kind", ["nan_loss", "nan_grad"])
def test_non_finite_step_is_skipped_and_touches_nothing(kind, tmp_path):
    out = tmp_path / "run"
    cfg0 = load_config(None, ["batch_size=1"])
    job, cfg, hook = setup(out, [], first_bad_id(cfg0), float("nan") if kind == "nan_loss" else "grad")
    r = fit(job, cfg, out)
    i = bad_call(hook)
    assert same(hook.calls[i][1], hook.calls[i + 1][1])  # weights after the bad step = before it
    (g,) = rows(out, "guard")
    assert g["action"] == "skip" and g["step"] == 30 and g["sample_ids"] == [hook.bad_id]
    assert ("non-finite loss" if kind == "nan_loss" else "non-finite gradient") in g["reason"]
    assert r.steps == 60 and torch.isfinite(torch.tensor(r.train_loss))
    assert all(torch.isfinite(p).all() for p in job.model.parameters())


def test_skipped_step_leaves_optimizer_state_and_schedule_alone(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg0 = load_config(None, ["batch_size=1"])
    job, cfg, hook = setup(out, ["schedule=linear"], first_bad_id(cfg0), float("nan"))
    from gradtune.optim import SGD

    lrs = []
    real_step = SGD.step

    def spy(opt, *a, **k):
        lrs.append(opt.param_groups[0]["lr"])
        return real_step(opt, *a, **k)

    monkeypatch.setattr(SGD, "step", spy)
    fit(job, cfg, out)
    assert len(lrs) == 60
    assert lrs[30] == pytest.approx(0.05 * (1 - 30 / 60))  # the skipped batch did not use up step 30


def test_spike_rolls_back_to_the_checkpoint_with_a_lower_lr(tmp_path):
    out = tmp_path / "run"
    extra = ["guard.policy=rollback", "guard.spike_zscore=8", "guard.spike_window=10", "checkpoint_every=10"]
    cfg0 = load_config(None, ["batch_size=1"])
    job, cfg, hook = setup(out, extra, first_bad_id(cfg0), 1e6)
    r = fit(job, cfg, out)
    (g,) = rows(out, "guard")
    assert g["action"] == "rollback" and g["rollback_to"] == "step-00000030" and g["lr_scale"] == 0.5
    i = bad_call(hook)
    saved, _, _ = checkpoint.load(out / "checkpoints" / "step-00000030")
    assert same(hook.calls[i + 1][1], saved)  # the spike's update never happened
    assert r.steps == 60 and torch.isfinite(torch.tensor(r.train_loss))
    # Reproducible: the same run makes the same decisions and reaches the same weights.
    out2 = tmp_path / "again"
    job2, cfg2, _ = setup(out2, extra, hook.bad_id, 1e6)
    fit(job2, cfg2, out2)
    strip = lambda rs: [{k: v for k, v in x.items() if k != "time"} for x in rs]  # noqa: E731
    assert strip(rows(out2, "guard")) == strip(rows(out, "guard"))
    assert same(job.model.state_dict(), job2.model.state_dict())


class ExplodesAfter:
    """Every batch after the first ``n`` calls has a NaN loss: a run no rollback can save."""

    def __init__(self, objective, n: int) -> None:
        self.objective, self.n, self.calls = objective, n, 0

    def __call__(self, model, batch) -> Output:
        self.calls += 1
        out = self.objective(model, batch)
        return Output(out.loss_sum * (float("nan") if self.calls > self.n else 1.0), out.count, out.metrics)


def test_exploding_run_stops_after_max_rollbacks_and_suggests_an_lr(tmp_path):
    out = tmp_path / "run"
    job, cfg, _ = setup(out, ["guard.policy=rollback", "guard.max_rollbacks=2", "checkpoint_every=10"], -1, 1.0)
    job.objective = ExplodesAfter(job.objective, 25)
    r = fit(job, cfg, out)
    assert r.stop_reason.startswith("diverged: the loss kept exploding after 2 rollbacks")
    assert "at lr 0.0125" in r.stop_reason and "try lr=0.00625" in r.stop_reason and "lr-find" in r.stop_reason
    assert [g["action"] for g in rows(out, "guard")] == ["rollback"] * 3


def test_stop_policy_reports_step_and_reason(tmp_path):
    out = tmp_path / "run"
    cfg0 = load_config(None, ["batch_size=1"])
    job, cfg, hook = setup(out, ["guard.policy=stop"], first_bad_id(cfg0), float("inf"))
    r = fit(job, cfg, out)
    assert r.stop_reason == "diverged: non-finite loss inf at step 30" and r.steps == 30
