"""Typed, strict run configuration: ``load_config(path, overrides)`` -> a validated ``Config``.

schema.py    the dataclasses (every setting, its type, default and meaning)
checks.py    value ranges and combinations
defaults.py  per model family / fine-tuning method
loading.py   YAML + key=value -> Config; budget rules; GRADTUNE_BUDGET_SCALE
suggestions.py other tools' names for our settings (learning_rate -> lr)
durations.py max_time: '10m' -> seconds
table.py     the README's settings table
"""

from gradtune.config.defaults import MODEL_DEFAULTS, is_pretrained, pretrained_lr
from gradtune.config.durations import parse_duration
from gradtune.config.loading import load_config
from gradtune.config.schema import (
    METHODS,
    Config,
    DPOSection,
    EarlyStoppingSection,
    FinetuneSection,
    FreezeSection,
    GPTSection,
    GuardConfig,
    LoraSection,
    TextSection,
)
from gradtune.config.table import field_docs, markdown_table

__all__ = [
    "METHODS",
    "MODEL_DEFAULTS",
    "Config",
    "DPOSection",
    "EarlyStoppingSection",
    "FinetuneSection",
    "FreezeSection",
    "GPTSection",
    "GuardConfig",
    "LoraSection",
    "TextSection",
    "field_docs",
    "is_pretrained",
    "load_config",
    "markdown_table",
    "parse_duration",
    "pretrained_lr",
]
