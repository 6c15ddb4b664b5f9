"""The 10-minute recipe against nanoGPT's defaults at equal wall time, on the same data and split.

Both sides are ``gradtune train`` runs of the same ``max_time`` (the budget counts start-up,
evaluations and outputs; each run fixes its step count from its own measured pace, so its cosine
reaches min_lr when the time runs out), one after the other, never together:

  ours   configs/gpt-shakespeare.yaml as it is: its own BPE learnt from the training plays,
         Llama-family block (RoPE, RMSNorm, SwiGLU, QK-norm), 4L x 192, 2 KV heads, Muon + AdamW,
         ``precision: auto`` (bf16 where the probe finds it faster), cosine, batch 8 x 256.
  peer   nanoGPT's defaults as a gradtune run: the GPT-2 block (learned positions, LayerNorm, GELU
         MLP 4x, full multi-head attention), AdamW with nanoGPT's shakespeare_char settings (lr 1e-3,
         betas (0.9, 0.99), weight decay 0.1, warm-up 100 capped like ours to 10% of the steps,
         cosine to lr/10, gradient clipping 1.0), fp32 as the issue asks; everything else the
         recipe's: the same embedded Shakespeare, the last 5% held out, the same schedule of
         evaluations, the same width, depth, context and batch, dropout 0, so that only the
         tokenizer (bytes, as nanoGPT's shakespeare_char reads characters), the block, the
         optimizer and the precision differ.

nanoGPT's own shakespeare_char shape (6L x 384, 6 heads, batch 64 x 256, dropout 0.2) takes about
10 s a step on 2 CPU cores, some 60 steps in 10 minutes: ``--peer-shape nanogpt`` runs it anyway
(for a GPU, or to show that the shape is what loses on a CPU), the default keeps ours' shape.
Left as gradtune has it: the GPT-2 block keeps its biases (nanoGPT's train.py sets bias=False)
and GELU is the tanh form (nanoGPT's is exact); weight decay falls on every matrix, the embedding
and the position table included, and on no bias or norm, as in nanoGPT.

``--same-precision`` adds a third side, the peer at ours' precision (bf16 when the probe chose it):
a lead that comes from precision alone is not a lead. It is skipped when ours ran fp32 (the peer
already is). ``--repeats N`` runs every side N times, the order rotating each repetition (ours
first in the first, so its precision is known); the comparisons are printed per repetition and
as medians.

How it measures. Every evaluation row in metrics.jsonl carries ``time``, seconds since the log
opened, just before the first step; summary.json's ``job.time_budget.plan.startup_s`` is the
start-up before it on the ``max_time`` clock (process start: imports, data, the precision probe),
so a row's elapsed wall seconds are ``startup_s + time``, the clock ``max_time`` counts (ours'
precision probe is charged to ours; a cached answer costs nothing). Intermediate evaluations use
one fixed, seeded sample of the validation windows (``eval_tokens``: the same windows on both
sides when they share a tokenizer; ours' BPE windows hold ~3x the bytes of the peer's, a larger
sample of the same held-out plays); the final one is the full pass. The two sets do not give the
same loss, so each comparison stays on one set:

  final          each side's full-pass validation loss per byte (ours' ``val_nats_per_byte``, the
                 byte tokenizer's nats per token) at its own end, both inside the same ``max_time``
  equal seconds  on the sampled curves, both read at the same elapsed seconds (linear between
                 evaluations): the peer's last sampled evaluation, or ours' if ours ended first
  to target      the seconds ours needed to reach the peer's last sampled loss (first crossing of
                 ours' sampled curve, interpolated; "not reached" otherwise), and the peer's
                 seconds over ours

  python bench/nanogpt.py                      # 10 minutes a side, ~21 minutes in all
  python bench/nanogpt.py --same-precision     # + the peer at ours' precision, ~31 minutes
  python bench/nanogpt.py --minutes 0.5 --keep # smoke run; the runs stay in the printed folder
  python bench/nanogpt.py --set eval_every=100 # a setting for every side (a denser curve)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

import torch  # noqa: E402

RECIPE = ROOT / "configs" / "gpt-shakespeare.yaml"
# nanoGPT's train.py defaults with config/train_shakespeare_char.py's overrides that apply here.
PEER = [
    "gpt.family=gpt2",
    "gpt.n_kv_head=null",
    "optimizer=adamw",
    "lr=1e-3",
    "betas=[0.9,0.99]",
    "weight_decay=0.1",
    "text.tokenizer=byte",
    "warmup_steps=100",
    "schedule=cosine",
    "min_lr=1e-4",
    "clip_grad_norm=1.0",
]
NANOGPT_SHAPE = ["gpt.n_layer=6", "gpt.n_head=6", "gpt.n_embd=384", "batch_size=64", "gpt.dropout=0.2"]


@dataclass
class Run:
    """One finished ``gradtune train``: what the comparison needs from its folder."""

    side: str
    precision: str
    why: str  # how the precision was chosen ("pinned" or the probe's reason)
    steps: int
    wall_s: float  # the child process, as this script timed it
    startup_s: float
    curve: list[tuple[float, float]]  # (elapsed s, val loss) of the sampled evaluations
    final: tuple[float, float]  # (elapsed s, val loss) of the final evaluation
    final_full: bool  # the final evaluation was the full pass (not a sample that fits the budget)


def side_args(side: str, minutes: float, shape: str, precision: Optional[str], extra: list[str]) -> list[str]:
    args = [str(RECIPE), f"max_time={round(minutes * 60)}s"]
    if side != "ours":
        args += PEER + (NANOGPT_SHAPE if shape == "nanogpt" else [])
        args.append(f"precision={precision or 'fp32'}")
    return args + extra


def train(side: str, args: list[str], folder: Path) -> Run:
    """Runs one side into ``folder`` and reads it back; exits with the child's stderr on failure."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    env.pop("GRADTUNE_BUDGET_SCALE", None)  # the README harness's budget shrink would distort both sides
    cmd = [sys.executable, "-m", "gradtune", "train", *args, f"out_dir={folder}", "progress=off"]
    print(f"  {side}: gradtune train {' '.join(a.replace(str(ROOT) + '/', '') for a in args)}", flush=True)
    t = time.perf_counter()
    with open(folder.with_suffix(".log"), "w") as log:
        done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t
    if done.returncode:
        tail = folder.with_suffix(".log").read_text().strip().splitlines()[-15:]
        raise SystemExit(f"{side} failed (exit {done.returncode}):\n" + "\n".join(tail))
    return read_run(side, folder, wall)


def read_run(side: str, folder: Path, wall: float) -> Run:
    summary = json.loads((folder / "summary.json").read_text())
    job = summary["job"]
    startup = float(job.get("time_budget", {}).get("plan", {}).get("startup_s", 0.0))
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [(r, startup + float(r["time"])) for r in rows if r.get("kind") == "eval" and "val_loss" in r]
    for r, _ in evals:  # per byte: a BPE run's val_nats_per_byte, a byte run's val_loss
        r["val_loss"] = r.get("val_nats_per_byte", r["val_loss"])
    if not evals:
        raise SystemExit(f"{side}: no evaluation in {folder / 'metrics.jsonl'}")
    last, end = evals[-1]
    sample = [(t, float(r["val_loss"])) for r, t in evals[:-1] if "val_samples" in r]
    prec = job.get("precision") or {}
    precision = prec.get("precision") if isinstance(prec, dict) else str(prec)
    if not precision:
        precision = json.loads((folder / "run.json").read_text()).get("precision", "?")
    why = prec.get("why", "pinned") if isinstance(prec, dict) else "pinned"
    full = "val_samples" not in last
    return Run(side, str(precision), why, int(summary["steps"]), wall, startup, sample, (end, last["val_loss"]), full)


def at(curve: list[tuple[float, float]], t: float) -> tuple[Optional[float], str]:
    """The curve's loss at ``t`` seconds, linear between evaluations; (loss, a note when clamped)."""
    if not curve:
        return None, "no sampled evaluation"
    if t < curve[0][0]:
        return None, f"no evaluation by then (its first at {curve[0][0]:.1f} s)"
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if t <= t1:
            return l0 + (l1 - l0) * (t - t0) / (t1 - t0), ""
    return curve[-1][1], f"its last sampled evaluation, at {curve[-1][0]:.1f} s"


def crossing(curve: list[tuple[float, float]], target: float) -> Optional[float]:
    """Seconds at which the curve first reaches ``target`` (linear between evaluations); None: never."""
    prev = None
    for t, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return t
            return prev[0] + (t - prev[0]) * (prev[1] - target) / (prev[1] - loss)
        prev = (t, loss)
    return None


def compare(ours: Run, peer: Run) -> dict[str, Optional[float]]:
    """The figures of one pair: finals, equal seconds on the sampled curve, time to the peer's loss."""
    print("    final (nats/byte): ", end="")
    print(
        f"ours {ours.final[1]:.4f} at {ours.final[0]:.1f} s, {peer.side} {peer.final[1]:.4f} at {peer.final[0]:.1f} s",
        end="",
    )
    print(f"  (ours - peer {ours.final[1] - peer.final[1]:+.4f})")
    sampled = [r.side for r in (ours, peer) if not r.final_full]
    if sampled:  # each side's sample is sized to its own evaluation speed: not the same windows
        print(f"    ({' and '.join(sampled)}: the final evaluation was a sample that fits the budget, not the full")
        print("     pass; the two finals are not on the same windows: a longer --minutes)")
    out: dict[str, Optional[float]] = {"final_delta": ours.final[1] - peer.final[1]}
    if not peer.curve:
        print("    the peer has no sampled evaluation: no curve to compare (a longer --minutes)")
        return out
    t_peer, l_peer = peer.curve[-1]
    # Both curves read where both runs were still evaluating: the peer's last sampled evaluation,
    # or ours' when ours ended first (a run that has stopped is not a run at that loss).
    t_eq = min(t_peer, ours.curve[-1][0]) if ours.curve else t_peer
    (mine, my_note), (theirs, their_note) = at(ours.curve, t_eq), at(peer.curve, t_eq)
    which = "the peer's last sampled evaluation" if t_eq == t_peer else "ours' last sampled evaluation"
    if mine is None or theirs is None:
        who, why = ("ours", my_note) if mine is None else (peer.side, their_note)
        print(f"    equal seconds ({t_eq:.1f} s, {which}): {who} has {why}")
    else:
        print(f"    equal seconds ({t_eq:.1f} s, {which}): ours {mine:.4f}, {peer.side} {theirs:.4f}", end="")
        print(f"  (ours - peer {mine - theirs:+.4f})")
        out["equal_delta"] = mine - theirs
    reach = crossing(ours.curve, l_peer)
    if reach is None:
        print(f"    to the peer's {l_peer:.4f}: not reached by ours' last sampled evaluation")
    else:
        first = " (at most: its first evaluation)" if reach == ours.curve[0][0] else ""
        print(f"    to the peer's {l_peer:.4f}: ours {reach:.1f} s{first}, {peer.side} {t_peer:.1f} s ", end="")
        print(f"({t_peer / reach:.2f}x as fast)")
        out["ratio"] = t_peer / reach
    return out


def describe(r: Run) -> str:
    return (
        f"  {r.side:<10} {r.precision} ({r.why}), {r.steps:,} steps, {r.wall_s:.1f} s in all "
        f"(start-up {r.startup_s:.1f} s), final val {r.final[1]:.4f} nats/byte"
        f"{'' if r.final_full else ' (sampled final)'}, {len(r.curve)} sampled evaluations"
    )


def order(sides: list[str], rep: int) -> list[str]:
    """Rotate the sides each repetition (ours first in the first)."""
    k = rep % len(sides)
    return sides[k:] + sides[:k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="max_time of every run (default 10)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per side, order rotated (default 1)")
    ap.add_argument("--same-precision", action="store_true", help="also run the peer at ours' precision")
    ap.add_argument("--peer-shape", choices=["recipe", "nanogpt"], default="recipe", help="the peer's shape")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting for every side")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (printed) instead of deleting them")
    args = ap.parse_args()
    if args.minutes <= 0 or args.repeats < 1:
        ap.error("--minutes must be > 0 and --repeats >= 1")
    root = Path(tempfile.mkdtemp(prefix="gradtune-nanogpt-"))
    print(
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    load0 = os.getloadavg()
    print(f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; max_time {args.minutes:g} min a run")
    sides = ["ours", "peer"] + (["peer-same"] if args.same_precision else [])
    runs: dict[str, list[Run]] = {s: [] for s in sides}
    try:
        for rep in range(args.repeats):
            print(f"repetition {rep + 1}/{args.repeats}:")
            for side in order(sides, rep):
                precision = None
                if side == "peer-same":
                    precision = runs["ours"][-1].precision  # ours ran first in the first repetition
                    if precision == "fp32":
                        print("  peer-same: skipped (ours ran fp32: the peer already runs at its precision)")
                        continue
                cmd = side_args(side, args.minutes, args.peer_shape, precision, args.set)
                run = train(side, cmd, root / f"{side}-{rep}")
                runs[side].append(run)
                print(describe(run), flush=True)
        report(runs, args.peer_shape)
    finally:
        load1 = os.getloadavg()
        print(f"load average after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
        if args.keep:
            print(f"runs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def report(runs: dict[str, list[Run]], shape: str) -> None:
    ours = runs["ours"]
    print(
        f"ours: the recipe, {ours[0].precision} ({ours[0].why}); peer: nanoGPT's defaults ("
        f"{'6L x 384, batch 64, dropout 0.2' if shape == 'nanogpt' else 'the recipe shape'}), fp32 as the issue asks"
    )
    if ours[0].precision != "fp32":
        print(f"  ours runs {ours[0].precision} and the peer fp32: part of any lead is precision (--same-precision)")
    for peer_side in [s for s in runs if s != "ours" and runs[s]]:
        found = []
        for i, (o, p) in enumerate(zip(ours, runs[peer_side])):
            print(f"ours vs {peer_side} ({p.precision}), repetition {i + 1}:")
            found.append(compare(o, p))
        if len(found) > 1:
            for key, label in (("final_delta", "final ours - peer"), ("equal_delta", "equal seconds ours - peer")):
                vals = [f[key] for f in found if f.get(key) is not None]
                if vals:
                    print(f"  median {label}: {statistics.median(vals):+.4f} (of {len(vals)})")
            ratios = [f["ratio"] for f in found if f.get("ratio") is not None]
            reached = f"{statistics.median(ratios):.2f}x as fast (of {len(ratios)})" if ratios else "not reached"
            print(f"  median time to the peer's loss: {reached}")


if __name__ == "__main__":
    main()
