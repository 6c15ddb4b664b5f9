"""Runs under torchrun for tests/e2e/test_distributed.py (and in one process, as the oracle).

    torchrun --nproc_per_node N tests/e2e/distributed_worker.py OUT SUITE

Every case builds the same seeded job, trains it with the one loop, and rank 0 writes the final
unwrapped weights to OUT/w<N>_<case>.safetensors; the test compares them with the 1-process run.
Each rank also writes OUT/threads<R>.json: its thread count once the process group is gone.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gradtune.config import Config, load_config
from gradtune.data.dataset import TensorDataset
from gradtune.jobs.job import Job
from gradtune.jobs.registry import build
from gradtune.loop.fit import fit
from gradtune.loop.loop import Loop
from gradtune.objectives import losses
from gradtune.objectives.output import Output
from gradtune.runtime import distributed, rank_zero
from gradtune.state import checkpoint, resume
from gradtune.telemetry.metrics_log import MetricsLog

COMMON = ["progress=off", "plot=false", "device=cpu", "seed=3"]


# --- a tiny causal transformer (the package's GPT lives in gradtune/models/gpt.py) ---------------
class Block(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        # No qkv bias: the key bias has an exactly zero gradient (softmax is shift-invariant), and
        # AdamW would turn its rounding noise into full-size steps that differ between runs.
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.n_head)  # (B, h, T, T)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 32, block: int = 8, d: int = 16, n_layer: int = 2, n_head: int = 2) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, vocab)
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


class TokenLoss:
    """Causal LM: sum of token cross-entropies; count = non-ignored tokens (varies per sample)."""

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Output:
        logits = model(batch["input_ids"])
        labels = batch["labels"]
        return Output(losses.cross_entropy(logits, labels, reduction="sum"), (labels != -100).sum())


def gpt_job(n: int = 40, seed: int = 3) -> Job:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (n, 9), generator=g)
    labels = ids[:, 1:].clone()
    labels[torch.rand(labels.shape, generator=g) < 0.25] = -100  # uneven token counts per sample
    torch.manual_seed(seed)
    return Job(TinyGPT(), TokenLoss(), TensorDataset(input_ids=ids[:, :-1], labels=labels), None, "lm")


# --- the cases -----------------------------------------------------------------------------------------
MLP = ["model=mlp", "hidden=8", "dtype=float64", "standardize_target=true", "max_steps=20"]
GPT = ["optimizer=adamw", "lr=0.003", "max_steps=20"]
CASES: dict[str, tuple[str, list[str]]] = {
    "mlp_full": ("mlp", ["batch_size=full", "lr=0.1", "momentum=0.9"]),
    "mlp_full_acc": ("mlp", ["batch_size=full", "micro_batch_size=100", "lr=0.1", "momentum=0.9"]),
    "mlp_sgd": ("mlp", ["batch_size=1", "lr=0.01"]),
    "mlp_mini": ("mlp", ["batch_size=32", "optimizer=adamw", "lr=0.01"]),
    "mlp_mini_acc": ("mlp", ["batch_size=32", "micro_batch_size=5", "optimizer=adamw", "lr=0.01"]),
    "gpt_full": ("gpt", ["batch_size=full"]),
    "gpt_sgd": ("gpt", ["batch_size=1"]),
    "gpt_mini": ("gpt", ["batch_size=8"]),
    "gpt_mini_acc": ("gpt", ["batch_size=8", "micro_batch_size=2", "clip_grad_norm=0.5"]),
    # batch ramps: 2 -> 32 and 1 -> 8 samples (micro-batches smaller than 3 ranks: empty shares)
    "mlp_ramp": ("mlp", ["batch_size=32", "micro_batch_size=5", "batch_ramp_steps=8", "batch_ramp_start=2", "lr=0.01"]),
    "gpt_ramp": ("gpt", ["batch_size=8", "micro_batch_size=2", "batch_ramp_steps=6", "batch_ramp_start=1"]),
    "gpt_muon": ("gpt", ["batch_size=8", "optimizer=muon", "muon_lr=0.02", "weight_decay=0.01", "max_steps=4"]),
    "gpt_fsdp": (
        "gpt",
        ["batch_size=8", "micro_batch_size=4", "clip_grad_norm=0.5", "max_steps=10", "distributed=fsdp"],
    ),
}


def make(case: str, extra: list[str] = ()) -> tuple[Job, Config]:
    kind, settings = CASES[case]
    base = MLP if kind == "mlp" else GPT
    cfg = load_config(None, [*COMMON, *base, *settings, *extra])
    if kind == "mlp":
        return build(cfg), cfg
    job = gpt_job()
    job.model.to(torch.float64 if cfg.dtype == "float64" else torch.float32)
    return job, cfg


def weights(job: Job) -> dict[str, torch.Tensor]:
    return distributed.full_state_dict(job.model)


def save(out: Path, name: str, state: dict[str, torch.Tensor], info: dict | None = None) -> None:
    from safetensors.torch import save_file

    if distributed.is_main():
        save_file(state, str(out / f"{name}.safetensors"))
        if info is not None:
            (out / f"{name}.json").write_text(json.dumps(info))


def plain_grads() -> dict[str, torch.Tensor]:
    """Gradient of the mean loss over 37 samples in micro-batches of 8, through an *unwrapped*
    model (the lr-find path): grad_sync sums the gradients itself."""
    import contextlib

    from gradtune.loop.gradient import accumulate

    job, _ = make("mlp_mini")
    micro = list(torch.arange(37).split(8))
    _, count, _ = accumulate(job.model, job.objective, job.train, micro, torch.device("cpu"), contextlib.nullcontext())
    return {n: p.grad / count for n, p in job.model.named_parameters()}


def loop_for(case: str, steps: int) -> Loop:
    job, cfg = make(case, [f"max_steps={steps}"])
    return Loop(job, cfg, None, MetricsLog(None))


def fsdp_checkpoints(out: Path, tag: str) -> None:
    """The loop's own FSDP2 checkpoints (every rank writes its shards): a 10-step run writing them
    every 5 steps; the same out_dir rerun without step 10's folder resumes from step 5 at this
    world size; step 10's folder, kept as OUT/ckpt10, is read back into a fresh loop."""
    run = out / "fsdp_run"
    job, cfg = make("gpt_fsdp", ["checkpoint_every=5"])
    fit(job, cfg, run)
    last = checkpoint.root(run) / checkpoint.folder_name(10)
    rank_zero.on_main(shutil.copytree, last, out / "ckpt10")
    rank_zero.on_main(shutil.rmtree, last)
    job, cfg = make("gpt_fsdp", ["checkpoint_every=5"])
    fit(job, cfg, run)
    save(out, f"{tag}_resumed", weights(job))
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "resume"] == [5], rows
    fresh = loop_for("gpt_fsdp", 10)
    fresh.restore(resume.latest(checkpoint.root(run)))
    assert fresh.step == 10
    save(out, f"{tag}_reloaded", weights(fresh.job))


def thread_count() -> int:
    """Threads of this process (Linux); -1 where /proc is missing. pyarrow's jemalloc keeps a
    background thread for the process's life (a table read): an allocator's, harmless at exit."""
    task = Path("/proc/self/task")
    if not task.is_dir():
        return -1
    return sum(1 for t in os.listdir(task) if (task / t / "comm").read_text().strip() != "jemalloc_bg_thd")


def main(out: Path, suite: str) -> None:
    torch.set_num_threads(1)
    distributed.init(torch.device("cpu"), float(os.environ.get("GRADTUNE_TEST_TIMEOUT", "60")))
    tag = f"w{distributed.world_size()}"
    parts = {"ddp", "fsdp", "probe"} if suite == "all" else set(suite.split("+"))
    names = [c for c in CASES if c != "gpt_fsdp"] if "ddp" in parts else []
    if "ddp" in parts:
        save(out, f"{tag}_plain_grads", plain_grads())
    for case in names:
        job, cfg = make(case)
        r = fit(job, cfg)
        save(out, f"{tag}_{case}", weights(job), {"loss": r.train_loss, "val_loss": r.val_loss})
    if "fsdp" in parts:
        job, cfg = make("gpt_fsdp")
        fit(job, cfg)
        save(out, f"{tag}_gpt_fsdp", weights(job))
        fsdp_checkpoints(out, tag)
        once = out / "once.txt"  # the rank-0 guard: written once, visible to all after the call
        rank_zero.on_main(lambda: once.write_text(str(distributed.rank())))
        assert once.read_text() == "0"
    if "probe" in parts:
        os.environ["GRADTUNE_TEST_PROBE"] = str(out)
        job, cfg = make("mlp_mini", ["max_steps=null", "epochs=1", "val_fraction=0.21"])
        fit(job, cfg)
        del os.environ["GRADTUNE_TEST_PROBE"]
        save(out, f"{tag}_probe_n", {}, {"n": len(job.train)})
    rank = distributed.rank()
    job = None  # the last sharded model goes before the process group does
    distributed.shutdown()
    gc.collect()
    (out / f"threads{rank}.json").write_text(json.dumps({"threads": thread_count()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
