"""Memory preflight: a run that cannot fit is refused before its model is built.

Without it, ``model=gpt gpt.n_layer=48 gpt.n_embd=6400`` (23.6 billion parameters) spends
minutes allocating, then dies in a torch allocation error or is killed by the kernel's OOM
killer; with it, the run exits at once with the estimate and the memory there is.

The estimate, in bytes, is a *lower bound* of the training peak, so it never refuses a run that
would have fitted (nothing is counted that might not be there):

    weights      P   * b          P parameters, b bytes each (4: float32, 8: float64); with
                                  quantize=int8 | nf4 the 2-D non-embedding tensors of the base
                                  (its linear layers) take 1 + 4/64 | 1/2 + 4/64 bytes each
                                  (codes + a float32 scale per 64), the rest b
    gradients    P_t * b          P_t trainable parameters: P for training from scratch and full
                                  fine-tuning; 0 for freeze / head / lora / bitfit (small, unknown
                                  before the model is built)
    optimizer    k * P_t * b      k = 2 for AdamW (first and second moments), 1 for SGD with
                                  momentum, 0 for plain SGD
    activations  N * (L * a + e) * b_act
                                  N tokens (rows for tables) in one micro-batch: micro_batch_size,
                                  else batch_size, times the sequence length; 0 for batch_size=full
                                  on text (the window count is known only after tokenising).
                                  a per token and layer: what a pre-norm block keeps for backward,
                                  8*C + 2*H (gpt2: norms' inputs and outputs, q|k|v, attention
                                  output, MLP hidden before and after GELU) or 8*C + 4*H (llama's
                                  SwiGLU keeps gate|up, silu(gate), the product); with activation
                                  checkpointing only the block input, C. e per token: logits and
                                  log-softmax, 2*V. Fused attention keeps no T x T matrix, so none
                                  is counted. b_act = 2 under bf16 autocast, else b.

A quantised base is loaded in float first and quantised layer by layer: the estimate is then
the larger of the loading peak (P * b) and the training terms above.

Available memory: for the CPU, MemAvailable of /proc/meminfo (lowered to a cgroup's remaining
limit when there is one), shared by the processes of one machine under torchrun; for a GPU,
``torch.cuda.mem_get_info``. Under torchrun with FSDP possible (distributed=auto or fsdp) the
weight, gradient and optimizer terms are divided by the number of processes (sharded); each
process holds its share of the micro-batch. Where the available memory cannot be read (other
platforms) nothing is checked. ``GRADTUNE_MEMORY_CHECK=0`` skips the check.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from gradtune.config import Config
from gradtune.data import tokenizer as tokenizers
from gradtune.finetune.gguf_blocks import TYPES as GGUF_BLOCKS
from gradtune.finetune.methods import body_method
from gradtune.jobs.text import gpt
from gradtune.models import hf
from gradtune.models.gguf_index import read_index
from gradtune.runtime import distributed
from gradtune.runtime.device import resolve_device
from gradtune.runtime.errors import GradtuneError

GIB = 1 << 30
SWITCH = "GRADTUNE_MEMORY_CHECK"


@dataclass
class Estimate:
    """Bytes per process of one training step's peak, by term (see the module docstring)."""

    params: int  # P, the model's parameter count
    weights: float
    gradients: float
    optimizer: float
    activations: float
    what: str  # "a 23.6B-parameter gpt", for the message
    smaller: str = "use a smaller model"  # the advice when the weights' terms alone do not fit
    load: float = 0.0  # the float model while loading, before quantize shrinks it (0: not quantised)

    @property
    def total(self) -> float:
        return max(self.weights + self.gradients + self.optimizer + self.activations, self.load)


def _bytes(cfg: Config) -> int:
    return 8 if cfg.dtype == "float64" else 4


def _micro(cfg: Config) -> Optional[int]:
    """Samples in one forward/backward pass; None when batch_size=full with no micro-batches."""
    if cfg.micro_batch_size:
        return int(cfg.micro_batch_size)
    return None if cfg.batch_size == "full" else int(cfg.batch_size)


def _states(cfg: Config) -> int:
    if cfg.optimizer in ("adamw", "muon"):  # muon: 1 per matrix, 2 for the rest: 2 is the bound
        return 2
    return 1 if cfg.momentum else 0


def _sharding(cfg: Config) -> int:
    """Processes that may share the weights' memory (FSDP shards them; DDP replicates)."""
    if distributed.launched() and cfg.distributed in ("auto", "fsdp"):
        return int(os.environ.get("WORLD_SIZE", "1"))
    return 1


def estimate(cfg: Config, params: int, trainable: int, per_token: float, tokens: int, what: str) -> Estimate:
    """The terms for ``params`` weights (``trainable`` of them trained) and ``tokens`` tokens
    per micro-batch keeping ``per_token`` activation values each."""
    b = _bytes(cfg)
    shards = _sharding(cfg)
    act_b = 2 if cfg.precision in ("bf16", "fp16") else b
    ranks = int(os.environ.get("WORLD_SIZE", "1")) if distributed.launched() else 1
    return Estimate(
        params,
        params * b / shards,
        trainable * b / shards,
        _states(cfg) * trainable * b / shards,
        tokens / ranks * per_token * act_b,
        what,
    )


def available(device: torch.device) -> Optional[float]:
    """Bytes this process may still allocate on ``device``; None when it cannot be read."""
    try:
        if device.type == "cuda":
            return float(torch.cuda.mem_get_info(device)[0])
        if device.type != "cpu":
            return None
        meminfo = Path("/proc/meminfo").read_text()
    except (OSError, RuntimeError, AssertionError):  # no /proc (macOS), CUDA not usable
        return None
    kib = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemAvailable:")), None)
    if kib is None:
        return None
    free = kib * 1024.0
    limit = _cgroup_room()
    if limit is not None:
        free = min(free, limit)
    return free / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _cgroup_room() -> Optional[float]:
    """A cgroup v2 memory limit minus its usage (containers), or None when unlimited / absent."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return float(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        return None


# hidden-width activations an MLP keeps for backward, per token: gelu its input and output; swiglu
# gate, up, silu(gate) and the product; relu2 its input, the ReLU and the square
MLP_SAVED = {"gelu": 2, "swiglu": 4, "relu2": 3}


def _gpt_estimate(cfg: Config) -> Optional[Estimate]:
    """A GPT trained from scratch: P counted on the meta device (no memory, no init)."""
    spec = cfg.text.tokenizer
    try:
        # char: the vocabulary is known only after reading the text; 1 keeps the bound a bound.
        # train: the BPE to learn has at most text.vocab_size tokens.
        vocab = {"char": 1, "train": cfg.text.vocab_size}.get(spec) or tokenizers.load(spec).vocab_size
        with torch.device("meta"):
            model = gpt(vocab, cfg.gpt)
    except (GradtuneError, ValueError):  # a bad tokenizer or shape: the builder says which
        return None
    c = model.config
    block = c.n_embd if c.activation_checkpointing else 8 * c.n_embd + MLP_SAVED[c.mlp] * c.intermediate_size
    micro = _micro(cfg)
    tokens = micro * c.block_size if micro else 0
    per_token = c.n_layer * block + 2 * vocab
    p = model.num_params()
    return estimate(cfg, p, p, per_token, tokens, f"a {_count(p)}-parameter gpt")


# Bytes per weight of a quantised linear layer: the codes plus one float32 scale per block of 64
# (a GGUF tensor in Q4_0 / Q4_1 / Q8_0 keeps its own blocks instead: its bytes in the file).
QUANT_BYTES = {"int8": 1 + 4 / 64, "nf4": 0.5 + 4 / 64}
# Tensors quantize leaves in float: embeddings and output heads, under HF's and GGUF's names (GGUF's
# untied head is the whole name "output.weight"). A name missed here counts as quantised, which
# keeps the estimate a lower bound.
FLOAT_2D = ("embed", "wte", "wpe", "token_embd", "position_embd", "lm_head")


def _tensor_sizes(folder: Path, gguf: Optional[str]) -> list[tuple[str, int, int, Optional[int]]]:
    """(name, dimensions, elements, bytes if quantize keeps its GGUF blocks else None) of every
    tensor, from file headers only."""
    if gguf is None:
        return [
            (name, len(shape), math.prod(shape), None)
            for f in sorted(folder.glob("*.safetensors"))
            for name, (shape, _) in hf.safetensors_shapes(f).items()
        ]
    try:
        index = read_index(folder / gguf)
    except hf.LOAD_ERRORS:  # the builder names a corrupt file
        return []
    return [
        (t.name, len(t.shape), t.n_elements, t.n_bytes if t.type_name in GGUF_BLOCKS else None) for t in index.tensors
    ]


def quantized_weights(cfg: Config, folder: Path, gguf: Optional[str]) -> Optional[tuple[int, float]]:
    """(parameter count, bytes of the weights held quantised per ``cfg.quantize``), or None."""
    sizes = _tensor_sizes(folder, gguf)
    if not sizes:
        return None
    quant = [
        (n, kept)
        for name, dims, n, kept in sizes
        if dims == 2 and name != "output.weight" and not any(k in name for k in FLOAT_2D)
    ]
    params = sum(s[2] for s in sizes)
    held = sum(n * QUANT_BYTES[cfg.quantize] if kept is None else kept for n, kept in quant)
    return params, held + (params - sum(n for n, _ in quant)) * _bytes(cfg)


def _pretrained_estimate(cfg: Config) -> Optional[Estimate]:
    """A pretrained folder (safetensors header sizes, config.json) or .gguf file (its size)."""
    try:
        folder, gguf = hf.resolve(cfg.model)
        params = hf.parameter_count(cfg.model)
        config: dict[str, Any] = {} if gguf else hf.read_config(folder)
    except GradtuneError:  # the builder reports a bad source
        return None
    if gguf:  # quantised: at least one weight per 4 bytes of file (float32, the densest case)
        params //= 4
    quant = quantized_weights(cfg, folder, gguf) if cfg.quantize != "none" else None
    if quant is not None:
        params = quant[0]
    body = body_method(cfg.method)
    trainable = params if body == "full" else 0
    tokens = 0
    per_token = 0.0
    width, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    causal = cfg.task == "causal_lm" or (cfg.task == "auto" and cfg.data.endswith(".txt")) or cfg.text.packing
    if isinstance(width, int) and isinstance(layers, int) and body != "head" and causal and _micro(cfg):
        # Causal-LM and packed windows are exactly max_length tokens; other tasks pad to the batch's longest.
        tokens = _micro(cfg) * cfg.text.max_length
        per_token = layers * (width if cfg.finetune.activation_checkpointing else 8 * width)
    what = (
        f"the model {cfg.model} (at least {_count(params)} parameters)"
        if gguf
        else f"the {_count(params)}-parameter model {cfg.model}"
    )
    est = estimate(cfg, params, trainable, per_token, tokens, what)
    if quant is not None:
        est.load, est.weights = est.weights, quant[1] / _sharding(cfg)
        est.what += f", held {cfg.quantize}"
    est.smaller = "use a smaller model or a method that trains fewer weights (lora, head)"
    return est


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def refuse_if_too_big(cfg: Config, est: Optional[Estimate]) -> None:
    """The check itself: one line with the estimate and the available memory when it cannot fit."""
    if est is None or os.environ.get(SWITCH, "1") == "0":
        return
    device = distributed.device(resolve_device(cfg.device))
    free = available(device)
    if free is None or est.total <= free:
        return
    fixed = est.weights + est.gradients + est.optimizer
    advice = est.smaller if fixed > free else "use a smaller micro_batch_size or activation checkpointing"
    if est.load > free:
        raise GradtuneError(
            f"memory: loading {est.what} needs at least {est.load / GIB:.1f} GiB (the float "
            f"weights, before they are quantised) but {device.type} has {free / GIB:.1f} GiB "
            f"available; {est.smaller} ({SWITCH}=0 skips this check)"
        )
    opt = {"adamw": "AdamW moments", "sgd": "momentum", "muon": "Muon/AdamW state"}.get(cfg.optimizer, "optimizer")
    raise GradtuneError(
        f"memory: {est.what} needs at least {est.total / GIB:.1f} GiB to train (weights "
        f"{est.weights / GIB:.1f} + gradients {est.gradients / GIB:.1f} + {opt} {est.optimizer / GIB:.1f} + "
        f"activations {est.activations / GIB:.1f}) but {device.type} has {free / GIB:.1f} GiB available; "
        f"{advice} ({SWITCH}=0 skips this check)"
    )


def check(cfg: Config, kind: str) -> None:
    """Preflight for a BUILDERS kind, before its builder reads data or builds a model. Tables are
    checked by their builder (``check_tabular``): their size depends on the data's columns."""
    if kind == "gpt":
        refuse_if_too_big(cfg, _gpt_estimate(cfg))
    elif kind == "pretrained":
        refuse_if_too_big(cfg, _pretrained_estimate(cfg))


def check_tabular(cfg: Config, n_features: int, n_outputs: int, n_rows: int) -> None:
    """Linear / MLP on a table: (in + 1) * out weights per layer; a micro-batch keeps each
    layer's input and output per row, plus the outputs' loss terms."""
    widths = [n_features, *(cfg.hidden if cfg.model == "mlp" else []), n_outputs]
    params = sum((a + 1) * b for a, b in zip(widths, widths[1:]))
    rows = _micro(cfg) or n_rows
    refuse_if_too_big(
        cfg,
        estimate(cfg, params, params, sum(widths) + 2 * n_outputs, rows, f"a {_count(params)}-parameter {cfg.model}"),
    )
