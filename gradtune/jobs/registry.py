"""The one table of run types: model name -> the builder that turns a Config into a Job.

To add a run type, write ``build_x(cfg) -> Job`` in this package and register it here (and,
for ``eval`` / ``predict`` / ``generate`` on its finished runs, a reloader in ``reload.py``).
"""

from __future__ import annotations

import difflib
from typing import Callable

from gradtune.config import Config, is_pretrained
from gradtune.jobs import memory
from gradtune.jobs.job import Job
from gradtune.jobs.pretrained import build_pretrained
from gradtune.jobs.tabular import build_tabular
from gradtune.jobs.text import build_text
from gradtune.runtime import distributed
from gradtune.runtime.errors import GradtuneError

BUILDERS: dict[str, Callable[[Config], Job]] = {
    "linear": build_tabular,
    "logistic": build_tabular,
    "mlp": build_tabular,
    "gpt": build_text,
    "pretrained": build_pretrained,  # cfg.model is a HF folder or a .gguf file
}


def kind(model: str) -> str:
    """The BUILDERS key of a ``model`` setting: a built-in name, or 'pretrained' for a path."""
    if model in BUILDERS and model != "pretrained":
        return model
    if is_pretrained(model):
        return "pretrained"
    close = difflib.get_close_matches(model, [k for k in BUILDERS if k != "pretrained"], n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(BUILDERS)}, or a path)"
    raise GradtuneError(f"config: unknown model '{model}'{hint}")


def build(cfg: Config) -> Job:
    """The Job ``cfg`` describes; every input is validated here, before anything is written.
    A model that cannot fit in memory is refused first, before data is read or weights made."""
    k = kind(cfg.model)
    if cfg.task == "preference" and k not in ("pretrained", "gpt"):  # DPO needs a reference LM
        raise GradtuneError(
            "config: task 'preference' (DPO) needs a causal LM: model = gpt (with init=), a HF folder or .gguf file"
        )
    if cfg.task == "rl" and k != "pretrained":  # GRPO samples from a chat/prompt-formatted causal LM
        raise GradtuneError("config: task 'rl' (GRPO) needs a pretrained causal LM: model = a HF folder or .gguf file")
    memory.check(cfg, k)
    job = BUILDERS[k](cfg)
    if k == "pretrained":
        min_steps(job, cfg)
    return job


def min_steps(job: Job, cfg: Config) -> None:
    """Fine-tuning with the default epochs on a small file: raise ``cfg.epochs`` (in place, before
    the run and its saved config use it) until the run takes ``finetune.min_steps`` steps; one
    epoch of 32 examples at batch 16 is 2 steps, which teaches a model nothing. Said in one line."""
    want = cfg.finetune.min_steps
    n = len(job.train)
    per_epoch = 1 if cfg.batch_size == "full" else -(-n // min(int(cfg.batch_size), max(n, 1)))
    if want <= 0 or n == 0 or cfg.epochs * per_epoch >= want:
        return
    before, cfg.epochs = cfg.epochs, -(-want // per_epoch)
    if distributed.is_main():
        print(
            f"epochs {before} -> {cfg.epochs}: {n:,} training samples make {per_epoch} step(s) an epoch; "
            f"fine-tuning trains at least finetune.min_steps={want} steps unless epochs/max_steps/max_time is given",
            flush=True,
        )
