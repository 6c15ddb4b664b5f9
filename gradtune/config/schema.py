"""The run configuration's schema: typed dataclasses, one field per setting, with its default.

The schema is the dataclass itself, so there is one source of truth for names, types, defaults
and docs (the README's settings table is generated from these comments, see ``table.py``).
Each section is the exact shape the code that uses it receives: ``cfg.lora`` goes to
``finetune.lora.apply_lora``, ``cfg.freeze`` to ``finetune.freeze.freeze`` - no renaming.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

# Fine-tuning methods: what in a pretrained body trains ('head' adds the task's head; combine
# one body method with it as 'head+lora').
METHODS: tuple[str, ...] = ("full", "freeze", "head", "lora", "bitfit")


@dataclass
class GuardConfig:
    """Divergence guard: what to do with a non-finite or spiking loss."""

    enabled: bool = True  # off: a NaN loss stops the run at once instead of being handled
    policy: Literal["skip", "rollback", "stop"] = "skip"  # skip: drop the step; rollback: reload last good checkpoint
    # robust z-score over the window that counts as a spike; 0: off (per-sample SGD losses are heavy-tailed)
    spike_zscore: float = 0.0
    spike_window: int = 50  # steps in the running window; larger: steadier baseline, slower to adapt
    lr_factor: float = 0.5  # rollback multiplies lr by this
    max_rollbacks: int = 3  # after this many rollbacks the run stops and suggests a learning rate
    check_grad: bool = True  # also catch a non-finite gradient under a finite loss; costs one norm per step


@dataclass
class GPTSection:
    """Shape of a GPT/Llama model trained from scratch (model=gpt); names as in models/gpt.py."""

    family: Literal["gpt2", "llama"] = "gpt2"  # gpt2: learned positions, LayerNorm, GELU; llama: RoPE, RMSNorm, SwiGLU
    n_layer: int = 4  # transformer blocks; depth costs time per step linearly
    n_head: int = 4  # attention heads; head size = n_embd / n_head
    n_kv_head: Optional[int] = None  # llama grouped-query attention; None = n_head
    n_embd: int = 256  # width; parameters grow with its square
    block_size: int = 256  # context length in tokens
    dropout: float = 0.0  # residual and attention dropout; for data seen many times over, 0 for one or two passes
    tie_embeddings: bool = True  # lm_head shares the token embedding
    # recompute each block's activations in backward: less memory for one more forward pass per step
    activation_checkpointing: bool = False
    # MLP form; None: the family's (gelu for gpt2, swiglu for llama); relu2: relu(x)^2 in a 4x MLP (the speedrun's)
    mlp: Optional[Literal["gelu", "swiglu", "relu2"]] = None
    # RMSNorm on each head's q and k before rotary/attention: bounded attention logits; null: the family's
    # (on for llama, Qwen3's block, which export writes; off for gpt2, which no export format has with it)
    qk_norm: Optional[bool] = None
    # c: logits = c * tanh(logits / c), in the loss and in generation (|logits| < c); null: off
    logit_softcap: Optional[float] = None
    zero_init_proj: bool = False  # attention and MLP output projections start at zero: each block starts as identity


@dataclass
class TextSection:
    """Text data for language models."""

    # byte | char | path to a tokenizer.json | train (a byte-level BPE of text.vocab_size trained on the data, cached)
    tokenizer: str = "byte"
    vocab_size: int = 4096  # text.tokenizer=train: BPE vocabulary (larger: shorter sequences, bigger embedding)
    field: str = "text"  # pretraining on .jsonl / Parquet / Arrow: the field holding each document's text
    # processes tokenising a corpus's shards in parallel; 0: one per core (memory: one shard's pieces each)
    workers: int = 0
    max_length: int = 128  # fine-tuning: tokens per example after truncation
    text_column: str = "text"  # the column (CSV/TSV header or JSONL key) holding the text
    label_column: str = "label"  # the column holding the label (classification / regression)
    # names of a header-less CSV/TSV's columns, e.g. [label, text]; None: the first line is the header
    columns: Optional[list[str]] = None
    # variable-length texts: batches of similar length (less padding, so less compute, for less random batches); false:
    # plain shuffling
    group_by_length: bool = True
    # batch lengths rounded up to a multiple: few distinct shapes, so CPU memory does not fragment (and GPU tensor cores
    # get aligned shapes)
    pad_to_multiple_of: int = 8
    # group_by_length: sort within pools of this many batches, then shuffle the batches (larger: less padding, less
    # random batches)
    length_pool: int = 8
    # instruction / preference rows: auto detects the shape (one line says which); prompt_response: prompt and response
    # (preference: prompt, chosen, rejected); alpaca: instruction, input, output; sharegpt: conversations of
    # {from, value}; messages: a list of {role, content}
    format: Literal["auto", "prompt_response", "alpaca", "sharegpt", "messages"] = "auto"
    # your file's key for each standard field, e.g. {prompt: question, response: answer}; fields: prompt, response,
    # system, instruction, input, output, conversations, messages, chosen, rejected, role, content, from, value
    fields: dict = dataclasses.field(default_factory=dict)  # (`field` is the setting above here)
    # causal_lm / instruction: concatenate documents into max_length windows, no attention across documents (no padding
    # compute, less random batches)
    packing: bool = False


@dataclass
class LoraSection:
    """LoRA (method=lora): a trainable low-rank update B A beside each frozen target weight."""

    rank: int = 8  # higher: more capacity and memory
    alpha: float = 16.0  # scale = alpha / rank
    dropout: float = 0.0  # dropout on the LoRA branch's input; regularises small data sets
    targets: list[str] = field(default_factory=list)  # module-name patterns; empty = attention projections


@dataclass
class FreezeSection:
    """method=freeze: which parameters of the pretrained body train."""

    # method=freeze: parameter-name globs that train; everything else is frozen
    patterns: list[str] = field(default_factory=list)
    train_last_blocks: Optional[int] = None  # train only the last N blocks (+ head)
    embeddings: bool = True  # freeze the embeddings


@dataclass
class FinetuneSection:
    """Fine-tuning a pretrained model (model = a HF folder or .gguf file)."""

    # head input: mean over real tokens (sentence encoders) or the first token (BERT's CLS)
    pooling: Literal["mean", "cls"] = "mean"
    head_dropout: float = 0.1  # dropout before the new head; higher regularises a small data set, slows fitting
    # method head: the frozen body runs in eval mode (no dropout) and each text's pooled features are computed once and
    # reused across epochs and evaluation (one body forward per distinct text); false: the body runs every step, in
    # train mode
    cache_features: bool = True
    # the new head's lr when the body trains too (full, freeze, bitfit, lora); None: method head's default lr (1e-2), at
    # least lr: a fresh head needs larger steps than pretrained weights
    head_lr: Optional[float] = None
    # after the first step check every trainable weight moved and every frozen one did not; hashes the trainable weights
    # once
    audit: bool = True
    # recompute each layer's activations in backward: one layer's activation memory instead of all, for one more forward
    # pass per step; for long sequences or big models
    activation_checkpointing: bool = False
    # a separate labelled file to validate on (labels must be seen in training); None: split val_fraction off data
    eval_data: Optional[str] = None
    # with the default epochs, a small file trains at least this many steps (epochs raised, said in one line); an
    # explicit epochs / max_steps / max_time wins; 0: off
    min_steps: int = 50
    # also write out_dir/adapter (PEFT, LoRA only) and/or out_dir/merged (plain HF folder)
    export: Literal["none", "adapter", "merged", "both"] = "none"


@dataclass
class DPOSection:
    """task: preference (DPO): the policy is the model with its method, the reference the frozen base."""

    beta: float = 0.1  # strength of the pull towards the reference; larger: stays closer to it
    # sigmoid: DPO's logistic loss; ipo: squared loss towards 1/(2 beta), does not saturate; simpo: length-normalised,
    # no reference model; orpo: chosen NLL plus an odds-ratio term, no reference model; kto: unpaired rows (prompt,
    # completion, label: true|false)
    loss: Literal["sigmoid", "ipo", "simpo", "orpo", "kto"] = "sigmoid"
    # sigmoid, simpo: assumed share of flipped preference labels (conservative DPO)
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5  # simpo: target reward margin; larger pushes chosen further above rejected
    desirable_weight: float = 1.0  # kto: weight of a good (label: true) row's loss; raise it when good rows are rarer
    undesirable_weight: float = 1.0  # kto: weight of a bad (label: false) row's loss


@dataclass
class RLSection:
    """task: rl (GRPO): completions sampled from the policy per prompt, scored by reward functions."""

    # reward functions, summed with their weights: [{fn: pkg.mod:func, weight: 1.0, args: {}}]; fn(prompts,
    # completions, **columns) -> list[float]; built-ins: exact_answer (row's 'answer' vs the text in <answer></answer>),
    # format (completion matches format_pattern)
    rewards: list[dict] = field(default_factory=lambda: [{"fn": "format"}, {"fn": "exact_answer"}])
    num_generations: int = 4  # completions per prompt (the group whose mean and std set the advantages)
    max_new_tokens: int = 64  # longest completion; longer ones are cut (and get no end token)
    temperature: float = 1.0  # sampling temperature; the policy's log-probs use the same scaling
    top_p: float = 1.0  # nucleus sampling: keep the smallest token set with this much probability
    beta: float = 0.04  # KL penalty towards the reference (LoRA: adapters off; else a frozen copy); 0: none
    epsilon: float = 0.2  # policy-ratio clip range [1 - epsilon, 1 + epsilon_high]
    epsilon_high: Optional[float] = None  # upper clip (DAPO's clip-higher); None: epsilon
    # divide each group's advantages by its reward std (GRPO); off: mean-centred only (Dr. GRPO)
    scale_rewards: bool = True
    format_pattern: str = r"^\s*<answer>.*?</answer>\s*$"  # built-in reward 'format': a full match (re.DOTALL)
    answer_column: str = "answer"  # built-in reward 'exact_answer': the row's column holding the answer


@dataclass
class EarlyStoppingSection:
    """Stop when a validation metric stops improving, and keep the best weights (loop/early_stopping.py)."""

    enabled: bool = False  # on: stop on validation, keep out_dir/best/; off: only tol/patience on the training loss
    # a metric the run logs at evaluations: val_loss, val_accuracy, val_f1 (macro), val_rmse, val_r2, val_ppl
    monitor: str = "val_loss"
    mode: Literal["auto", "min", "max"] = "auto"  # auto: max for accuracy and r2, min otherwise
    patience: int = 5  # evaluations without an improvement larger than min_delta before stopping
    min_delta: float = 0.0  # smaller improvements do not reset the patience (but still become the best)
    restore_best: bool = True  # end with the best evaluation's weights (model.safetensors, exports)


@dataclass
class Config:
    # --- what to fit -------------------------------------------------------------------------
    model: str = "linear"  # linear | logistic | mlp | gpt | path to a HF folder or .gguf
    # embedded name (diabetes, breast_cancer, shakespeare) or a file path; model=gpt also a folder, a glob, a list of
    # those (one corpus), or a mixture [{path: ..., weight: 0.7}, ...] (sampled by weight)
    data: Union[str, list[Union[str, dict]]] = "diabetes"
    target: Optional[str] = None  # target column; None: the data set's default / last column
    features: Optional[list[str]] = None  # feature columns; None: every column but the target
    # auto: from the loss, else from the labels (pretrained: classification); causal_lm: plain text; instruction:
    # prompt/response JSONL; preference: prompt/chosen/rejected JSONL (DPO); rl: prompt JSONL and rewards (GRPO)
    task: Literal["auto", "regression", "classification", "causal_lm", "instruction", "preference", "rl"] = "auto"
    num_classes: Optional[int] = None  # classification with integer labels; None: inferred
    # tables: a missing cell (empty, NA, NaN, null) is an error, drops its row, or takes the training rows' mean
    missing: Literal["error", "drop", "mean"] = "error"
    # tables: text-valued feature columns one-hot encoded (saved with the run for predict); auto: every column whose
    # values are all non-numeric; none: a text cell is an error
    categorical: Union[Literal["none", "auto"], list[str]] = "none"
    standardize: bool = True  # features to zero mean / unit variance (train statistics)
    standardize_target: bool = True  # regression target too: lr stops depending on units; loss reads as 1 - R^2
    val_fraction: float = 0.2  # held out for validation (text: the last share of its bytes); 0: no validation
    hidden: list[int] = field(default_factory=lambda: [5])  # MLP hidden widths (classic 10-5-1)
    activation: Literal["relu", "tanh", "sigmoid", "gelu"] = "relu"  # MLP non-linearity
    init: str = "random"  # random (seeded) | path to a .safetensors weights file
    method: str = "full"  # fine-tuning: full | freeze | head | lora | bitfit (combine with '+')
    # hold the frozen base weights quantised (method lora or head): less memory, dequantised per matmul
    quantize: Literal["none", "int8", "nf4"] = "none"
    # --- objective ---------------------------------------------------------------------------
    # auto: mse / cross_entropy; mse_half: the 1/(2m) convention
    loss: Literal["auto", "mse", "mse_half", "cross_entropy", "bce", "huber"] = "auto"
    label_smoothing: float = 0.0  # cross-entropy: spread this much target mass over all classes
    huber_delta: float = 1.0  # huber: quadratic within delta, linear beyond (robust to outliers)
    # cross-entropy: weight each class's samples; balanced: n_samples / (n_classes * count) over the training labels
    # (scikit-learn's formula), or a mapping {label: weight} (unlisted labels 1); None: unweighted
    class_weight: Union[None, Literal["balanced"], dict] = None
    # --- gradient descent ----------------------------------------------------------------------
    # our own update rules (gradtune.optim); muon: Muon for the hidden 2-D matrices, AdamW (lr, betas, eps) for
    # embeddings, the output layer, norms and biases
    optimizer: Literal["sgd", "adamw", "muon"] = "sgd"
    # step size; too large oscillates/diverges, too small crawls (see lr-find); auto: from the loss curvature L (and
    # mu), min(2/(mu+L), 1.9/L) or 1/L (linear mse, logistic)
    lr: Union[float, Literal["auto"]] = 0.01
    # SGD heavy-ball momentum; 0.9 typical; auto (with lr: auto): Nesterov's (sqrt(kappa)-1)/(sqrt(kappa)+1), nesterov
    # on
    momentum: Union[float, Literal["auto"]] = 0.0
    nesterov: bool = False  # look-ahead momentum; needs momentum > 0, dampening 0
    dampening: float = 0.0  # SGD: scale of the new gradient in the momentum buffer is (1 - dampening)
    weight_decay: float = 0.0  # decoupled for AdamW and Muon, L2-in-gradient for SGD (as torch.optim)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW moment decay rates
    eps: float = 1e-8  # AdamW denominator floor
    muon_lr: float = 0.02  # optimizer=muon: the hidden matrices' lr (the schedule scales it with lr)
    muon_momentum: float = 0.95  # optimizer=muon: momentum of the matrices' update (buffer starts at 0)
    muon_nesterov: bool = True  # optimizer=muon: look-ahead momentum, as the nanoGPT speedrun and torch.optim.Muon
    # optimizer=muon: Newton-Schulz iterations orthogonalising each update; fewer: cheaper, less orthogonal
    ns_steps: int = 5
    # optimizer=muon: lr per matrix shape (A, B); original: sqrt(max(1, A/B)); match_rms_adamw: 0.2 sqrt(max(A, B)),
    # the RMS of an AdamW update, so AdamW's lr and weight_decay carry over
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = "original"
    batch_size: Union[int, Literal["full"]] = 32  # full: batch GD; 1: stochastic GD; k: mini-batch
    micro_batch_size: Optional[int] = None  # split each batch for memory; the gradient stays exact
    # batch-size ramp: the batch grows linearly from batch_ramp_start samples to batch_size over this many
    # steps (cheap small-batch steps while the gradient noise is low); tokens per step follow; 0: off
    batch_ramp_steps: int = 0
    batch_ramp_start: int = 1  # batch_ramp_steps: samples in the first step (< batch_size)
    clip_grad_norm: Optional[float] = None  # clip the global gradient norm; None: off
    # estimate the gradient noise scale (batch-size advice) when batches are split into micro-batches; one more gradient
    # norm per step
    noise_scale: bool = True
    # --- schedule and stopping -------------------------------------------------------------------
    # lr(step); decay lets SGD settle; wsd: warm-up, stable, decay; plateau: cut by gamma when the monitored validation
    # metric stalls
    schedule: Literal["constant", "step", "exponential", "linear", "cosine", "wsd", "plateau"] = "constant"
    warmup_steps: int = 0  # linear lr warm-up steps before the schedule (large models)
    min_lr: float = 0.0  # floor for linear/cosine decay
    gamma: float = 0.1  # step/exponential decay factor
    step_size: int = 1000  # steps between step-schedule decays
    decay_steps: Optional[int] = None  # wsd: steps of the final decay; None: decay_fraction of the run
    decay_fraction: float = 0.1  # wsd: share of the run spent decaying (when decay_steps is None)
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "cosine"  # wsd: the decay curve
    plateau_patience: int = 10  # plateau: evaluations without improvement before the lr is cut by gamma
    plateau_threshold: float = 1e-4  # plateau: relative improvement that counts
    plateau_cooldown: int = 0  # plateau: evaluations to wait after a cut before counting again
    # passes over the training set; a convergence run (tol > 0) with no budget given gets up to 10,000, stopping on tol
    epochs: int = 100
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when smaller
    # wall-time budget, e.g. 10m, 1h, 90s: the step budget is fixed after a short calibration, schedules run over it
    max_time: Optional[str] = None
    tol: float = 0.0  # stop when the loss improves by less than this (relative) ...
    patience: int = 5  # ... for this many evaluations in a row
    grad_tol: float = 0.0  # stop when the gradient norm falls under this
    eval_every: Optional[int] = None  # steps between evaluations; None: once per epoch
    # language models: intermediate evaluations on a fixed, seeded sample of this many validation tokens; the final one
    # is full; None: always full
    eval_tokens: Optional[int] = None
    # the final evaluation of a language model: the full validation pass, or (sample) the eval_tokens sample, an
    # estimate as nanoGPT's, for a validation set too large to pass over
    eval_final: Literal["full", "sample"] = "full"
    # --- numerics and reproducibility ------------------------------------------------------------
    seed: int = 0  # initial weights, data order and split; same seed, same run
    dtype: Literal["float32", "float64"] = "float32"  # float64: exact checks, slower
    # bf16 autocast for matmuls (large models); fp16: fp16 autocast with a dynamic loss scale (CUDA only); auto: bf16
    # (on a GPU without bf16: fp16) where a probe of the model's own step finds it faster here
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False  # torch.compile the model: faster steps after a warm-up
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # --- output -------------------------------------------------------------------------------
    # weights, metrics.jsonl, plots, checkpoints; runs/latest: a new runs/<model>-<time>, linked as runs/latest
    out_dir: str = "runs/latest"
    log_every: int = 0  # steps between log lines; 0: per evaluation only
    progress: Literal["auto", "bar", "lines", "off"] = "auto"  # bar on a terminal, lines in CI/logs
    plot: bool = True  # loss-curve PNG at the end
    # also send the metrics to: tensorboard (out_dir/tb/), mlflow (MLFLOW_TRACKING_URI, else out_dir/mlflow.db), wandb
    # (offline unless WANDB_MODE is set: out_dir/wandb/); each needs its package
    log_to: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=list)
    callbacks: list[dict] = field(default_factory=list)  # your code in the loop: [{class: pkg.mod:Class, args: {...}}]
    checkpoint_every: int = 0  # steps between checkpoints; 0: only the final weights
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: Literal["auto", "never", "force"] = "auto"  # auto: continue from the newest good checkpoint
    # under torchrun: ddp replicates, fsdp shards (fits larger models, more traffic); auto picks
    distributed: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    # seconds a collective waits for the other ranks; lower: a dead or hung rank fails the run sooner, too low: slow
    # steps abort
    dist_timeout: float = 300.0
    # --- sections ------------------------------------------------------------------------------
    guard: GuardConfig = field(default_factory=GuardConfig)
    gpt: GPTSection = field(default_factory=GPTSection)
    text: TextSection = field(default_factory=TextSection)
    lora: LoraSection = field(default_factory=LoraSection)
    freeze: FreezeSection = field(default_factory=FreezeSection)
    dpo: DPOSection = field(default_factory=DPOSection)  # task: preference
    rl: RLSection = field(default_factory=RLSection)  # task: rl (GRPO)
    # stop when validation stops improving; keep the best weights
    early_stopping: EarlyStoppingSection = field(default_factory=EarlyStoppingSection)
    # pretrained models: head pooling/dropout, audit, eval_data, export
    finetune: FinetuneSection = field(default_factory=FinetuneSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Stable hash of the resolved config (checkpoints record it)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
