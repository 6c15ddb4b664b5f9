"""runtime/collector.paused: the collector is off inside the block and as it was after it, an
exception included; the model loaders run with it paused."""

from __future__ import annotations

import gc

import pytest

from gradtune.models import hf
from gradtune.runtime import collector


def test_paused_restores_the_collector_as_it_was():
    assert gc.isenabled()
    with collector.paused():
        assert not gc.isenabled()
        with collector.paused():  # nested: the inner block must not switch it back on
            pass
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector.paused():
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector.paused():
            pass
        assert not gc.isenabled()  # off before: still off
    finally:
        gc.enable()


def test_loading_a_model_runs_with_the_collector_paused(monkeypatch, tmp_path):
    seen = []

    def resolve(source):
        seen.append(gc.isenabled())
        raise hf.ModelSourceError("stop here")

    monkeypatch.setattr(hf, "resolve", resolve)
    for load in (hf.load_model, hf.load_tokenizer):
        with pytest.raises(hf.ModelSourceError):
            load(tmp_path)
    assert seen == [False, False] and gc.isenabled()


KEEP_SCRIPT = """
import gc, sys
from gradtune.runtime import collector

def load(n):  # what a paused block loads: objects that live on (here, cycles kept alive)
    kept = []
    for _ in range(n):
        a = []
        a.append(a)
        kept.append(a)
    return kept

with collector.paused():
    first = load(5000)
library = gc.get_freeze_count()  # not a command: nothing frozen
collector.keep_loaded()
after_keep = gc.get_freeze_count()
with collector.paused():
    second = load(5000)
print(library, after_keep, gc.get_freeze_count() - after_keep, gc.isenabled())
"""


def test_a_command_freezes_what_each_paused_block_loads():
    """After keep_loaded (cli.entry calls it) the end of each paused block freezes what exists, so
    the collector never walks it again; before it, a block freezes nothing (a library user's process)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", KEEP_SCRIPT], capture_output=True, text=True, check=True).stdout
    library, after_keep, grown, enabled = out.split()
    assert int(library) == 0 and int(after_keep) > 10000 and int(grown) >= 5000 and enabled == "True", out


def test_importing_the_cli_leaves_nothing_for_the_collector_to_walk():
    """cli's imports (torch and the commands, ~10^6 objects) end frozen: the first pass after them
    finds the young generations nearly empty instead of walking all of it (~0.1 s a process)."""
    import subprocess
    import sys

    script = "import gc; import gradtune.cli; print(gc.get_freeze_count(), sum(gc.get_count()[:2]))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    frozen, young = out.split()
    assert int(frozen) > 100_000 and int(young) < 10_000, (frozen, young)
