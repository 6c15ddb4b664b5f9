"""The objectives' oracle tests (closed forms, TRL) compare gradients in float64 to 1e-10, which
holds for each row's whole forward. The shared-prompt forward (objectives/shared_prompt.py) sums
the rows of a prompt before the model's float32 RMSNorm, not after: the same loss, gradients to
float32 rounding. Tests whose name says ``shared_prompt`` check that path; the others run whole rows."""

import pytest

from gradtune.objectives import shared_prompt


@pytest.fixture(autouse=True)
def whole_rows(monkeypatch, request):
    if "shared_prompt" not in request.node.name:
        monkeypatch.setattr(shared_prompt, "supports", lambda model: False)
