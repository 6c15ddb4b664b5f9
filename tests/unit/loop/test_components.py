"""Every component of the loop driven alone with synthetic events on a fake ``LoopView``:
what it adds to a row, what it changes in the run, the state it checkpoints; and the event
dispatch itself (order, who hears what, a raising callback named in one line)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from gradtune.config import load_config
from gradtune.config.schema import EarlyStoppingSection
from gradtune.data.sampler import Step
from gradtune.jobs.registry import build
from gradtune.loop import assemble
from gradtune.loop.budget import FORCE_ENV, Spent
from gradtune.loop.callbacks import Callback, CallbackError, Control
from gradtune.loop.components import Component, Events
from gradtune.loop.early_stopping import EarlyStopping
from gradtune.loop.instruments import ProgressDisplay, TensorBoard, Throughput, UpdateRatios
from gradtune.loop.noise_scale import NoiseScaleMeter
from gradtune.loop.plateau import PlateauSchedule
from gradtune.loop.run_hooks import AllocatorPolicy, Audit, TestProbe
from gradtune.loop.time_budget import TimeBudget
from gradtune.loop.trackers import SINKS, Tracker
from gradtune.runtime.testhooks import PROBE_ENV
from gradtune.telemetry.metrics_log import MetricsLog
from gradtune.telemetry.progress import Progress


class View(SimpleNamespace):
    """A stand-in for the loop: the attributes LoopView documents, nothing else."""

    def __init__(self, **kw):
        model = torch.nn.Linear(3, 1)
        base = dict(
            job=SimpleNamespace(unit="samples", info={}, val=None, objective=None, model=model),
            cfg=load_config(None, ["model=mlp"]),
            model=model,
            opt=torch.optim.SGD(model.parameters(), lr=0.1),
            device=torch.device("cpu"),
            amp=None,
            step=0,
            total=100,
            eval_every=10,
            steps_per_epoch=10,
            batch=Step(0, 0, [torch.tensor([3, 1]), torch.tensor([2])], False),
            count=3.0,
            log=MetricsLog(None),
            phases=Spent(),
            chained=False,
            eval_set=None,
            final_set=None,
            eval_batch=4,
            period_count=0.0,
            progress=Progress("off", 100),
            warmup=0,
            notes=[],
            totals=[],
        )
        base.update(kw)
        super().__init__(**base)

    def set_total(self, total, span=None):
        self.total = total
        self.totals.append((total, span))

    def note(self, line):
        self.notes.append(line)


def attached(c: Component, **kw) -> tuple[Component, View]:
    v = View(**kw)
    c.attach(v)
    return c, v


def control(out_dir=None) -> Control:
    return Control(out_dir, 100, lambda root: root, lambda root: None, lambda: {"w": 1}, lambda w: None)


def test_progress_display_ticks_reports_and_closes(capsys):
    c, v = attached(ProgressDisplay("lines"))
    c.on_train_begin(control())
    assert isinstance(v.progress, Progress) and v.progress.unit == "samples"
    c.on_step_end(1, 0.5, 0.1)
    c.on_evaluate(1, {"kind": "eval", "step": 1, "loss": 0.5, "val_loss": 0.25})
    c.on_run_end()
    err = capsys.readouterr().err
    assert "step 1/100 loss=0.5 val_loss=0.25" in err and "kind" not in err


def test_throughput_counts_training_seconds_only(monkeypatch):
    c, v = attached(Throughput(), period_count=1000.0)
    clock = iter([10.0, 12.0, 13.0])
    monkeypatch.setattr("gradtune.loop.instruments.time.perf_counter", lambda: next(clock))
    v.job.info["flops_per_token"] = 6.0
    monkeypatch.setattr("gradtune.loop.instruments.peak_flops", lambda device, bf16, remeasure=False: 1e6)
    c.on_train_begin(control())  # mark at 10 s
    v.phases.eval = 1.0  # one second of the two was an evaluation
    row: dict = {}
    c.on_measure(row)  # at 12 s
    assert row["tokens_per_s"] == pytest.approx(1000.0) and row["mfu"] == pytest.approx(6e3 / 1e6)
    c.on_step_begin()  # the next period starts here (13 s)
    assert c.t_mark == 13.0 and c.other_mark == 1.0 and not c.pending


def test_update_ratios_measure_the_step_they_surround():
    c, v = attached(UpdateRatios())
    c.on_train_begin(control())
    for p in v.model.parameters():
        p.grad = torch.ones_like(p)
    c.on_update(True)
    v.opt.step()
    c.on_update(False)
    row: dict = {}
    c.on_measure(row)
    assert set(row) == {"update_ratio_g0"} and 0 < row["update_ratio_g0"] < 1


def test_tensorboard_opens_its_sink_under_out_dir(tmp_path):
    pytest.importorskip("tensorboard")
    c = TensorBoard(tmp_path)
    sink = c.log_sink()
    sink.write({"kind": "eval", "step": 1, "loss": 0.5})
    sink.close()
    assert any((tmp_path / "tb").iterdir()) and "tb" in c.describe()


class FakeSink:
    """A tracker sink that records what the Tracker component asks of it."""

    def __init__(self, out_dir, config, run_id=None, resume_step=None):
        self.opened, self.fresh = (run_id, resume_step), run_id is None
        self.run_id = run_id or "new-run"
        self.flushes, self.done = 0, False

    def flush(self):
        self.flushes += 1

    def info(self):
        return {"run_id": self.run_id}


def test_tracker_keeps_its_run_id_in_the_checkpoint_and_resumes_it(tmp_path, monkeypatch):
    monkeypatch.setitem(SINKS, "mlflow", FakeSink)
    c, v = attached(Tracker("mlflow", tmp_path, load_config(None, [])))
    assert c.key == "mlflow" and "mlflow.db" in c.describe()
    sink = c.log_sink()
    assert sink.opened == (None, None)  # a fresh run: a new tracker run
    assert c.state_dict() == {"run_id": "new-run"} and sink.flushes == 1  # pending rows go before a checkpoint
    c.on_run_end()
    assert sink.done and v.job.info["trackers"] == {"mlflow": {"run_id": "new-run"}}
    again, view = attached(Tracker("mlflow", tmp_path, load_config(None, [])), step=20)
    again.load_state_dict({"run_id": "new-run"})  # restored from the checkpoint at step 20
    resumed = again.log_sink()
    assert resumed.opened == ("new-run", 20) and not resumed.backfill  # the same run, rewound to the checkpoint
    added, _ = attached(Tracker("mlflow", tmp_path, load_config(None, [])), step=20)
    assert added.log_sink().backfill  # log_to grew on resume: a new run, given metrics.jsonl's rows so far
    other = Tracker("wandb", tmp_path, load_config(None, []))
    other.load_state_dict({"run_id": ""})
    assert other.run_id is None and "wandb" in other.describe()


def test_allocator_policy_sees_each_step_after_the_update(monkeypatch):
    seen = []
    c, v = attached(AllocatorPolicy(torch.tensor([3, 5, 7]), 1))
    monkeypatch.setattr(c.memory, "after_step", lambda micro: seen.append([m.tolist() for m in micro]))
    assert c.update_every_step
    c.on_update(True)
    c.on_update(False)
    assert seen == [[[3, 1], [2]]]


def test_audit_fingerprints_at_begin_and_checks_after_the_first_step_only():
    calls = []
    c, v = attached(Audit())
    v.job.at_start = lambda m: calls.append(("start", v.step))
    v.job.after_first_step = lambda m: calls.append(("first", v.step))
    c.on_train_begin(control())
    c.on_update(True)
    c.on_update(False)  # step 0's update: checked
    v.step = 1
    c.on_update(False)
    assert calls == [("start", 0), ("first", 0)]


def test_test_probe_records_sample_ids(tmp_path, monkeypatch):
    monkeypatch.setenv(PROBE_ENV, str(tmp_path))
    c, v = attached(TestProbe())
    c.on_train_begin(control())
    c.on_step_end(1, 0.5, 0.1)
    c.on_run_end()
    rows = [json.loads(r) for r in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "ids": [3, 1, 2]}]


def test_noise_scale_meter_estimates_and_advises():
    c, v = attached(NoiseScaleMeter("samples"))
    assert c.wants_first
    # |G_b|² = 2.0 over b=2, |G_B|² = 1.0 over B=8: tr(Σ) = 1/(1/2-1/8) = 8/3, |G|² = (8-4)/6 = 2/3.
    c.on_gradients([], math.sqrt(1.0), 8.0, [2.0 * 4.0, 2.0])
    row: dict = {}
    c.on_measure(row)
    assert row["noise_scale"] == pytest.approx((8 / 3) / (2 / 3))
    c.on_run_end()
    assert v.job.info["noise_scale"]["batch"] == 8.0
    fresh, _ = attached(NoiseScaleMeter("samples"))
    fresh.load_state_dict(c.state_dict())
    assert fresh.noise.value == c.noise.value and c.key == "noise"


def test_plateau_schedule_cuts_the_lr_factor_and_notes_it():
    cfg = load_config(None, ["model=mlp", "schedule=plateau", "plateau_patience=1", "gamma=0.5", "lr=0.1"])
    c, v = attached(PlateauSchedule(cfg))
    for step, val in enumerate([1.0, 1.0, 1.0], 1):
        c.on_evaluate(step, {"val_loss": val})
    assert c.lr_factor() == 0.5 and v.notes == ["plateau: step 3: lr cut to 0.05"]
    again, _ = attached(PlateauSchedule(cfg))
    again.load_state_dict(c.state_dict())
    assert again.lr_factor() == 0.5


def test_early_stopping_stops_and_keeps_the_best_in_memory():
    es = EarlyStopping(EarlyStoppingSection(enabled=True, patience=2))
    es.on_train_begin(control())
    assert [es.on_evaluate(s, {"val_loss": v}) for s, v in enumerate([3.0, 1.0, 2.0, 2.0], 1)][-1]
    assert es.best_step == 2 and es.memory == {"w": 1}


def test_time_budget_calibrates_caps_warmup_and_maps_the_schedule(monkeypatch, capsys):
    monkeypatch.setenv(FORCE_ENV, "50")
    cfg = load_config(None, ["model=mlp", "max_time=10m", "warmup_steps=100", "schedule=cosine"])
    c, v = attached(TimeBudget(cfg, None, 1000), total=1000)
    c.on_train_begin(control())
    for step in range(1, 40):
        v.step = step
        c.on_step_begin()
        c.on_step_done()
        if c.budget.fixed:
            break
    assert v.total == 50 and v.totals[-1] == (50, 50)
    assert v.warmup == max(5, v.step)  # 10% of 50 steps, never below the steps already taken
    assert "warmup_steps 100 capped" in capsys.readouterr().err
    assert c.schedule(10, 50) == (10, 50)
    c.on_run_end()
    assert v.job.info["time_budget"]["plan"]["steps"] == 50
    again, w = attached(TimeBudget(cfg, None, 1000), total=1000)
    again.load_state_dict(c.state_dict())  # a resume: the same total and warm-up, no calibration
    assert w.total == 50 and w.warmup == v.warmup


def test_time_budget_samples_the_final_evaluation_when_a_full_pass_would_not_fit():
    cfg = load_config(None, ["model=mlp", "max_time=10s", "seed=3"])
    val = torch.utils.data.TensorDataset(torch.zeros(1000))
    c, v = attached(TimeBudget(cfg, None, 1000), final_set=val)  # set before attach, as the loop does
    v.job.val = val
    assert c._final_set(0.001) == 1000  # 1 s of 10: fits in FINAL_SHARE
    k = c._final_set(0.01)  # 10 s: a sample of 1.5 s
    assert k == 150
    c.budget.plan.steps, c.budget.plan.final_samples = 20, k
    assert "final evaluation on 150 of 1,000" in c._apply() and len(v.final_set) == 150


def test_time_budget_prices_the_final_set_eval_final_chose():
    """eval_final=sample: the final evaluation is priced (and cut, if need be) from the sample the
    loop chose, not from the whole validation set."""
    cfg = load_config(None, ["model=mlp", "max_time=10s", "seed=3"])
    val = torch.utils.data.TensorDataset(torch.zeros(1000))
    c, v = attached(TimeBudget(cfg, None, 1000), final_set=torch.utils.data.Subset(val, range(100)))
    v.job.val = val
    assert c._final_set(0.01) == 100  # 1 s: fits, where the full pass (10 s) would be cut to 150
    assert c._final_set(0.1) == 15
    c.budget.plan.steps, c.budget.plan.final_samples = 20, 15
    assert "final evaluation on 15 of 100" in c._apply() and len(v.final_set) == 15


class Recorder(Callback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, step, loss, lr):
        self.seen.append("step")
        return None

    def on_evaluate(self, step, metrics):
        self.seen.append("eval")
        return "enough"


class Boom(Callback):
    def on_evaluate(self, step, metrics):
        raise KeyError("val_f1")


def test_events_dispatch_only_to_listeners_in_order_and_save_state():
    plateau = PlateauSchedule(load_config(None, ["model=mlp", "schedule=plateau"]))
    rec = Recorder()
    ev = Events([UpdateRatios(), plateau, rec])
    assert ev.on["on_step_end"] == [rec] and ev.on["lr_factor"] == [plateau]
    assert ev.callbacks == [rec] and "callback Recorder" in ev.describe()
    assert ev.step_end(1, 0.5, 0.1) is None and ev.ask("on_evaluate", 1, {"val_loss": 1.0}) == "enough"
    state = ev.state_dict()
    assert set(state) == {"plateau", "callbacks"} and state["callbacks"] == [None]
    with pytest.raises(Exception, match="saved with 2 callbacks"):
        ev.load_state_dict({"callbacks": [None, None]})


def test_a_raising_callback_is_one_line_naming_it_and_the_event(monkeypatch, capsys):
    ev = Events([Boom()])
    with pytest.raises(CallbackError, match=r"callback Boom.on_evaluate raised KeyError: 'val_f1'") as e:
        ev.ask("on_evaluate", 1, {})
    assert e.value.exit_code == 1 and capsys.readouterr().err == ""
    monkeypatch.setenv("GRADTUNE_DEBUG", "1")
    with pytest.raises(CallbackError):
        ev.ask("on_evaluate", 1, {})
    assert "Traceback" in capsys.readouterr().err


def test_components_on_every_rank_callbacks_on_rank_zero_only():
    rec, comp = Recorder(), UpdateRatios()
    assert Events([comp, rec], main=False).all == [comp]


def test_trackers_are_rank_0s_and_need_an_out_dir(tmp_path, monkeypatch):
    cfg = load_config(None, ["model=linear", "data=diabetes", "log_to=[wandb, mlflow]", "progress=off"])
    job = build(cfg)
    names = [c.describe() for c in assemble.components(job, cfg, tmp_path, 10, False)]
    assert [n.split("(")[0] for n in names if "(" in n] == ["MLflow", "W&B"]
    assert not [c for c in assemble.components(job, cfg, None, 10, False) if isinstance(c, Tracker)]
    monkeypatch.setattr(assemble.distributed, "is_main", lambda: False)
    assert not [c for c in assemble.components(job, cfg, tmp_path, 10, False) if isinstance(c, Tracker)]
