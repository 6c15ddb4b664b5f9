"""The README's scikit-learn example is examples/sklearn_quickstart.py, word for word, and runs."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[3]


def test_readme_shows_the_shipped_example():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## scikit-learn") :]
    shown = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert shown == (ROOT / "examples" / "sklearn_quickstart.py").read_text()
    assert "python examples/sklearn_quickstart.py" in section


def test_the_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it saves to runs/sklearn-diabetes under the working folder
    runpy.run_path(str(ROOT / "examples" / "sklearn_quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "R^2 0.5" in out and "best:" in out
    assert (tmp_path / "runs" / "sklearn-diabetes" / "model.safetensors").is_file()
