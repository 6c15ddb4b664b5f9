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
