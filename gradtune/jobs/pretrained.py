"""Fine-tuning a pretrained model (HF folder or .gguf) as a Job of the one loop.

    BUILDERS["pretrained"] = build_pretrained   (see registry.py)

Order matters for the "nothing written before the input is validated" promise: the task, the
data and the model are all loaded and checked here, before the loop opens out_dir. The only
write it schedules is ``save_extra`` (tokenizer, labels, exports), which ``outputs`` calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from gradtune.config import Config
from gradtune.config.defaults import pretrained_lr
from gradtune.data.causal_text import load_causal_text
from gradtune.data.instructions import load_instructions
from gradtune.data.packing import pack
from gradtune.data.split import split_indices
from gradtune.data.text_tasks import LabelMap, load_text_task
from gradtune.finetune import audit, export, methods
from gradtune.finetune.summary import summary
from gradtune.jobs import preference, rl
from gradtune.jobs.job import Job, eval_chunk
from gradtune.models import hf
from gradtune.models.bert import load_bert
from gradtune.objectives.causal_lm import CausalLM
from gradtune.objectives.class_metrics import class_weights
from gradtune.objectives.classification import Classification
from gradtune.objectives.output import Objective
from gradtune.objectives.regression import Regression
from gradtune.runtime import distributed
from gradtune.runtime.errors import GradtuneError

ENCODER_TASKS = ("classification", "regression")


def resolve_task(cfg: Config) -> str:
    """auto: plain text (.txt) is causal-LM data, anything else labelled rows (classification)."""
    if cfg.task != "auto":
        return cfg.task
    return "causal_lm" if cfg.data.endswith(".txt") else "classification"


def job_task(task: str) -> str:
    """The Job's task (which metrics) for a fine-tuning task: causal_lm and instruction are 'lm'."""
    return task if task in ENCODER_TASKS or task == "rl" else "lm"


def load_data(
    cfg: Config, task: str, path: str, tokenizer: Any, label_map: Optional[LabelMap] = None, labelled: bool = True
) -> tuple[Any, Optional[LabelMap]]:
    """(SequenceDataset, LabelMap or None) of ``path`` for ``task``; batch lengths rounded up to
    ``text.pad_to_multiple_of``. ``labelled=False`` (classification / regression): texts only,
    to predict."""
    t = cfg.text
    labels = None
    if task in ENCODER_TASKS:
        data, labels = load_text_task(
            path, tokenizer, task, t.text_column, t.label_column, t.columns, t.max_length, label_map, labelled
        )
    elif task == "instruction":
        data = load_instructions(path, tokenizer, t.max_length, t.format, t.fields)
    else:
        data = load_causal_text(path, tokenizer, t.max_length, t.text_column, documents=t.packing)
    data.pad_multiple = t.pad_to_multiple_of
    return data, labels


def objective_for(task: str, weights: Optional[list[float]] = None) -> Objective:
    """``weights``: class weights (C,) (``info["class_weights"]``), classification only."""
    if task == "classification":
        return Classification(weight=weights)
    if task == "regression":
        return Regression("mse")
    return CausalLM(shift=True, token_accuracy=True)  # labels aligned with input_ids (HF convention)


def transformed(
    cfg: Config, task: str, num_outputs: Optional[int], inference_only: bool = False
) -> tuple[nn.Module, Any, frozenset[str]]:
    """(model after the method's transforms, tokenizer, declared trainable names).
    ``inference_only``: the model will only compute (a run reloaded for eval / predict), so a
    BERT-family encoder may be gradtune's own module (models/bert.py); the tokenizer is then None
    (the run's saved one is what encodes)."""
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    own = inference_only and task in ENCODER_TASKS and cfg.quantize == "none"
    body, tokenizer = (load_bert(cfg.model, dtype) if own else None), None
    if body is None:
        body, tokenizer = hf.load(cfg.model, "encoder" if task in ENCODER_TASKS else "causal_lm", dtype)
    if activation_checkpointing(cfg) and getattr(body, "supports_gradient_checkpointing", False):
        # Non-reentrant: correct with frozen embeddings (inputs that do not require grad), the
        # trap the audit catches with the reentrant variant. Dropout masks are replayed exactly.
        if task in ENCODER_TASKS and getattr(body.config, "use_cache", None):
            body.config.use_cache = False  # an encoder never generates (silences a warning)
        body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(cfg.seed)  # the head's and LoRA's random init are part of the seeded run
    model, trainable = methods.apply(
        body,
        cfg.method,
        num_outputs if task in ENCODER_TASKS else None,
        lora=cfg.lora,
        freeze=cfg.freeze,
        finetune=cfg.finetune,
        quantize=cfg.quantize,
        source=cfg.model,
    )
    if cfg.quantize != "none":
        hf.own_weights(model)  # drop the file mapping that the float layers quantisation replaced lived in
    return model, tokenizer, trainable


def head_groups(cfg: Config, model: nn.Module) -> Optional[list[dict[str, Any]]]:
    """Two optimizer groups when a new head trains beside the body: [body, head at head_lr].
    Why: the body's lr (full: 5e-5) is sized not to wreck pretrained weights; a randomly
    initialised head at that lr barely moves in a short run (pooled encoder features are small),
    and the body then adapts to a near-random head. Default: the lr a head trained alone gets
    (``pretrained_lr('head')``), never below ``lr``. None: one group (head only, or no head)."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or methods.body_method(cfg.method) == "head":
        return None
    lr = cfg.finetune.head_lr if cfg.finetune.head_lr is not None else max(float(cfg.lr), pretrained_lr("head"))
    ids = {id(p) for p in head.parameters()}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": body}, {"params": [p for p in head.parameters() if p.requires_grad], "lr": lr}]


def activation_checkpointing(cfg: Config) -> bool:
    """Recompute activations in backward, when asked for (off by default: the README's
    fine-tuning section gives the time and memory it trades). ``head`` never backpropagates
    through the body, so there is nothing to recompute."""
    return methods.body_method(cfg.method) != "head" and cfg.finetune.activation_checkpointing


def _train_val(cfg: Config, task: str, tokenizer: Any) -> tuple[Any, Any, Optional[LabelMap]]:
    if task == "preference":  # pairs (jobs/preference.py)
        preference.check(cfg)
        return (*preference.train_val(cfg, tokenizer), None)
    if task == "rl":  # prompts (jobs/rl.py)
        return (*rl.train_val(cfg, tokenizer), None)
    data, labels = load_data(cfg, task, cfg.data, tokenizer)
    if cfg.finetune.eval_data:  # a separate test file: train on all of data
        val, _ = load_data(cfg, task, cfg.finetune.eval_data, tokenizer, labels)
        return data, val, labels
    train_idx, val_idx = split_indices(len(data), cfg.val_fraction, cfg.seed, ordered=True)
    val = data.subset(val_idx.tolist()) if len(val_idx) else None
    return data.subset(train_idx.tolist()), val, labels


def packed(cfg: Config, task: str, train: Any, val: Any) -> tuple[Any, Any, dict[str, Any]]:
    """text.packing: (train, val) documents packed into max_length windows (data/packing.py;
    the val loss keeps its terms, so it compares with unpacked runs), and what to log about it."""
    if not cfg.text.packing or task not in ("causal_lm", "instruction"):
        if cfg.text.packing and task in ENCODER_TASKS:
            raise GradtuneError(f"config: text.packing is for causal_lm and instruction data, not task '{task}'")
        return train, val, {}
    n_docs = len(train)
    train = pack(train, cfg.text.max_length, cfg.seed)
    val = pack(val, cfg.text.max_length, cfg.seed) if val is not None else None
    if distributed.is_main():
        print(
            f"packing: {n_docs} documents into {len(train)} windows of {cfg.text.max_length} tokens, "
            f"{train.efficiency:.1%} real tokens",
            flush=True,
        )
    return train, val, {"n_documents": n_docs, "packing_efficiency": round(train.efficiency, 4)}


def build_pretrained(cfg: Config) -> Job:
    """BUILDERS["pretrained"]: fine-tune the model at ``cfg.model`` on ``cfg.data``."""
    task = resolve_task(cfg)
    if "head" in cfg.method.split("+") and task not in ENCODER_TASKS:
        raise GradtuneError(f"config: method 'head' adds a classification/regression head; task '{task}' has none")
    if cfg.loss != "auto" or cfg.label_smoothing:
        raise GradtuneError(
            "config: fine-tuning objectives fix the loss (cross-entropy for classes and "
            "tokens, mse for regression); leave loss=auto and label_smoothing=0"
        )
    funcs = rl.check(cfg) if task == "rl" else []  # reward functions imported before any data is read
    train, val, labels = _train_val(cfg, task, hf.load_tokenizer(cfg.model))
    if funcs:
        rl.probe(funcs, train)
    train, val, packing = packed(cfg, task, train, val)
    model, tokenizer, trainable = transformed(cfg, task, len(labels.names) if labels is not None else 1)
    line = summary(model)
    if distributed.is_main():
        print(f"method {cfg.method}: {line}", flush=True)
    info: dict[str, Any] = {
        "data": cfg.data,
        "task": task,
        "model": cfg.model,
        "method": cfg.method,
        "parameters": line,
        "n_train": len(train),
        "n_val": len(val) if val is not None else 0,
    }
    info.update(packing)
    if labels is not None:
        info["classes"] = labels.names
    if cfg.class_weight is not None:
        if task != "classification":
            raise GradtuneError(f"config: class_weight applies to task classification, not '{task}'")
        info["class_weights"] = class_weights(cfg.class_weight, train.labels, labels.names, len(labels.names)).tolist()
    if getattr(train, "dropped", 0):
        info["dropped_no_response"] = train.dropped
    if task == "preference":  # the reference: LoRA disabled, or precomputed now from the untouched model
        job = Job(model, preference.objective(cfg, model, train, val), train, val, "preference", info)
    elif task == "rl":  # the objective samples and scores; its step clock rides the loop's callbacks
        job = Job(model, rl.objective(cfg, model, tokenizer, funcs, train, val), train, val, "rl", info)
        job.callbacks.append(rl.StepClock(job.objective))
    else:
        job = Job(model, objective_for(task, info.get("class_weights")), train, val, job_task(task), info)
    job.param_groups = head_groups(cfg, model)
    job.eval_chunk = eval_chunk(cfg, cheap_rows=False)
    # RL: a first step whose groups each got equal rewards has an exactly zero gradient (and KL 0
    # at the base): no audit evidence either way.
    if cfg.finetune.audit and task != "rl":
        job.after_first_step = _audit_hook(model, trainable)
        job.at_start = job.after_first_step.rearm  # type: ignore[attr-defined]
    job.save_extra = lambda out_dir: save_extra(job.model, cfg, tokenizer, labels, out_dir)
    return job


def _audit_hook(model: nn.Module, trainable: frozenset[str]) -> Any:
    """Fingerprint now, and again at ``rearm`` when the loop starts (under torchrun DDP's
    start-up broadcast has by then written every weight in place, same values, new versions);
    check after the first step."""
    snapshot = [audit.before(model, trainable)]

    def check(m: nn.Module) -> None:
        try:
            audit.check(m, snapshot[0])
        except audit.AuditError as e:  # one line, like every other bad setting
            raise GradtuneError(str(e)) from None

    def rearm(m: nn.Module) -> None:
        snapshot[0] = audit.before(m, trainable)

    check.rearm = rearm  # type: ignore[attr-defined]
    return check


def save_extra(model: nn.Module, cfg: Config, tokenizer: Any, labels: Optional[LabelMap], out_dir: Path) -> None:
    """Beside model.safetensors: the tokenizer, the label map, and the exports asked for."""
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    if labels is not None:
        labels.save(out_dir / "labels.json")
    if cfg.finetune.export in ("adapter", "both"):
        export.save_adapter(model, out_dir / "adapter", str(Path(cfg.model).resolve()))
    if cfg.finetune.export in ("merged", "both"):
        export.save_merged(model, out_dir / "merged", tokenizer)
