"""Early stopping on validation keeps the best weights; the plateau schedule follows torch's
ReduceLROnPlateau on the logged metric; the stopping rule is scikit-learn's; callbacks see the
loop's events in order, can stop it and keep state across a resume; TensorBoard holds the same
scalars as metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gradtune.cli import main
from gradtune.config import load_config
from gradtune.jobs.registry import build
from gradtune.loop.callbacks import Callback
from gradtune.loop.fit import fit
from gradtune.state import checkpoint

QUIET = ["progress=off", "plot=false"]
OVERFIT = [
    "model=mlp",
    "data=breast_cancer",
    "hidden=[256,256]",
    "optimizer=adamw",
    "lr=0.003",
    "batch_size=16",
    "epochs=200",
    "early_stopping.enabled=true",
    "early_stopping.patience=4",
    *QUIET,
]


def evals(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]


def test_overfitting_run_stops_on_validation_and_ends_with_the_best_weights(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *OVERFIT, f"out_dir={out}"]) == 0
    said = capsys.readouterr().out
    rows = evals(out)
    best = min(rows, key=lambda r: r["val_loss"])
    assert len(rows) < 200 and rows[-1]["step"] > best["step"]  # stopped early, after the best
    assert rows[-1]["val_loss"] > best["val_loss"]  # it did overfit
    ckpts = checkpoint.listing(out / "best")
    assert [s for s, _ in ckpts] == [best["step"]] and checkpoint.verify(ckpts[0][1]) is None
    final, kept = load_file(str(out / "model.safetensors")), load_file(str(ckpts[0][1] / "model.safetensors"))
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in kept)
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["stop_reason"]
        == f"val_loss did not improve for 4 evaluations; best {best['val_loss']:.6g} at step {best['step']}"
    )
    assert summary["job"]["early_stopping"]["best_step"] == best["step"]
    assert f"weights: the best evaluation's, step {best['step']}" in said


def test_restore_best_false_keeps_the_last_weights_and_max_mode_metric(tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *OVERFIT,
                "early_stopping.restore_best=false",
                "early_stopping.monitor=val_accuracy",
                f"out_dir={out}",
            ]
        )
        == 0
    )
    rows = evals(out)
    best = max(rows, key=lambda r: r["val_accuracy"])  # auto mode: accuracy is maximised
    kept = checkpoint.listing(out / "best")[-1]
    assert kept[0] == best["step"]
    final, best_w = load_file(str(out / "model.safetensors")), load_file(str(kept[1] / "model.safetensors"))
    assert any(not torch.equal(final[k], best_w[k]) for k in best_w) or kept[0] == rows[-1]["step"]


def sklearn_stops_after(scores: list[float], tol: float, n_iter_no_change: int) -> int:
    """scikit-learn's SGD early-stopping loop (sklearn/linear_model/_sgd_fast.pyx, plain_sgd),
    on validation scores (higher is better): the evaluation at which it stops."""
    best, no_improvement = -math.inf, 0
    for i, score in enumerate(scores, start=1):
        if score < best + tol:
            no_improvement += 1
        else:
            no_improvement = 0
        if score > best:
            best = score
        if no_improvement >= n_iter_no_change:
            return i
    return len(scores)


def test_stopping_rule_is_scikit_learns(tmp_path):
    """Linear regression on diabetes, validation R^2 monitored with tol=1e-3, n_iter_no_change=5
    mirrored: the evaluation we stop at is the one scikit-learn's rule gives on the same scores."""
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "model=linear",
                "batch_size=32",
                "lr=0.01",
                "epochs=300",
                "early_stopping.enabled=true",
                "early_stopping.monitor=val_r2",
                "early_stopping.min_delta=1e-3",
                "early_stopping.patience=5",
                *QUIET,
                f"out_dir={out}",
            ]
        )
        == 0
    )
    scores = [r["val_r2"] for r in evals(out)]
    assert 6 <= len(scores) < 300
    assert sklearn_stops_after(scores + [-math.inf] * 10, 1e-3, 5) == len(scores)


def test_plateau_schedule_follows_reduce_lr_on_plateau(tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "model=mlp",
                "batch_size=32",
                "lr=0.05",
                "epochs=60",
                "schedule=plateau",
                "plateau_patience=2",
                "gamma=0.5",
                *QUIET,
                f"out_dir={out}",
            ]
        )
        == 0
    )
    rows = evals(out)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2)
    cuts = 0
    for prev, row in zip(rows, rows[1:]):  # the lr logged at an evaluation is the one its steps used
        ref.step(prev["val_loss"])
        assert math.isclose(row["lr"], opt.param_groups[0]["lr"], rel_tol=1e-12)
        cuts += row["lr"] < prev["lr"]
    assert cuts >= 1


class Recorder(Callback):
    def __init__(self, stop_at: int = 0) -> None:
        self.events: list[tuple] = []
        self.stop_at = stop_at
        self.steps_seen = 0

    def on_train_begin(self, control):
        self.events.append(("begin", control.total_steps))

    def on_step_end(self, step, loss, lr):
        self.steps_seen += 1
        self.events.append(("step", step))
        return "asked to stop" if step == self.stop_at else None

    def on_evaluate(self, step, metrics):
        self.events.append(("eval", step, round(metrics["loss"], 12)))

    def on_checkpoint(self, path):
        self.events.append(("ckpt", Path(path).name))

    def on_train_end(self, result):
        self.events.append(("end", result.steps, result.stop_reason))

    def state_dict(self):
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state):
        self.steps_seen = state["steps_seen"]


def test_callbacks_see_events_in_order_and_can_stop(tmp_path):
    cfg = load_config(
        None,
        ["model=linear", "batch_size=100", "epochs=5", "checkpoint_every=4", *QUIET, f"out_dir={tmp_path / 'run'}"],
    )
    rec = Recorder(stop_at=6)
    r = fit(build(cfg), cfg, tmp_path / "run", callbacks=[rec])
    assert r.steps == 6 and r.stop_reason == "asked to stop"
    kinds = [e[0] for e in rec.events]
    assert kinds[0] == "begin" and kinds[-1] == "end" and rec.events[-1] == ("end", 6, "asked to stop")
    assert [e for e in rec.events if e[0] == "step"] == [("step", s) for s in range(1, 7)]
    assert kinds.index("eval") == kinds.index("step") + 4  # 4 steps per epoch, then the evaluation
    assert ("ckpt", "step-00000004") in rec.events and rec.events.index(("ckpt", "step-00000004")) > kinds.index("eval")


def test_callback_state_survives_a_resume_and_yaml_callbacks_load(tmp_path, monkeypatch):
    out = tmp_path / "run"
    base = ["model=linear", "batch_size=100", "checkpoint_every=2", *QUIET, f"out_dir={out}"]
    first = Recorder()
    cfg = load_config(None, [*base, "max_steps=6", "epochs=100"])
    fit(build(cfg), cfg, out, callbacks=[first])
    second = Recorder()
    cfg = load_config(None, [*base, "max_steps=10", "epochs=100"])
    fit(build(cfg), cfg, out, callbacks=[second])
    assert first.steps_seen == 6 and second.steps_seen == 10  # 6 restored + 4 new
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    cfg = load_config(
        None,
        [
            "model=linear",
            "max_steps=3",
            *QUIET,
            "callbacks=[{class: 'test_early_stopping:Recorder', args: {stop_at: 2}}]",
        ],
    )
    assert fit(build(cfg), cfg).steps == 2


def test_tensorboard_holds_the_metrics_of_the_run(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert (
        main(["train", "model=mlp", "epochs=5", "log_every=3", "log_to=[tensorboard]", *QUIET, f"out_dir={out}"]) == 0
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0}).Reload()
    for kind, key in [("eval", "val_loss"), ("eval", "loss"), ("eval", "grad_norm"), ("step", "lr")]:
        want = [(r["step"], r[key]) for r in rows if r["kind"] == kind]
        got = [(e.step, e.value) for e in acc.Scalars(f"{kind}/{key}")]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert all(math.isclose(g, w, rel_tol=1e-6) for (_, g), (_, w) in zip(got, want))
