"""Checks beyond the type: value ranges per key, and settings that are valid alone but not
together. ``loading`` applies them to every value as it is set, and once more to the whole."""

from __future__ import annotations

from typing import Any

from gradtune.config.defaults import is_pretrained
from gradtune.config.durations import parse_duration
from gradtune.config.schema import METHODS, Config
from gradtune.runtime.errors import GradtuneError

# text.fields: the standard names a file's keys can be mapped to (data/chat_formats.py reads them).
FIELD_NAMES = (
    "prompt", "response", "system", "instruction", "input", "output", "conversations", "messages",
    "chosen", "rejected", "role", "content", "from", "value",
)  # fmt: skip

# Checks beyond the type: (predicate, what it must be). Unlisted numeric fields are free.
RANGES: dict[str, tuple[Any, str]] = {
    "lr": (lambda v: v == "auto" or v > 0, "> 0 or 'auto'"),
    "momentum": (lambda v: v == "auto" or 0 <= v < 1, "in [0, 1) or 'auto'"),
    "dampening": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "eps": (lambda v: v > 0, "> 0"),
    "muon_lr": (lambda v: v > 0, "> 0"),
    "muon_momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "ns_steps": (lambda v: 1 <= v <= 99, "in [1, 99]"),
    "batch_size": (lambda v: v == "full" or v >= 1, ">= 1 or 'full'"),
    "micro_batch_size": (lambda v: v is None or v >= 1, ">= 1"),
    "batch_ramp_steps": (lambda v: v >= 0, ">= 0"),
    "batch_ramp_start": (lambda v: v >= 1, ">= 1"),
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
    "decay_steps": (lambda v: v is None or v >= 1, ">= 1"),
    "decay_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "plateau_patience": (lambda v: v >= 0, ">= 0"),
    "plateau_threshold": (lambda v: v >= 0, ">= 0"),
    "plateau_cooldown": (lambda v: v >= 0, ">= 0"),
    "early_stopping.patience": (lambda v: v >= 1, ">= 1"),
    "early_stopping.min_delta": (lambda v: v >= 0, ">= 0"),
    "callbacks": (
        lambda v: all(
            set(c) <= {"class", "args"}
            and isinstance(c.get("class"), str)
            and ":" in c["class"]
            and isinstance(c.get("args", {}), dict)
            for c in v
        ),
        "a list of {class: 'package.module:Class', args: {...}}",
    ),
    "lora.rank": (lambda v: v >= 1, ">= 1"),
    "lora.alpha": (lambda v: v > 0, "> 0"),
    "lora.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "gpt.n_layer": (lambda v: v >= 1, ">= 1"),
    "gpt.n_head": (lambda v: v >= 1, ">= 1"),
    "gpt.n_kv_head": (lambda v: v is None or v >= 1, ">= 1"),
    "gpt.n_embd": (lambda v: v >= 1, ">= 1"),
    "gpt.block_size": (lambda v: v >= 2, ">= 2"),
    "gpt.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "gpt.logit_softcap": (lambda v: v is None or v > 0, "> 0 (or null: off)"),
    "guard.spike_zscore": (lambda v: v >= 0, ">= 0"),
    "text.max_length": (lambda v: v >= 2, ">= 2"),
    "text.fields": (
        lambda v: all(k in FIELD_NAMES and isinstance(x, str) and x for k, x in v.items()),
        f"a mapping of field -> your key, fields: {', '.join(FIELD_NAMES)}",
    ),
    "text.length_pool": (lambda v: v >= 1, ">= 1"),
    "text.pad_to_multiple_of": (lambda v: v >= 1, ">= 1"),
    "text.vocab_size": (lambda v: 300 <= v <= 1 << 20, "in [300, 1048576]"),
    "text.workers": (lambda v: v >= 0, ">= 0 (0: one per core)"),
    "finetune.head_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "finetune.min_steps": (lambda v: v >= 0, ">= 0 (0: off)"),
    "finetune.head_lr": (lambda v: v is None or v > 0, "> 0 (or null: a multiple of lr)"),
    "eval_tokens": (lambda v: v is None or v >= 1, ">= 1"),
    "dpo.beta": (lambda v: v > 0, "> 0"),
    "dpo.label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "dpo.simpo_gamma": (lambda v: v >= 0, ">= 0"),
    "dpo.desirable_weight": (lambda v: v > 0, "> 0"),
    "dpo.undesirable_weight": (lambda v: v > 0, "> 0"),
    "rl.rewards": (
        lambda v: (
            bool(v)
            and all(
                isinstance(s, dict)
                and isinstance(s.get("fn"), str)
                and set(s) <= {"fn", "weight", "args"}
                and isinstance(s.get("weight", 1.0), (int, float))
                and isinstance(s.get("args", {}), dict)
                for s in v
            )
        ),
        "a non-empty list of {fn: 'package.module:func' or a built-in, weight: number, args: {...}}",
    ),
    "rl.num_generations": (lambda v: v >= 2, ">= 2 (the advantages compare completions of one prompt)"),
    "rl.max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "rl.temperature": (lambda v: v > 0, "> 0"),
    "rl.top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "rl.beta": (lambda v: v >= 0, ">= 0"),
    "rl.epsilon": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "rl.epsilon_high": (lambda v: v is None or v >= 0, ">= 0"),
}


def check_auto(cfg: Config) -> None:
    """``lr``/``momentum`` auto: the step from the loss curvature (jobs/curvature.py) exists for
    the convex models under plain gradient descent only; anything else is refused here, at load."""
    if cfg.lr != "auto" and cfg.momentum != "auto":
        return
    which = "lr: auto" if cfg.lr == "auto" else "momentum: auto"
    if cfg.model not in ("linear", "logistic"):
        what = "a pretrained model" if is_pretrained(cfg.model) else f"model={cfg.model}"
        raise GradtuneError(
            f"config: {which} is defined for the convex models (linear with mse, logistic); "
            f"{what} has no known curvature: give a number (gradtune lr-find suggests one)"
        )
    if cfg.optimizer != "sgd":
        raise GradtuneError(
            f"config: {which} is the gradient-descent step from the curvature; "
            f"optimizer={cfg.optimizer} rescales steps: use optimizer=sgd or a number"
        )
    if cfg.momentum == "auto" and cfg.lr != "auto":
        raise GradtuneError("config: momentum: auto is Nesterov's momentum for the step 1/L: set lr: auto with it")
    if cfg.momentum == "auto" and cfg.dampening != 0:
        raise GradtuneError("config: momentum: auto is Nesterov's momentum: it needs dampening = 0")


def check_data(cfg: Config) -> None:
    """``data`` as a list: files (one corpus) or a mixture of ``{path, weight}`` sources, for
    model=gpt; a mixture's weights are > 0 and its entries name nothing else."""
    if isinstance(cfg.data, str):
        return
    if cfg.model != "gpt":
        raise GradtuneError(f"config key 'data': a list of sources is for model=gpt (pretraining); model={cfg.model}")
    if not cfg.data:
        raise GradtuneError("config key 'data': an empty list")
    mixture = [d for d in cfg.data if isinstance(d, dict)]
    if mixture and len(mixture) != len(cfg.data):
        raise GradtuneError("config key 'data': a mixture lists {path, weight} entries only (not bare paths)")
    for i, d in enumerate(mixture):
        extra = sorted(set(d) - {"path", "weight"})
        if extra or not isinstance(d.get("path"), (str, list)):
            what = f"unknown key '{extra[0]}'" if extra else "no path"
            raise GradtuneError(f"config key 'data[{i}]': {what} (a mixture entry is {{path: ..., weight: ...}})")
        w = d.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or w != w or w == float("inf"):
            raise GradtuneError(f"config key 'data[{i}].weight': must be a finite number > 0, got {w!r} ({d['path']})")


MUON_KEYS = ("muon_lr", "muon_momentum", "muon_nesterov", "ns_steps", "muon_adjust_lr")


def check_muon(cfg: Config) -> None:
    """optimizer=muon takes its own momentum keys; a muon_* key under another optimizer does nothing, so it is refused;
    FSDP shards the matrices Muon orthogonalises whole."""
    if cfg.optimizer == "muon":
        if cfg.momentum or cfg.nesterov:
            raise GradtuneError(
                "config: momentum/nesterov are SGD settings; optimizer=muon uses muon_momentum/muon_nesterov"
            )
        if cfg.distributed == "fsdp":
            raise GradtuneError(
                "config: optimizer=muon orthogonalises whole matrices and FSDP shards them: use distributed=ddp"
            )
        return
    defaults = Config()
    for key in MUON_KEYS:
        if getattr(cfg, key) != getattr(defaults, key):
            raise GradtuneError(f"config: {key} is an optimizer=muon setting (optimizer={cfg.optimizer})")


def check_combinations(cfg: Config) -> None:
    """Fail fast on settings that are each valid but meaningless together."""
    check_auto(cfg)
    check_data(cfg)
    if cfg.nesterov and cfg.momentum != "auto" and (cfg.momentum <= 0 or cfg.dampening != 0):
        raise GradtuneError("config: nesterov=true needs momentum > 0 and dampening = 0")
    if cfg.optimizer == "adamw" and (cfg.momentum or cfg.nesterov):
        raise GradtuneError("config: momentum/nesterov are SGD settings; AdamW uses betas")
    check_muon(cfg)
    watches = cfg.early_stopping.enabled or cfg.schedule == "plateau"
    if (
        watches
        and cfg.early_stopping.monitor.startswith("val_")
        and cfg.val_fraction == 0
        and not cfg.finetune.eval_data
    ):
        raise GradtuneError(
            f"config: early_stopping / schedule=plateau watch '{cfg.early_stopping.monitor}', "
            f"but val_fraction=0 leaves no validation data"
        )
    g = cfg.gpt
    if g.n_embd % g.n_head:
        raise GradtuneError(f"config: gpt.n_embd ({g.n_embd}) must be divisible by gpt.n_head ({g.n_head})")
    if g.n_kv_head is not None and g.n_head % g.n_kv_head:
        raise GradtuneError(f"config: gpt.n_head ({g.n_head}) must be a multiple of gpt.n_kv_head ({g.n_kv_head})")
    if g.family == "gpt2" and g.n_kv_head not in (None, g.n_head):
        raise GradtuneError("config: gpt.n_kv_head (grouped-query attention) needs gpt.family=llama")
    mb, b = cfg.micro_batch_size, cfg.batch_size
    if mb is not None and b != "full" and mb > b:
        raise GradtuneError(f"config: micro_batch_size ({mb}) must not exceed batch_size ({b})")
    check_batch_ramp(cfg)
    if cfg.max_time is not None:
        parse_duration(cfg.max_time)
    if cfg.text.packing and not is_pretrained(cfg.model):
        # Our GPT trains on one continuous token stream: there are no documents to keep apart.
        raise GradtuneError(
            f"config: text.packing packs the documents of a pretrained model's causal_lm / "
            f"instruction data; model={cfg.model} trains on one continuous stream (nothing to pack)"
        )
    check_quantize(cfg)


def check_batch_ramp(cfg: Config) -> None:
    """``batch_ramp_steps``: a ramp needs a batch to grow to, from a smaller start."""
    steps, start, b = cfg.batch_ramp_steps, cfg.batch_ramp_start, cfg.batch_size
    if not steps:
        if start != Config.batch_ramp_start:
            raise GradtuneError("config: batch_ramp_start is a batch_ramp_steps setting (batch_ramp_steps=0: no ramp)")
        return
    if b == "full":
        raise GradtuneError(
            "config: batch_ramp_steps ramps a mini-batch; batch_size=full (batch GD) takes every sample each step"
        )
    if start >= b:
        raise GradtuneError(f"config: batch_ramp_start ({start}) must be below batch_size ({b}) to ramp up to it")
    if isinstance(cfg.data, list) and any(isinstance(d, dict) for d in cfg.data):
        raise GradtuneError(
            "config: batch_ramp_steps: a data mixture draws fixed-size batches by weight; "
            "train on one corpus or set batch_ramp_steps=0"
        )


def check_quantize(cfg: Config) -> None:
    """``quantize``: only a frozen base can be held quantised; the weights that train stay float32."""
    if cfg.quantize == "none":
        return
    body = {m.strip() for m in cfg.method.split("+")} - {"head"}
    if not is_pretrained(cfg.model):
        raise GradtuneError(f"config: quantize={cfg.quantize} quantises a pretrained base; model={cfg.model} has none")
    if body - {"lora"}:
        raise GradtuneError(
            f"config: quantize={cfg.quantize} holds the frozen base quantised: use method lora, head "
            f"or head+lora (method '{cfg.method}' trains base weights)"
        )


def check_method(cfg: Config) -> None:
    """``method``: one body method, optionally with 'head' ('head+lora'); freeze settings only
    with 'freeze'. Validated here once; the transforms take the sections as they are."""
    parts = [m.strip() for m in cfg.method.split("+") if m.strip()]
    unknown = [m for m in parts if m not in METHODS]
    if unknown or not parts:
        raise GradtuneError(
            f"config: method '{cfg.method}': choose from {', '.join(METHODS)} (combine with '+', e.g. head+lora)"
        )
    body = [m for m in parts if m != "head"]
    if len(body) > 1:
        # The transforms each decide requires_grad for the whole body: a second would overrule the first.
        raise GradtuneError(
            f"config: method '{cfg.method}' combines {' and '.join(body)}; "
            f"combine 'head' with at most one of full, freeze, lora, bitfit"
        )
    f = cfg.freeze
    if "freeze" not in body and (f.patterns or f.train_last_blocks is not None):
        raise GradtuneError(
            f"config: freeze.patterns / freeze.train_last_blocks apply to method 'freeze', not '{cfg.method}'"
        )
    if cfg.finetune.export in ("adapter", "both") and "lora" not in body:
        raise GradtuneError(
            f"config: finetune.export={cfg.finetune.export} writes a LoRA adapter; method '{cfg.method}' has no LoRA"
        )
