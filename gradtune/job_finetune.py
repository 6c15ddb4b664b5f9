"""The fine-tuning job: a pretrained HF folder / .gguf + a method (transforms) + a text task.

    model=path/to/minilm data=spam.csv method=lora            -> encoder + head, classification
    model=path/to/llama data=chat.jsonl task=instruction       -> causal LM, response tokens only

The model is loaded as an encoder (classification / regression: a new head on the pooled
output) or as a causal LM (causal_lm / instruction); ``method`` picks what trains. Like every
builder this validates all input (model folder, data, labels, method, export) before anything
is written; the only write it schedules is ``save_extra`` (tokenizer, labels, exports), which
the loop's ``save_outputs`` calls. ``load_run`` rebuilds a finished run for eval/export/generate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from gradtune.config import Config
from gradtune.errors import GradtuneError
from gradtune.job import Job

ENCODER_TASKS = ("classification", "regression")


def resolve_task(cfg: Config) -> str:
    """auto: plain text (.txt) is causal-LM data, anything else labelled rows (classification)."""
    if cfg.task != "auto":
        return cfg.task
    return "causal_lm" if cfg.data.endswith(".txt") else "classification"


def settings(cfg: Config, task: str) -> Any:
    """FinetuneSettings from the config; ``method`` may combine 'head' with one body method.

    Why only one body method: the transforms each decide requires_grad for the whole body, so
    a second one would overrule the first; 'head' is not a body method but the task's head,
    which encoder tasks always get (head alone: the body is frozen).
    """
    from gradtune.finetune.lora import DEFAULT_TARGETS
    from gradtune.finetune.methods import METHODS, FinetuneSettings

    parts = [m.strip() for m in cfg.method.split("+") if m.strip()]
    unknown = [m for m in parts if m not in METHODS]
    if unknown or not parts:
        raise GradtuneError(f"config: method '{cfg.method}': choose from {', '.join(METHODS)} "
                            f"(combine with '+', e.g. head+lora)")
    body = [m for m in parts if m != "head"]
    if len(body) > 1:
        raise GradtuneError(f"config: method '{cfg.method}' combines {' and '.join(body)}; "
                            f"combine 'head' with at most one of full, freeze, lora, bitfit")
    if "head" in parts and task not in ENCODER_TASKS:
        raise GradtuneError(f"config: method 'head' adds a classification/regression head; task '{task}' has none")
    method = body[0] if body else "head"
    export = cfg.finetune.export
    if export in ("adapter", "both") and method != "lora":
        raise GradtuneError(f"config: finetune.export={export} writes a LoRA adapter; method '{cfg.method}' has no LoRA")
    f = cfg.freeze
    is_freeze = method == "freeze"
    return FinetuneSettings(
        method=method, train=list(f.patterns) if is_freeze else [],
        last_n_blocks=f.train_last_blocks if is_freeze else None,
        train_embeddings=(not f.embeddings) if is_freeze else False,
        rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
        targets=list(cfg.lora.targets) or list(DEFAULT_TARGETS),
        pooling=cfg.finetune.pooling, head_dropout=cfg.finetune.head_dropout)


def load_data(cfg: Config, task: str, path: str, tokenizer: Any, label_map: Any = None) -> tuple[Any, Any]:
    """(SequenceDataset, LabelMap or None) of ``path`` for ``task``."""
    from gradtune.data.causal_text import load_causal_text
    from gradtune.data.instructions import load_instructions
    from gradtune.data.text_tasks import load_text_task

    t = cfg.text
    if task in ENCODER_TASKS:
        return load_text_task(path, tokenizer, task, t.text_column, t.label_column, t.columns,
                              t.max_length, label_map)
    if task == "instruction":
        return load_instructions(path, tokenizer, t.max_length), None
    return load_causal_text(path, tokenizer, t.max_length, t.text_column), None


def objective_for(task: str) -> Any:
    from gradtune.finetune.objectives import CausalLMObjective, ClassificationObjective, RegressionObjective

    return {"classification": ClassificationObjective, "regression": RegressionObjective}.get(task, CausalLMObjective)()


def transformed(cfg: Config, task: str, num_outputs: Optional[int]) -> tuple[nn.Module, Any, frozenset[str]]:
    """(model after the method's transforms, tokenizer, declared trainable names)."""
    from gradtune.finetune import methods
    from gradtune.models import hf

    s = settings(cfg, task)  # method errors before the (slow) model load
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    body, tokenizer = hf.load(cfg.model, "encoder" if task in ENCODER_TASKS else "causal_lm", dtype)
    if checkpointing(cfg, s.method) and getattr(body, "supports_gradient_checkpointing", False):
        # Non-reentrant: correct with frozen embeddings (inputs that do not require grad), the
        # trap the audit catches with the reentrant variant. Dropout masks are replayed exactly.
        if task in ENCODER_TASKS and getattr(body.config, "use_cache", None):
            body.config.use_cache = False  # an encoder never generates (silences a warning)
        body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(cfg.seed)  # the head's and LoRA's random init are part of the seeded run
    model, trainable = methods.apply(body, s, num_outputs if task in ENCODER_TASKS else None)
    return model, tokenizer, trainable


def checkpointing(cfg: Config, method: str) -> bool:
    """Activation checkpointing, when asked for (off by default: on MiniLM it cut full
    fine-tuning's peak memory by ~70 MB for ~40% more time per step, where trimming the heap
    each step cut ~65 MB for ~10%, see allocator.py). ``head`` never backpropagates through
    the body, so there is nothing to recompute."""
    return method != "head" and cfg.finetune.checkpointing is True


def build_pretrained(cfg: Config) -> Job:
    """BUILDERS["pretrained"]: fine-tune the model at ``cfg.model`` on ``cfg.data``."""
    from gradtune.data.sequences import split
    from gradtune.finetune.summary import summary
    from gradtune.models import hf

    task = resolve_task(cfg)
    settings(cfg, task)  # fail fast on the method before reading model or data
    if cfg.loss != "auto" or cfg.label_smoothing:
        raise GradtuneError("config: fine-tuning objectives fix the loss (cross-entropy for classes and "
                            "tokens, mse for regression); leave loss=auto and label_smoothing=0")
    tokenizer = hf.load_tokenizer(cfg.model)
    data, labels = load_data(cfg, task, cfg.data, tokenizer)
    if cfg.finetune.eval_data:  # a separate test file: train on all of data
        train = data
        val, _ = load_data(cfg, task, cfg.finetune.eval_data, tokenizer, labels)
    else:
        train_idx, val_idx = split(len(data), cfg.val_fraction, cfg.seed)
        if not train_idx:
            raise GradtuneError(f"val_fraction={cfg.val_fraction} leaves no training rows out of {len(data)}")
        train, val = data.subset(train_idx), (data.subset(val_idx) if val_idx else None)
    for part in (train, val):
        if part is not None:
            part.pad_multiple = cfg.text.pad_to_multiple_of
    num_outputs = len(labels.names) if labels is not None else 1
    model, tokenizer, trainable = transformed(cfg, task, num_outputs)
    line = summary(model)
    from gradtune.distributed import is_main

    if is_main():
        print(f"method {cfg.method}: {line}", flush=True)
    info: dict[str, Any] = {"data": cfg.data, "task": task, "model": cfg.model, "method": cfg.method,
                            "parameters": line, "n_train": len(train), "n_val": len(val) if val is not None else 0}
    if labels is not None:
        info["classes"] = labels.names
    if getattr(data, "dropped", 0):
        info["dropped_no_response"] = data.dropped
    job_task = task if task in ENCODER_TASKS else "lm"
    job = Job(model, objective_for(task), train, val, job_task, info)
    if cfg.finetune.audit:
        job.after_first_step = _audit_hook(model, trainable)
    job.save_extra = lambda out_dir: save_extra(job.model, cfg, tokenizer, labels, out_dir)
    return job


def _audit_hook(model: nn.Module, trainable: frozenset[str]) -> Any:
    """Fingerprint now (the weights are untouched until the first step); check after it."""
    from gradtune.finetune import audit

    snapshot = audit.before(model, trainable)

    def check(m: nn.Module) -> None:
        try:
            audit.check(m, snapshot)
        except audit.AuditError as e:  # one line, like every other bad setting
            raise GradtuneError(str(e)) from None

    return check


def save_extra(model: nn.Module, cfg: Config, tokenizer: Any, labels: Any, out_dir: Path) -> None:
    """Beside model.safetensors: the tokenizer, the label map, and the exports asked for."""
    from gradtune.finetune import export

    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    if labels is not None:
        labels.save(out_dir / "labels.json")
    if cfg.finetune.export in ("adapter", "both"):
        export.save_adapter(model, out_dir / "adapter", str(Path(cfg.model).resolve()))
    if cfg.finetune.export in ("merged", "both"):
        export.save_merged(model, out_dir / "merged", tokenizer)


def is_run(folder: Path) -> bool:
    """Is ``folder`` a finished fine-tuning run (what ``load_run`` reads)?"""
    return (folder / "config.yaml").is_file() and (folder / "tokenizer").is_dir()


def load_run(folder: Path) -> tuple[nn.Module, Any, Config, Any, str]:
    """(model with the trained weights, eval mode; tokenizer; config; LabelMap or None; task).

    The architecture comes from the base folder (``cfg.model``, which must still be there), the
    method is re-applied, then every saved weight is loaded over it.
    """
    from gradtune.config import load_config
    from gradtune.data.text_tasks import LabelMap
    from gradtune.weights import load_weights

    if not is_run(folder):
        raise GradtuneError(f"{folder}: not a gradtune fine-tuning run (no config.yaml and tokenizer/)")
    cfg = load_config(str(folder / "config.yaml"))
    task = resolve_task(cfg)
    labels = LabelMap.load(folder / "labels.json") if (folder / "labels.json").is_file() else None
    model, _, _ = transformed(cfg, task, len(labels.names) if labels is not None else 1)
    load_weights(model, folder / "model.safetensors")
    from transformers import AutoTokenizer  # lazy: heavy import

    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    tokenizer.padding_side = "right"  # as training encoded
    return model.eval(), tokenizer, cfg, labels, task
