"""Reloading a finished run, whatever its type: the one way ``eval``, ``predict`` and ``generate``
get a trained model back.

    run  = load_run("runs/x")            model with the trained weights (eval mode), objective,
                                         task, training's facts (summary.json "job"), tokenizer,
                                         class names, the config it was trained with
    data = run_data(run, "test.csv")     a file in training's format, training's transforms
                                         applied (standardisation, label map, tokenizer);
                                         None: the run's own validation split
    rows = run_inputs(run, "new.csv")    the same without labels (rows to predict; a label
                                         column present is ignored): tables and texts
    y = target_units(run, pred)          regression outputs back in the target's units

A run folder holds what its reloader needs: config.yaml, model.safetensors and summary.json for
every run, plus tokenizer.json (GPT) or tokenizer/ and labels.json (fine-tuning). A checkpoint
folder inside a run (``runs/x/checkpoints/step-00000100``) reloads its own weights with the
run's files. Each run type registers a reloader in ``RELOADERS``, keyed like ``BUILDERS``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from gradtune.config import Config, load_config
from gradtune.data import tabular, text
from gradtune.data import tokenizer as tokenizers
from gradtune.data.dataset import Dataset, TensorDataset
from gradtune.data.encoder_tokenizer import encoder_tokenizer
from gradtune.data.plain_tokenizer import PlainTokenizer
from gradtune.data.split import split_indices
from gradtune.data.text_tasks import LabelMap
from gradtune.jobs import preference, pretrained, trained_only
from gradtune.jobs import tabular as tabular_job
from gradtune.jobs.registry import kind
from gradtune.jobs.text import gpt, gpt_base, lm_objective, validation_windows
from gradtune.models import hf
from gradtune.models.weights import load_weights
from gradtune.objectives.output import Objective
from gradtune.runtime.errors import GradtuneError


@dataclass
class Run:
    folder: Path  # the run's out_dir
    cfg: Config  # the config it trained with
    kind: str  # its BUILDERS key: linear | logistic | mlp | gpt | pretrained
    task: str  # the Job's task: regression | classification | lm
    model: nn.Module  # trained weights, eval mode, on the CPU
    objective: Objective
    info: dict[str, Any] = field(default_factory=dict)  # summary.json["job"]: training's facts
    tokenizer: Any = None  # GPT: gradtune's Tokenizer; fine-tuning: the HF tokenizer
    classes: Optional[list[str]] = None  # class names in id order (classification)
    data_task: str = ""  # the data's task: the Job's, or fine-tuning's causal_lm / instruction


def run_folder(folder: Path) -> Path:
    """The run a folder belongs to: itself, or the run above a checkpoint folder."""
    for candidate in (folder, folder.parent, folder.parent.parent):
        if (candidate / "config.yaml").is_file() and (candidate / "summary.json").is_file():
            return candidate
    raise GradtuneError(
        f"{folder}: not a finished gradtune run (no config.yaml and summary.json here "
        f"or above; a run writes them when it ends)"
    )


def _need(run: Path, *names: str) -> None:
    for name in names:
        if not (run / name).exists():
            raise GradtuneError(f"{run}: incomplete run folder (no {name})")


def _reload_tabular(run: Path, cfg: Config, info: dict[str, Any], inference_only: bool = False) -> Run:
    classes = info.get("classes")
    task = info["task"]
    objective, _, n_out = tabular_job.objective_for(cfg, task, len(classes or []), info.get("class_weights"))
    model = tabular_job.make_model(cfg, len(info.get("inputs") or info["features"]), n_out)
    return Run(run, cfg, kind(cfg.model), task, model, objective, info, classes=classes, data_task=task)


def _reload_gpt(run: Path, cfg: Config, info: dict[str, Any], inference_only: bool = False) -> Run:
    _need(run, "tokenizer.json")
    tok = tokenizers.load(str(run / "tokenizer.json"))
    model = gpt(tok.vocab_size, cfg.gpt)
    if cfg.dtype == "float64":
        model = model.to(torch.float64)
    if cfg.task == "preference":  # a GPT tuned on pairs (jobs/text.preference_job)
        objective = preference.eval_objective(cfg)
        return Run(run, cfg, "gpt", "preference", model, objective, info, tokenizer=tok, data_task="preference")
    return Run(run, cfg, "gpt", "lm", model, lm_objective(cfg, tok), info, tokenizer=tok, data_task="lm")


def _reload_pretrained(run: Path, cfg: Config, info: dict[str, Any], inference_only: bool = False) -> Run:
    _need(run, "tokenizer")
    task = pretrained.resolve_task(cfg)
    labels = LabelMap.load(run / "labels.json") if (run / "labels.json").is_file() else None
    n_out = len(labels.names) if labels is not None else 1
    model, base_tokenizer, _ = pretrained.transformed(cfg, task, n_out, inference_only)
    tokenizer = None if base_tokenizer is not None else encoder_tokenizer(run / "tokenizer")
    if tokenizer is None:
        tokenizer = hf.load_tokenizer(run / "tokenizer", weights=False)
    if base_tokenizer is None:  # gradtune's own encoder: the check hf.load makes
        hf.check_vocab(getattr(model, "body", model), tokenizer)
    if task == "preference":  # DPO and family: rewards on pairs, the reference as in training
        job_task, objective = "preference", preference.eval_objective(cfg)
    else:
        job_task, objective = pretrained.job_task(task), pretrained.objective_for(task, info.get("class_weights"))
    return Run(
        run,
        cfg,
        "pretrained",
        job_task,
        model,
        objective,
        info,
        tokenizer=tokenizer,
        classes=labels.names if labels is not None else None,
        data_task=task,
    )


# (run folder, its config, summary.json's "job", inference_only) -> Run. inference_only: the
# model will only compute (eval, predict), not be exported or trained further.
RELOADERS: dict[str, Callable[[Path, Config, dict[str, Any], bool], Run]] = {
    "linear": _reload_tabular,
    "logistic": _reload_tabular,
    "mlp": _reload_tabular,
    "gpt": _reload_gpt,
    "pretrained": _reload_pretrained,
}


# Settings whose unset value came to mean something else after runs were saved without the key:
# a config.yaml from before the setting existed is read with the value those runs trained with.
# gpt.qk_norm: absent before the speedrun's settings (off then); unset is the family's now (on for llama).
SAVED_WITHOUT: dict[str, Any] = {"gpt": {"qk_norm": False}}


def _facts(folder: Path) -> tuple[Path, Config, dict[str, Any]]:
    """(run folder, its config, summary.json's "job" dict) of a run or checkpoint folder."""
    run = run_folder(folder)
    cfg = load_config(str(run / "config.yaml"), base=SAVED_WITHOUT)
    try:
        info = json.loads((run / "summary.json").read_text())["job"]
    except (ValueError, KeyError, TypeError) as e:
        raise GradtuneError(f"{run / 'summary.json'}: unreadable ({e})") from None
    return run, cfg, info


def run_task(folder: Path | str) -> str:
    """The Job task of the run at ``folder`` (regression | classification | lm), read from its
    files without loading the model: lets a command refuse a run type before the slow part."""
    _, cfg, info = _facts(Path(folder))
    k = kind(cfg.model)
    if k == "gpt":
        return "lm"
    if k == "pretrained":
        return pretrained.job_task(pretrained.resolve_task(cfg))
    return info["task"]


def _checkpoint_in(folder: Path) -> Path:
    """A folder of checkpoints (``best/``, ``checkpoints/``) stands for its newest one: early
    stopping's ``best/`` reloads like the run, with the best weights."""
    if (folder / "model.safetensors").is_file():
        return folder
    found = sorted(p.parent for p in folder.glob("step-*/model.safetensors"))
    return found[-1] if found else folder


def load_run(folder: Path | str, inference_only: bool = False) -> Run:
    """The finished run at ``folder`` (or the run of the checkpoint folder ``folder``), with the
    weights of ``folder`` loaded, in eval mode. ``inference_only``: the model will only compute
    (eval, predict): a BERT-family encoder is then gradtune's own module (models/bert.py, the
    same outputs) and its tokenizer the tokenizers library's, so transformers is not imported;
    not for a model to export or train further (transformers' classes are what those write)."""
    folder = _checkpoint_in(Path(folder))
    run, cfg, info = _facts(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise GradtuneError(f"{folder}: no model.safetensors")
    trained_only.check_base(weights, run)  # a trained-only file: its base is there, the same bytes
    loaded = RELOADERS[kind(cfg.model)](run, cfg, info, inference_only)
    if trained_only.base_of(weights) is not None:
        trained_only.load_trained(loaded.model, weights)
    else:
        load_weights(loaded.model, weights)
    loaded.model.eval()
    return loaded


# --- data in training's format -----------------------------------------------------------------


def _features(run: Run, table: tabular.Table) -> torch.Tensor:
    """The table's features as the model saw them in training: training's encoding and
    standardisation, in the model's dtype. (N, F)."""
    return tabular_job.features(run.info, table, next(run.model.parameters()).dtype)


def _tabular_data(run: Run, path: Optional[str]) -> Dataset:
    cfg, info = run.cfg, run.info
    table = tabular_job.read_for_run(path or cfg.data, info, labelled=True)
    x = _features(run, table)
    if run.task == "regression":
        y = tabular.regression_targets(table, table.target)
        if "target_mean" in info:
            y = (y - info["target_mean"]) / info["target_std"]
        y = y.to(x.dtype)
    else:
        y = tabular.known_class_ids(table, table.target, run.classes or [])
    if path is None:  # the run's own validation rows
        _, val_idx = split_indices(len(y), cfg.val_fraction, cfg.seed)
        x, y = x[val_idx], y[val_idx]
    return TensorDataset(x=x, y=y)


def _gpt_data(run: Run, path: Optional[str]) -> Dataset:
    if run.data_task == "preference":  # pairs, the reference from the run's init weights
        vocab = run.tokenizer.vocab_size
        return preference.eval_data(run.cfg, path, PlainTokenizer(run.tokenizer), lambda: gpt_base(run.cfg, vocab))
    spec = str(run.folder / "tokenizer.json")
    if path is not None:  # the whole file, in windows of block_size, read as training read its data
        tf = text.tokenize(path, spec, field=run.cfg.text.field)
        return text.split(tf, run.cfg.gpt.block_size, 0.0)[0]
    val = validation_windows(run.cfg, spec)
    if val is None:
        raise GradtuneError(f"{run.folder}: trained with val_fraction=0, so it has no validation split; give --data")
    return val


def _pretrained_data(run: Run, path: Optional[str]) -> Dataset:
    cfg = run.cfg
    if run.data_task == "preference":  # pairs (or KTO rows) with their reference (jobs/preference.py)
        return preference.eval_data(cfg, path, run.tokenizer)
    labels = LabelMap(run.classes) if run.classes is not None else None
    if path is not None or cfg.finetune.eval_data:
        data, _ = pretrained.load_data(cfg, run.data_task, path or cfg.finetune.eval_data, run.tokenizer, labels)
        return data
    data, _ = pretrained.load_data(cfg, run.data_task, cfg.data, run.tokenizer, labels)
    _, val_idx = split_indices(len(data), cfg.val_fraction, cfg.seed, ordered=True)
    if not len(val_idx):
        raise GradtuneError(f"{run.folder}: trained with val_fraction=0, so it has no validation split; give --data")
    return data.subset(val_idx.tolist())


def run_data(run: Run, path: Optional[str]) -> Dataset:
    """``path`` in the run's training format with training's transforms; None: the validation
    split the run was evaluated on. Unseen labels and missing columns are one-line errors."""
    if run.kind == "gpt":
        return _gpt_data(run, path)
    if run.kind == "pretrained":
        return _pretrained_data(run, path)
    return _tabular_data(run, path)


# --- rows to predict: inputs only ----------------------------------------------------------------


def _pretrained_inputs(run: Run, path: str) -> Dataset:
    data, _ = pretrained.load_data(run.cfg, run.data_task, path, run.tokenizer, labelled=False)
    return data


def run_inputs(run: Run, path: str) -> Dataset:
    """The inputs of ``path`` with training's transforms (standardised features, or tokenised
    texts), one sample per row in file order; its label column need not be there and is
    ignored if it is. Tables give batches of ``x``, texts of ``input_ids`` + ``attention_mask``
    (their ``labels`` are placeholders). Language-model runs have no rows to predict."""
    if run.task in ("lm", "preference"):
        raise GradtuneError(
            f"{run.folder}: a language model has no rows to predict; sample text with `gradtune generate {run.folder}`"
        )
    if run.kind == "pretrained":
        return _pretrained_inputs(run, path)
    table = tabular_job.read_for_run(path, run.info, labelled=False)
    return TensorDataset(x=_features(run, table))


def target_units(run: Run, pred: torch.Tensor) -> torch.Tensor:
    """Regression outputs (N,) in the target's own units (training standardised the target when
    summary.json has target_mean / target_std), float64."""
    pred = pred.double()
    if "target_mean" in run.info:
        pred = pred * run.info["target_std"] + run.info["target_mean"]
    return pred
