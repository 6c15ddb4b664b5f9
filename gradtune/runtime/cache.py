"""gradtune's one cache root: ``$GRADTUNE_CACHE``, else ``~/.cache/gradtune``.

    tokens/     tokenised corpora (data/corpus.py), keyed by shard fingerprints and tokenizer
    tokenizers/ byte-level BPEs trained by text.tokenizer: train (data/bpe.py)
    kernels/    the optimizer's compiled C kernels (optim/fused.py), keyed by source/CPU/compiler
    peak.json   measured peak matmul FLOP/s per machine (runtime/peak_flops.py)
    precision.json  precision: auto's probe, per machine and model shape (jobs/precision.py)
    gguf/       .gguf bases converted once to float32 safetensors + tokenizer (models/gguf_cache.py)

Everything under it can be deleted at any time: it is rebuilt on demand.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "GRADTUNE_CACHE"


def root() -> Path:
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gradtune"


def path(*parts: str) -> Path:
    """A path under the cache root, e.g. ``path("tokens")``."""
    return root().joinpath(*parts)
