"""The test hooks of gradtune, one environment family (``GRADTUNE_TEST_*``), documented in full
in ``gradtune/runtime/testhooks.py``; these helpers write and read them for the tests.

    GRADTUNE_TEST_FAULTS=point@N[=ACTION][/rankR],...   self-inflicted faults at exact points
    GRADTUNE_TEST_PROBE=DIR                              DIR/steps.jsonl (each applied step's
                                                         sample ids), DIR/rank<R>.txt (each
                                                         micro-batch's ids on rank R)
    GRADTUNE_TEST_FP16=1                                 precision: fp16 accepted on CPU (fp32
                                                         compute; grads@N=INF forces an overflow)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FAULTS = "GRADTUNE_TEST_FAULTS"
PROBE = "GRADTUNE_TEST_PROBE"


def rank_fault(rank: int, step: int, action: str) -> str:
    """A FAULTS item: ``rank`` does ``action`` (kill | raise | hang, or a signal name) as it begins
    0-based ``step`` of a fresh run."""
    return f"step.begin@{step + 1}={action.upper()}/rank{rank}"


def steps_file(probe: Path) -> Path:
    return Path(probe) / "steps.jsonl"


def probe_steps(probe: Path) -> dict[int, list[int]]:
    """Step -> its sample ids, the last record of each step: what the finished run trained on."""
    last: dict[int, list[int]] = {}
    for line in steps_file(probe).read_text().splitlines():
        r = json.loads(line)
        last[r["step"]] = r["ids"]
    return last


# Long tests (``@pytest.mark.long``, repetition counts) run in full only with GRADTUNE_LONG_TESTS=1
# (``make test-long``); ``make test`` runs the short forms (tests/conftest.py).
LONG = os.environ.get("GRADTUNE_LONG_TESTS") == "1"
