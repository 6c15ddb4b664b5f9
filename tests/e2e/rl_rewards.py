"""Reward functions for the RL (GRPO) tests: named in configs as ``tests.e2e.rl_rewards:NAME``."""

from __future__ import annotations

import math


def yes_share(prompts, completions, **columns):
    """Share of the words 'yes' in the completion (a reward the tiny random model's samples vary in)."""
    out = []
    for c in completions:
        words = c.split()
        out.append(words.count("yes") / (1 + len(words)))
    return out


def wrong_length(prompts, completions, **columns):
    return [0.0] * (len(completions) + 1)


def not_a_number(prompts, completions, **columns):
    return [math.nan] * len(completions)


def no_arguments():
    return []
