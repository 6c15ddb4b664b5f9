"""Other tools' names for our settings: an unknown key that another trainer spells this way gets
our name in the error, with the arithmetic where the meaning differs.

Sources: Hugging Face ``TrainingArguments`` and PEFT's ``LoraConfig``, TRL, nanoGPT's
``train.py`` globals, torchtune recipes, PyTorch Lightning's ``Trainer``, scikit-learn's
``SGDRegressor`` / ``MLPRegressor``. tests/unit/config/test_suggestions.py keeps every target a
real key.
"""

from __future__ import annotations

# their key -> (our key, a note or "")
OTHER_NAMES: dict[str, tuple[str, str]] = {
    # Hugging Face Trainer / TRL
    "learning_rate": ("lr", ""),
    "num_train_epochs": ("epochs", ""),
    "per_device_train_batch_size": (
        "batch_size",
        "batch_size is global: per_device_train_batch_size x gradient_accumulation_steps x processes",
    ),
    "train_batch_size": ("batch_size", ""),
    "gradient_accumulation_steps": (
        "micro_batch_size",
        "ours is the other way round: batch_size = per-device batch x gradient_accumulation_steps (x processes),"
        " micro_batch_size = the per-device batch; the gradient is the same",
    ),
    "per_device_eval_batch_size": ("micro_batch_size", "evaluation uses the training micro-batch"),
    "warmup_ratio": ("warmup_steps", "give steps: warmup_ratio x the run's steps"),
    "lr_scheduler_type": ("schedule", ""),
    "max_grad_norm": ("clip_grad_norm", ""),
    "adam_beta1": ("betas", "betas=[beta1,beta2]"),
    "adam_beta2": ("betas", "betas=[beta1,beta2]"),
    "adam_epsilon": ("eps", ""),
    "optim": ("optimizer", ""),
    "logging_steps": ("log_every", ""),
    "eval_steps": ("eval_every", ""),
    "save_steps": ("checkpoint_every", ""),
    "save_total_limit": ("keep_checkpoints", ""),
    "output_dir": ("out_dir", ""),
    "model_name_or_path": ("model", ""),
    "train_file": ("data", ""),
    "dataset": ("data", ""),
    "bf16": ("precision", "precision=bf16"),
    "fp16": ("precision", "precision=fp16 (CUDA; precision=bf16 needs no loss scaling where the GPU has it)"),
    "gradient_checkpointing": ("finetune.activation_checkpointing", ""),
    "max_seq_length": ("text.max_length", ""),
    "max_length": ("text.max_length", ""),
    "packing": ("text.packing", ""),
    "beta": ("dpo.beta", ""),
    "load_best_model_at_end": ("early_stopping.restore_best", "with early_stopping.enabled=true"),
    "metric_for_best_model": ("early_stopping.monitor", ""),
    "early_stopping_patience": ("early_stopping.patience", ""),
    "resume_from_checkpoint": ("resume", "resume=auto continues from out_dir's newest checkpoint"),
    "report_to": ("log_to", ""),
    # PEFT LoraConfig
    "r": ("lora.rank", ""),
    "lora_r": ("lora.rank", ""),
    "lora_alpha": ("lora.alpha", ""),
    "lora_dropout": ("lora.dropout", ""),
    "target_modules": ("lora.targets", ""),
    "lora.r": ("lora.rank", ""),
    "lora.target_modules": ("lora.targets", ""),
    "lora.lora_alpha": ("lora.alpha", ""),
    "lora.lora_dropout": ("lora.dropout", ""),
    # nanoGPT / LitGPT / torchtune
    "max_iters": ("max_steps", ""),
    "warmup_iters": ("warmup_steps", ""),
    "lr_decay_iters": ("max_steps", "our decay runs over the whole run"),
    "grad_clip": ("clip_grad_norm", ""),
    "eval_interval": ("eval_every", ""),
    "eval_iters": ("eval_tokens", "give tokens: eval_iters x batch x block_size"),
    "log_interval": ("log_every", ""),
    "n_layer": ("gpt.n_layer", ""),
    "n_head": ("gpt.n_head", ""),
    "n_embd": ("gpt.n_embd", ""),
    "block_size": ("gpt.block_size", ""),
    "dropout": ("gpt.dropout", ""),
    "num_epochs": ("epochs", ""),
    "max_steps_per_epoch": ("max_steps", ""),
    "enable_activation_checkpointing": ("finetune.activation_checkpointing", ""),
    # PyTorch Lightning
    "max_epochs": ("epochs", ""),
    "accumulate_grad_batches": (
        "micro_batch_size",
        "batch_size = the loader's batch x accumulate_grad_batches, micro_batch_size = the loader's batch",
    ),
    "gradient_clip_val": ("clip_grad_norm", ""),
    "default_root_dir": ("out_dir", ""),
    # scikit-learn
    "max_iter": ("epochs", ""),
    "eta0": ("lr", ""),
    "learning_rate_init": ("lr", ""),
    "alpha": ("weight_decay", "an L2 penalty alpha on the mean loss is weight_decay=alpha for SGD"),
    "hidden_layer_sizes": ("hidden", ""),
    "validation_fraction": ("val_fraction", ""),
    "n_iter_no_change": ("patience", "early_stopping.patience when early stopping on validation"),
    "random_state": ("seed", ""),
}


def other_name(key: str) -> str:
    """The error's hint for ``key`` when another tool spells one of our settings so, else ''."""
    found = OTHER_NAMES.get(key) or OTHER_NAMES.get(key.rsplit(".", 1)[-1])
    if not found:
        return ""
    ours, note = found
    return f" (did you mean '{ours}'?{' ' + note if note else ''})"
