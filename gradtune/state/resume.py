"""Resume: continue a run from the newest checkpoint in ``out_dir`` that verifies.

``resume: auto`` (default) resumes when a checkpoint exists and starts fresh otherwise;
``never`` starts over (the old checkpoints are deleted once the input is validated);
``force`` resumes even when the config changed in a way that changes the run.

A corrupt or half-written newest checkpoint is reported (stderr and metrics.jsonl) and skipped
for the one before it. If checkpoints exist but none verifies, the run is refused rather than
silently restarted: hours of progress are not thrown away without a person deciding it.

Settings that do not change the run's math may differ on resume (``RUN_NEUTRAL``); so may
``epochs`` / ``max_steps`` (extend or shorten a run) when the schedule does not depend on the
total number of steps. Everything else differing is refused with the list of differences.
"""

from __future__ import annotations

import json
import math
import reprlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from gradtune.config import Config
from gradtune.data import fingerprint
from gradtune.jobs.job import Job
from gradtune.models.weights import aliases, misfit
from gradtune.runtime.atomic import write_text
from gradtune.runtime.errors import GradtuneError
from gradtune.state import checkpoint, sharded
from gradtune.telemetry.metrics_log import MetricsLog

# Output, bookkeeping and placement: none of them changes a single number of the run on CPU.
# (Changing ``device`` resumes fine, but bitwise equality is only promised on the same device.)
RUN_NEUTRAL = {
    "out_dir",
    "progress",
    "log_every",
    "plot",
    "checkpoint_every",
    "keep_checkpoints",
    "resume",
    "device",
    "distributed",
    "dist_timeout",
    "log_to",
}
BUDGET = {"epochs", "max_steps", "max_time"}
TOTAL_FREE_SCHEDULES = {"constant", "step", "exponential"}  # lr(step) does not use the total


@dataclass
class Plan:
    folder: Path
    model: dict[str, torch.Tensor]
    state: dict[str, Any]
    skipped: list[str] = field(default_factory=list)  # "folder: why" of newer, rejected ones


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for each setting that differs and changes the run."""
    a, b = _flat(saved), _flat(current)
    neutral = set(RUN_NEUTRAL)
    if a.get("schedule") == b.get("schedule") in TOTAL_FREE_SCHEDULES:
        neutral |= BUDGET
    keys = sorted((set(a) | set(b)) - neutral)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys if a.get(k) != b.get(k)]


def latest(root: Path) -> Optional[Plan]:
    """The newest checkpoint under ``root`` that verifies and reads; rejected newer ones listed."""
    skipped: list[str] = []
    for _, folder in reversed(checkpoint.listing(root)):
        try:
            model, state, saved = (sharded.load if sharded.is_sharded(folder) else checkpoint.load)(folder)
            if not (isinstance(state, dict) and isinstance(saved, dict) and isinstance(saved.get("config"), dict)):
                raise GradtuneError(f"checkpoint {folder}: state.json or config.json has the wrong shape")
        except GradtuneError as e:
            skipped.append(str(e))
            continue
        state["config"] = saved["config"]
        return Plan(folder, model, state, skipped)
    if skipped:
        raise GradtuneError(
            f"{root}: no checkpoint verifies (newest: {skipped[0]}); "
            f"move the folder away or set resume=never to start over"
        )
    return None


def _check_fits(plan: Plan, model: torch.nn.Module) -> None:
    own = model.state_dict()
    tied = aliases(model)  # stored once by checkpoint.save (sharded ones list every name)
    missing, unexpected = sorted(set(own) - set(plan.model) - tied), sorted(set(plan.model) - set(own))
    if missing or unexpected:
        raise misfit(plan.folder, missing, unexpected, shown=len(missing) + len(unexpected))
    for k, v in plan.model.items():
        if v.shape != own[k].shape or v.dtype != own[k].dtype:
            raise GradtuneError(
                f"{plan.folder}: '{k}' is {tuple(v.shape)} {v.dtype}, "
                f"the model has {tuple(own[k].shape)} {own[k].dtype}"
            )


_BIG = 2**53  # past this a JSON number is no longer an exact integer


def _get(state: dict[str, Any], name: str) -> Any:
    node: Any = state
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            raise GradtuneError(f"state.json has no '{name}'")
        node = node[part]
    return node


def _bad(name: str, want: str, value: Any) -> GradtuneError:
    return GradtuneError(f"state.json field '{name}' must be {want}, got {reprlib.repr(value)}")


def _int(state: dict[str, Any], name: str, lo: int = 0, hi: int = _BIG) -> int:
    v = _get(state, name)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v < hi:
        raise _bad(name, f"an integer in [{lo}, {hi})", v)
    return v


def _number(
    state: dict[str, Any],
    name: str,
    least: Optional[float] = None,
    above: bool = False,
    inf: bool = False,
    nan: bool = False,
) -> float:
    """A JSON number (not a bool): finite unless ``inf`` / ``nan`` allow those; ``>= least``
    (``> least`` if ``above``) when given."""
    v = _get(state, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if ok and not math.isfinite(v):
        ok = nan if math.isnan(v) else inf
    if ok and least is not None and not math.isnan(v):
        ok = v > least if above else v >= least
    if not ok:
        bound = "" if least is None else f" {'>' if above else '>='} {least:g}"
        raise _bad(name, f"{'a' if inf or nan else 'a finite'} number{bound}", v)
    return float(v)


def check_state(state: dict[str, Any], n_train: int) -> None:
    """Every field of a checkpoint's state.json the loop reads, checked before any is used: a
    crafted or damaged file (re-signed manifest) must fail here with the field's name, not as a
    division by zero or an index error deep in the loop. Raises GradtuneError."""
    try:
        n = int(state["data"]["n"])
    except (KeyError, TypeError, ValueError, OverflowError):
        raise GradtuneError("state.json has no data position") from None
    if n != n_train:
        raise GradtuneError(f"made with {n} training samples, the data now has {n_train}")
    step = _int(state, "step")
    _int(state, "skipped")
    if _int(state, "schedule.step") != step:
        raise _bad("schedule.step", f"the step ({step})", state["schedule"]["step"])
    _number(state, "schedule.lr_scale", 0, above=True)
    _number(state, "schedule.lr", 0)
    _int(state, "data.epoch")
    _int(state, "data.index", 0, n_train)  # an index past the data made an empty batch: 0/0
    _int(state, "data.micro_index", 0, 1)  # checkpoints are taken between steps only
    _int(state, "data.seed", -_BIG)
    if not isinstance(_get(state, "data.order_sha256"), str):
        raise _bad("data.order_sha256", "a hex digest", state["data"]["order_sha256"])
    if _get(state, "finished") is not None and not isinstance(state["finished"], str):
        raise _bad("finished", "null or a reason", state["finished"])
    window = _get(state, "guard.window")
    if not isinstance(window, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in window
    ):
        raise _bad("guard.window", "a list of finite numbers", window)
    _int(state, "guard.rollbacks")
    _number(state, "stopper.best", -math.inf, above=True, inf=True)  # +inf until the first evaluation
    _int(state, "stopper.bad")
    _number(state, "sums.loss")
    _number(state, "sums.count", 0)
    metrics = _get(state, "sums.metrics")
    if not isinstance(metrics, dict) or not all(isinstance(v, torch.Tensor) for v in metrics.values()):
        raise _bad("sums.metrics", "a mapping of tensors", metrics)
    if not isinstance(_get(state, "last_gnorm"), (torch.Tensor, type(None))):
        _number(state, "last_gnorm", inf=True, nan=True)  # unguarded runs may record inf / nan
    _int(state, "metrics_rows")
    for name in ("optimizer", "rng"):
        if not isinstance(_get(state, name), dict):
            raise _bad(name, "a mapping", state[name])


def plan(cfg: Config, out_dir: Optional[Path], job: Job) -> Optional[Plan]:
    """Which checkpoint to resume from (None: start fresh); raises GradtuneError to refuse."""
    if out_dir is None or cfg.resume == "never":
        return None
    root = checkpoint.root(out_dir)
    found = latest(root)
    if found is None:
        if cfg.resume == "force":
            raise GradtuneError(f"resume=force: no checkpoint in {root}")
        return None
    for why in found.skipped:
        print(f"gradtune: warning: skipped {why}", file=sys.stderr)
    diffs = config_diff(found.state["config"], cfg.to_dict())
    if diffs and cfg.resume != "force":
        raise GradtuneError(
            f"{found.folder}: config changed since this checkpoint ({'; '.join(diffs)}); "
            f"use another out_dir, or resume=force to continue anyway"
        )
    if cfg.resume != "force":
        changed = fingerprint.changes(found.state.get("data_fingerprint"), job.info.get("data_fingerprint"))
        if changed:
            raise GradtuneError(
                f"{found.folder}: the training data {cfg.data} changed since this checkpoint "
                f"({'; '.join(changed)}); use another out_dir, or resume=force to continue anyway"
            )
    _check_fits(found, job.model)
    try:
        check_state(found.state, len(job.train))
    except GradtuneError as e:
        raise GradtuneError(f"{found.folder}: {e}") from None
    return found


def discard(out_dir: Path) -> None:
    """``resume: never``: the old checkpoints belong to another run; remove them."""
    checkpoint.remove(checkpoint.root(out_dir))


def open_log(out_dir: Optional[Path], found: Optional[Plan], sinks: Sequence[Any] = ()) -> MetricsLog:
    """metrics.jsonl: fresh, or cut back to the rows the checkpoint had seen and appended to
    (rows written after it, by the interrupted process, are recomputed identically). ``sinks``
    (TensorBoard, MLflow, W&B) receive every row written from now on, the resume row included."""
    if out_dir is None:
        return MetricsLog(None, sinks=sinks)
    path = out_dir / "metrics.jsonl"
    if found is None:
        return MetricsLog(path, sinks=sinks)
    keep = int(found.state.get("metrics_rows", 0))
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[:keep] if path.is_file() else []
    try:
        rows = [json.loads(line) for line in lines]
    except ValueError as e:
        raise GradtuneError(f"{path}: not the log this checkpoint wrote ({e}); move it away to resume") from None
    write_text(path, "".join(line + "\n" for line in lines))
    for sink in sinks:  # a tracker new to this run (log_to grew on resume) gets the rows it missed
        if getattr(sink, "backfill", False):
            for row in rows:
                sink.write(row)
    log = MetricsLog(path, append=True, sinks=sinks)
    log.rows = rows
    log.write(
        {"kind": "resume", "step": int(found.state["step"]), "checkpoint": found.folder.name, "skipped": found.skipped}
    )
    return log
