"""Typed, strict run configuration: YAML file + ``key=value`` overrides -> a validated ``Config``.

Why strict: a typo such as ``learning_rate: 0.1`` silently ignored is the most expensive bug in
training; here it is an error with a suggestion. Every field's comment says what it trades.
Nested sections (``guard.policy=skip``) are dataclasses; the schema is the dataclass itself, so
there is one source of truth for names, types, defaults and docs.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from gradtune.errors import GradtuneError


@dataclass
class GuardConfig:
    """Divergence guard: what to do with a non-finite or spiking loss."""

    enabled: bool = True  # off: a NaN loss stops the run at once instead of being handled
    policy: Literal["skip", "rollback", "stop"] = "skip"  # skip: drop the step; rollback: reload last good checkpoint
    spike_zscore: float = 0.0  # robust z-score over the window that counts as a spike; 0: off (per-sample SGD losses are heavy-tailed)
    spike_window: int = 50  # steps in the running window; larger: steadier baseline, slower to adapt
    lr_factor: float = 0.5  # rollback multiplies lr by this
    max_rollbacks: int = 3  # after this many rollbacks the run stops and suggests a learning rate
    check_grad: bool = True  # also catch a non-finite gradient under a finite loss; costs one norm per step


@dataclass
class GPTSection:
    """Shape of a GPT/Llama model trained from scratch (model=gpt); names as in models/gpt.py."""

    family: Literal["gpt2", "llama"] = "gpt2"  # gpt2: learned positions, LayerNorm, GELU; llama: RoPE, RMSNorm, SwiGLU
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None  # llama grouped-query attention; None = n_head
    n_embd: int = 256
    block_size: int = 256  # context length in tokens
    dropout: float = 0.0
    tie_embeddings: bool = True  # lm_head shares the token embedding
    checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower


@dataclass
class TextSection:
    """Text data for language models."""

    tokenizer: str = "byte"  # byte | char | path to a tokenizer.json
    max_length: int = 128  # fine-tuning: tokens per example after truncation
    text_column: str = "text"
    label_column: str = "label"
    columns: Optional[list[str]] = None  # names of a header-less CSV/TSV's columns, e.g. [label, text]; None: the first line is the header
    group_by_length: bool = True  # variable-length texts: batches of similar length (less padding, ~1.7x faster on SMS spam); false: plain shuffling
    pad_to_multiple_of: int = 8  # batch lengths rounded up to a multiple: few distinct shapes, so CPU memory does not fragment (and GPU tensor cores get aligned shapes)
    length_pool: int = 8  # group_by_length: sort within pools of this many batches, then shuffle the batches (larger: less padding, less random batches)


@dataclass
class LoraSection:
    rank: int = 8  # higher: more capacity and memory
    alpha: float = 16.0  # scale = alpha / rank
    dropout: float = 0.0
    targets: list[str] = field(default_factory=list)  # module-name patterns; empty = attention projections


@dataclass
class FreezeSection:
    patterns: list[str] = field(default_factory=list)  # method=freeze: parameter-name globs that train; everything else is frozen
    train_last_blocks: Optional[int] = None  # train only the last N blocks (+ head)
    embeddings: bool = True  # freeze the embeddings


@dataclass
class FinetuneSection:
    """Fine-tuning a pretrained model (model = a HF folder or .gguf file)."""

    pooling: Literal["mean", "cls"] = "mean"  # head input: mean over real tokens (sentence encoders) or the first token (BERT's CLS)
    head_dropout: float = 0.1  # dropout before the new head; higher regularises a small data set, slows fitting
    audit: bool = True  # after the first step check every trainable weight moved and every frozen one did not; costs a hash pass over the trainable weights
    checkpointing: bool = False  # recompute each layer's activations in backward: ~1 layer's activation memory instead of all, 30-60% more time per step; for long sequences or big models
    eval_data: Optional[str] = None  # a separate labelled file to validate on (labels must be seen in training); None: split val_fraction off data
    export: Literal["none", "adapter", "merged", "both"] = "none"  # also write out_dir/adapter (PEFT, LoRA only) and/or out_dir/merged (plain HF folder)


@dataclass
class Config:
    # --- what to fit -------------------------------------------------------------------------
    model: str = "linear"  # linear | logistic | mlp | gpt | path to a HF folder or .gguf
    data: str = "diabetes"  # embedded name (diabetes, breast_cancer, shakespeare) or a file path
    target: Optional[str] = None  # target column; None: the data set's default / last column
    features: Optional[list[str]] = None  # feature columns; None: every column but the target
    task: Literal["auto", "regression", "classification", "causal_lm", "instruction"] = "auto"  # auto: from the loss, else from the labels (pretrained: classification); causal_lm: plain text; instruction: prompt/response JSONL
    num_classes: Optional[int] = None  # classification with integer labels; None: inferred
    standardize: bool = True  # features to zero mean / unit variance (train statistics)
    standardize_target: bool = True  # regression target too: lr stops depending on units; loss reads as 1 - R^2
    val_fraction: float = 0.2  # held out for validation; 0: no validation
    hidden: list[int] = field(default_factory=lambda: [5])  # MLP hidden widths (classic 10-5-1)
    activation: Literal["relu", "tanh", "sigmoid", "gelu"] = "relu"  # MLP non-linearity
    init: str = "random"  # random (seeded) | path to a .safetensors weights file
    method: str = "full"  # fine-tuning: full | freeze | head | lora | bitfit (combine with '+')
    # --- objective ---------------------------------------------------------------------------
    loss: Literal["auto", "mse", "mse_half", "cross_entropy", "bce", "huber"] = "auto"  # auto: mse / cross_entropy; mse_half: the 1/(2m) convention
    label_smoothing: float = 0.0  # cross-entropy: spread this much target mass over all classes
    huber_delta: float = 1.0  # huber: quadratic within delta, linear beyond (robust to outliers)
    # --- gradient descent ----------------------------------------------------------------------
    optimizer: Literal["sgd", "adamw"] = "sgd"  # our own update rules (gradtune.optim)
    lr: float = 0.01  # step size; too large oscillates/diverges, too small crawls (see lr-find)
    momentum: float = 0.0  # SGD heavy-ball momentum; 0.9 typical
    nesterov: bool = False  # look-ahead momentum; needs momentum > 0, dampening 0
    dampening: float = 0.0  # SGD: scale of the new gradient in the momentum buffer is (1 - dampening)
    weight_decay: float = 0.0  # decoupled for AdamW, L2-in-gradient for SGD (as torch.optim)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW moment decay rates
    eps: float = 1e-8  # AdamW denominator floor
    batch_size: Union[int, Literal["full"]] = 32  # full: batch GD; 1: stochastic GD; k: mini-batch
    micro_batch_size: Optional[int] = None  # split each batch for memory; the gradient stays exact
    clip_grad_norm: Optional[float] = None  # clip the global gradient norm; None: off
    # --- schedule and stopping -------------------------------------------------------------------
    schedule: Literal["constant", "step", "exponential", "linear", "cosine"] = "constant"  # lr(step); decay lets SGD settle
    warmup_steps: int = 0  # linear lr warm-up steps before the schedule (large models)
    min_lr: float = 0.0  # floor for linear/cosine decay
    gamma: float = 0.1  # step/exponential decay factor
    step_size: int = 1000  # steps between step-schedule decays
    epochs: int = 100  # passes over the training set
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when smaller
    tol: float = 0.0  # stop when the loss improves by less than this (relative) ...
    patience: int = 5  # ... for this many evaluations in a row
    grad_tol: float = 0.0  # stop when the gradient norm falls under this
    eval_every: Optional[int] = None  # steps between evaluations; None: once per epoch
    # --- numerics and reproducibility ------------------------------------------------------------
    seed: int = 0  # initial weights, data order and split; same seed, same run
    dtype: Literal["float32", "float64"] = "float32"  # float64: exact checks, slower
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast for matmuls (large models)
    compile: bool = False  # torch.compile the model: faster steps after a warm-up
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # --- output -------------------------------------------------------------------------------
    out_dir: str = "runs/latest"  # weights, metrics.jsonl, plots, checkpoints
    log_every: int = 0  # steps between log lines; 0: per evaluation only
    progress: Literal["auto", "bar", "lines", "off"] = "auto"  # bar on a terminal, lines in CI/logs
    plot: bool = True  # loss-curve PNG at the end
    checkpoint_every: int = 0  # steps between checkpoints; 0: only the final weights
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: Literal["auto", "never", "force"] = "auto"  # auto: continue from the newest good checkpoint
    distributed: Literal["auto", "none", "ddp", "fsdp"] = "auto"  # under torchrun: ddp replicates, fsdp shards (fits larger models, more traffic); auto picks
    dist_timeout: float = 300.0  # seconds a collective waits for the other ranks; lower: a dead or hung rank fails the run sooner, too low: slow steps abort
    # --- sections ------------------------------------------------------------------------------
    guard: GuardConfig = field(default_factory=GuardConfig)
    gpt: GPTSection = field(default_factory=GPTSection)
    text: TextSection = field(default_factory=TextSection)
    lora: LoraSection = field(default_factory=LoraSection)
    freeze: FreezeSection = field(default_factory=FreezeSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)  # pretrained models: head pooling/dropout, audit, eval_data, export

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Stable hash of the resolved config (checkpoints record it)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 would read ``progress: off`` as False."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


# ---------------------------------------------------------------------------------------------
# Checks beyond the type: (predicate, what it must be). Unlisted numeric fields are free.
_RANGES: dict[str, tuple[Any, str]] = {
    "lr": (lambda v: v > 0, "> 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "dampening": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "eps": (lambda v: v > 0, "> 0"),
    "batch_size": (lambda v: v == "full" or v >= 1, ">= 1 or 'full'"),
    "micro_batch_size": (lambda v: v is None or v >= 1, ">= 1"),
    "epochs": (lambda v: v >= 1, ">= 1"),
    "max_steps": (lambda v: v is None or v >= 1, ">= 1"),
    "tol": (lambda v: v >= 0, ">= 0"),
    "grad_tol": (lambda v: v >= 0, ">= 0"),
    "patience": (lambda v: v >= 1, ">= 1"),
    "warmup_steps": (lambda v: v >= 0, ">= 0"),
    "val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "huber_delta": (lambda v: v > 0, "> 0"),
    "clip_grad_norm": (lambda v: v is None or v > 0, "> 0"),
    "gamma": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "step_size": (lambda v: v >= 1, ">= 1"),
    "min_lr": (lambda v: v >= 0, ">= 0"),
    "num_classes": (lambda v: v is None or v >= 2, ">= 2"),
    "eval_every": (lambda v: v is None or v >= 1, ">= 1"),
    "log_every": (lambda v: v >= 0, ">= 0"),
    "checkpoint_every": (lambda v: v >= 0, ">= 0"),
    "dist_timeout": (lambda v: v > 0, "> 0"),
    "keep_checkpoints": (lambda v: v >= 1, ">= 1"),
    "betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "hidden": (lambda v: all(h >= 1 for h in v), "positive widths"),
    "guard.lr_factor": (lambda v: 0 < v < 1, "in (0, 1)"),
    "guard.spike_window": (lambda v: v >= 5, ">= 5"),
    "guard.max_rollbacks": (lambda v: v >= 0, ">= 0"),
    "lora.rank": (lambda v: v >= 1, ">= 1"),
    "text.max_length": (lambda v: v >= 2, ">= 2"),
    "text.length_pool": (lambda v: v >= 1, ">= 1"),
    "text.pad_to_multiple_of": (lambda v: v >= 1, ">= 1"),
    "finetune.head_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise GradtuneError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except GradtuneError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and inner is not str:
            value = [value]  # hidden=5 means [5]
        if isinstance(value, str) and inner is str:
            value = [v for v in value.split(",") if v]
        if isinstance(value, list):
            return [_coerce(v, inner, key) for v in value]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-9 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise GradtuneError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _apply(obj: Any, values: dict[str, Any], prefix: str, source: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            known = [f"{prefix}{n}" for n in names]
            raise GradtuneError(f"{source}: unknown config key '{full}'{_suggest(full, known)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise GradtuneError(f"{source}: config key '{full}' is a section; give a mapping")
            _apply(current, value, f"{full}.", source)
            continue
        coerced = _coerce(value, hints[key], full)
        check = _RANGES.get(full)
        if check and not check[0](coerced):
            raise GradtuneError(f"config key '{full}' must be {check[1]}, got {value!r}")
        setattr(obj, key, coerced)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise GradtuneError(f"override '{item}' is not of the form key=value")
    key, raw = item.split("=", 1)
    try:
        value = _yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(key: str, value: Any) -> dict[str, Any]:
    parts = key.split(".")
    out: dict[str, Any] = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        out = {p: out}
    return out


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                base: Optional[dict[str, Any]] = None) -> Config:
    """Defaults <- the model family's defaults <- ``base`` <- YAML file <- ``key=value`` overrides,
    validated at each layer."""
    cfg = Config()
    file_values = _read_yaml(path) if path is not None else {}
    pairs = [_parse_override(item) for item in overrides or []]
    model = next((v for k, v in reversed(pairs) if k == "model"), file_values.get("model", cfg.model))
    family = MODEL_DEFAULTS.get("pretrained" if is_pretrained(str(model)) else str(model))
    if family:
        _apply(cfg, family, "", f"defaults for model={model}")
    if is_pretrained(str(model)):
        method = next((v for k, v in reversed(pairs) if k == "method"), file_values.get("method", cfg.method))
        cfg.lr = pretrained_lr(str(method))  # the file and the command line still override it
    if base:
        _apply(cfg, base, "", "defaults")
    if path is not None:
        _apply(cfg, file_values, "", str(path))
    for key, value in pairs:
        _apply(cfg, _nest(key, value), "", "command line")
    _check_combinations(cfg)
    return cfg


# A model family's own defaults, applied before the file and the command line. A language model
# trains on text with AdamW, warm-up + cosine and clipping (nanoGPT's recipe), not on diabetes.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt": {"data": "shakespeare", "val_fraction": 0.1, "optimizer": "adamw", "lr": 1e-3, "betas": [0.9, 0.99],
            "weight_decay": 0.1, "batch_size": 16, "schedule": "cosine", "warmup_steps": 100, "min_lr": 1e-4,
            "clip_grad_norm": 1.0, "epochs": 1, "eval_every": 250},
    # A pretrained model (HF folder / .gguf): AdamW, one epoch, short texts; lr per method below.
    "pretrained": {"optimizer": "adamw", "batch_size": 16, "epochs": 1, "val_fraction": 0.2,
                   "text": {"max_length": 64}, "clip_grad_norm": 1.0},
}

# Default lr per fine-tuning method: the fewer weights train, the larger the step they take. A
# pretrained body moved by more than ~1e-4 forgets what it knew; a fresh head needs ~1e-2.
_PRETRAINED_LR = {"full": 5e-5, "freeze": 1e-4, "bitfit": 1e-3, "lora": 5e-4, "head": 1e-2}


def is_pretrained(model: str) -> bool:
    """Is ``model`` a pretrained source (a path / HF folder / .gguf) rather than a family name?"""
    return "/" in model or model.endswith(".gguf") or Path(model).exists()


def pretrained_lr(method: str) -> float:
    """The default lr of a method; for a combination (head+lora) the smallest, so no part of the
    pretrained body takes a step too large for it."""
    return min((_PRETRAINED_LR.get(m, 5e-5) for m in method.split("+") if m), default=5e-5)


def _read_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise GradtuneError(f"config file not found: {path}")
    try:
        values = _yaml(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise GradtuneError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(values, dict):
        raise GradtuneError(f"{path}: expected a mapping of settings at the top level")
    return values


def _check_combinations(cfg: Config) -> None:
    """Fail fast on settings that are each valid but meaningless together."""
    if cfg.nesterov and (cfg.momentum <= 0 or cfg.dampening != 0):
        raise GradtuneError("config: nesterov=true needs momentum > 0 and dampening = 0")
    if cfg.optimizer == "adamw" and (cfg.momentum or cfg.nesterov):
        raise GradtuneError("config: momentum/nesterov are SGD settings; AdamW uses betas")
    mb, b = cfg.micro_batch_size, cfg.batch_size
    if mb is not None and b != "full" and mb > b:
        raise GradtuneError(f"config: micro_batch_size ({mb}) must not exceed batch_size ({b})")


def field_docs() -> list[tuple[str, str, str]]:
    """(key, default, comment) for every top-level setting; the README table is made from this."""
    import inspect

    src = inspect.getsource(Config).splitlines()
    docs = []
    for f in dataclasses.fields(Config):
        line = next((s for s in src if s.strip().startswith(f"{f.name}:")), "")
        comment = line.split("#", 1)[1].strip() if "#" in line else ""
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        docs.append((f.name, repr(default), comment))
    return docs


def markdown_table() -> str:
    """The README's settings table, made from the dataclass (the single source)."""
    sections = {f.name for f in dataclasses.fields(Config)
                if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory())}
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, comment in field_docs():
        if key not in sections:
            rows.append(f"| `{key}` | `{default}` | {comment.replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
