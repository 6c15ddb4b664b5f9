"""Peak FLOP/s: the best of several probes, cached; measured again (keeping the larger) on request."""

import json
from types import SimpleNamespace

import torch

from gradtune.runtime import peak_flops as pf


def test_measure_is_the_best_of_its_probes(monkeypatch):
    # Per probe the clock is read at its start, after its one matmul, at its end: 1 s, 0.5 s, 2 s.
    clock = iter([0.0, 1.0, 1.0, 1.0, 1.5, 1.5, 2.0, 4.0, 4.0])
    monkeypatch.setattr(pf, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    got = pf.measure_cpu(torch.float32, n=8, seconds=1e-9, probes=3)
    assert got == 2 * 8**3 / 0.5


def test_cached_then_remeasured_keeping_the_larger(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADTUNE_CACHE", str(tmp_path))
    figures = iter([1e9, 5e8, 3e9])
    monkeypatch.setattr(pf, "measure_cpu", lambda dtype: next(figures))
    cpu = torch.device("cpu")
    assert pf.peak_flops(cpu) == 1e9
    assert pf.peak_flops(cpu) == 1e9  # cached: not measured again
    assert pf.peak_flops(cpu, remeasure=True) == 1e9  # a slower re-measurement does not lower it
    assert pf.peak_flops(cpu, remeasure=True) == 3e9
    assert list(json.loads((tmp_path / "peak.json").read_text()).values()) == [3e9]
