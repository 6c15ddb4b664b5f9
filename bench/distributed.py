"""Scaling on torch.distributed: tokens/s of the one loop on a small GPT, and the share of a step
spent in gradient communication (the step timed again with a DDP hook that communicates nothing).

    torchrun --nproc_per_node 1 bench/distributed.py      # then --nproc_per_node 2, ...

The global batch is fixed (batch_size), so N processes each compute 1/N of it: ideal scaling
is N times the tokens/s. The small GPT is the test's causal transformer at a larger width.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
from distributed_worker import TinyGPT, TokenLoss  # noqa: E402

from gradtune import distributed  # noqa: E402
from gradtune.config import load_config  # noqa: E402
from gradtune.data.dataset import TensorDataset  # noqa: E402
from gradtune.jobs.job import Job  # noqa: E402
from gradtune.loop.loop import Loop  # noqa: E402
from gradtune.telemetry.metrics_log import MetricsLog  # noqa: E402

T, STEPS, BATCH = 64, int(os.environ.get("STEPS", "12")), 16


def _local_hook(group, bucket):  # DDP hook that keeps the local gradient: no communication
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def timed(comm: bool) -> float:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (256, T + 1), generator=g)
    torch.manual_seed(0)
    model = TinyGPT(vocab=256, block=T, d=128, n_layer=4, n_head=4)
    job = Job(model, TokenLoss(), TensorDataset(input_ids=ids[:, :-1], labels=ids[:, 1:]), None, "lm")
    cfg = load_config(
        None,
        [
            "optimizer=adamw",
            "lr=0.001",
            f"batch_size={BATCH}",
            f"max_steps={STEPS + 2}",
            "progress=off",
            "device=cpu",
            "distributed=ddp",
            f"eval_every={10**6}",
        ],
    )
    saved = distributed._sum_hook
    if not comm:
        distributed._sum_hook = _local_hook
    loop = Loop(job, cfg, None, MetricsLog(None))
    distributed._sum_hook = saved
    loop.total = 2  # warm-up steps, not timed
    loop.run()
    loop.total = STEPS + 2
    t0 = time.perf_counter()
    loop.run()
    return time.perf_counter() - t0


def allreduce_ms(numel: int, repeats: int = 10) -> float:
    """One blocking all-reduce of a gradient-sized float32 buffer: the communication a step
    needs if none of it overlapped with backward."""
    buf = torch.ones(numel)
    torch.distributed.all_reduce(buf)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.distributed.all_reduce(buf)
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    distributed.init(torch.device("cpu"), 300)
    n = distributed.world_size()
    with_comm = timed(True)
    without = timed(False) if n > 1 else with_comm
    numel = sum(p.numel() for p in TinyGPT(vocab=256, block=T, d=128, n_layer=4, n_head=4).parameters())
    raw = allreduce_ms(numel) if n > 1 else 0.0
    if distributed.is_main():
        tokens = STEPS * BATCH * T
        share = max(with_comm - without, 0.0) / with_comm
        print(
            f"processes={n} tokens/s={tokens / with_comm:.0f} step={with_comm / STEPS * 1e3:.1f}ms "
            f"comm_share={share:.1%} (step without communication {without / STEPS * 1e3:.1f}ms; "
            f"one blocking all-reduce of all {numel} gradients {raw:.1f}ms = "
            f"{raw / (with_comm / STEPS * 1e3):.1%} of a step)"
        )
    distributed.shutdown()


if __name__ == "__main__":
    main()
