"""``gradtune predict RUN --data FILE [--out preds.csv]``: a finished run's predictions on new rows.

For tabular runs (linear, logistic, mlp) and text classification / regression fine-tuning runs.
FILE is read like training's data with training's transforms (standardisation, tokenizer); its
target / label column may be missing (new rows) and is ignored when present. One CSV row per
input row, in file order:

    regression       prediction                       in the target's own units
    classification   prediction,p_<class>,...         the class name, then P(class) per class
                                                      (softmax; sigmoid for a one-logit bce run)

``--id-column COL`` and ``--keep-columns C1,C2`` copy input columns (as written in FILE) in
front of the predictions, so rows can be matched by id rather than by order.

Without ``--out`` the CSV goes to stdout; with it, the file is written atomically, never over the
input file or a file of the run, nor over a file gradtune did not write unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
from torch import nn

from gradtune.data import table_rows
from gradtune.data.dataset import Dataset
from gradtune.data.text_tasks import read_rows
from gradtune.datasets import EMBEDDED, embedded_path
from gradtune.jobs.reload import Run, load_run, run_folder, run_inputs, run_task, target_units
from gradtune.loop.eval_chunk import choose, probe, room_for_run
from gradtune.objectives.logits import forward
from gradtune.runtime import outfile
from gradtune.runtime.device import autocast
from gradtune.runtime.errors import GradtuneError

Carried = tuple[list[str], list[list[str]]]  # (column names, cells of each row)
TABLE_BATCH = 256  # table rows per forward: a tabular model's forward is a few small matmuls

HELP = "predict with a finished tabular or text classification/regression run (CSV out)"


def setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run's out_dir (or a checkpoint folder inside it)")
    p.add_argument(
        "--data", required=True, help="rows in the training data's format; the target / label column may be left out"
    )
    p.add_argument("--out", default=None, help="CSV file to write (default: stdout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file gradtune did not write")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="rows per forward pass (default: texts as eval chooses, within the run's training peak; tables 256)",
    )
    p.add_argument(
        "--id-column",
        default=None,
        metavar="COL",
        help="copy this input column first in each output row (default: none)",
    )
    p.add_argument(
        "--keep-columns",
        default=None,
        metavar="C1,C2",
        help="copy these input columns into the output, after the id (default: none)",
    )


def _check_out(out: Optional[str], data: str, folder: Path) -> None:
    """Refuse an --out that would overwrite the input or a file of the run."""
    if out is None:
        return
    target = Path(out).resolve()
    if target == Path(data).resolve():
        raise GradtuneError(f"predict: --out {out} is the --data file; write the predictions elsewhere")
    run = folder.resolve()
    if target == run or run in target.parents:
        raise GradtuneError(f"predict: --out {out} is inside the run folder {folder}; write the predictions elsewhere")


def _carried_names(args: argparse.Namespace) -> list[str]:
    """--id-column then --keep-columns, each once."""
    keep = [c.strip() for c in (args.keep_columns or "").split(",") if c.strip()]
    if args.keep_columns is not None and not keep:
        raise GradtuneError("predict: --keep-columns is empty; give column names separated by commas")
    return list(dict.fromkeys(([args.id_column] if args.id_column else []) + keep))


def input_columns(r: Run, path: str, names: list[str], n: int) -> Carried:
    """(names, one list of cells per input row) of the input columns to copy into the output,
    read with the row reader the run's data uses (rows in the same order, blank ones skipped
    alike); a column not in the file is one line naming it."""
    if r.kind == "pretrained":
        rows = read_rows(path, r.cfg.text.columns, r.cfg.text.label_column)
    else:
        rows = table_rows.read_rows(embedded_path(path) if path in EMBEDDED else Path(path))[1]
    present = set().union(*(row.keys() for _, row in rows)) if rows else set()
    for name in names:
        if name not in present:
            known = ", ".join(map(str, rows[0][1])) if rows else ""
            raise GradtuneError(f"predict: {path}: no column {name!r} to carry into the output (columns: {known})")
    if len(rows) != n:
        raise GradtuneError(f"predict: {path}: {len(rows)} rows but {n} inputs; cannot match them to carry columns")
    return names, [["" if row.get(c) is None else str(row.get(c)) for c in names] for _, row in rows]


class _Forward:
    """What ``probe`` measures for predict: the forward alone (its rows carry no labels for an
    objective to score), the logits held as ``probe`` holds a loss."""

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> SimpleNamespace:
        return SimpleNamespace(loss_sum=forward(model, batch))


@torch.no_grad()
def outputs(model: nn.Module, data: Dataset, batch: int) -> torch.Tensor:
    """The model's raw outputs for every sample of ``data``, in its order: (N, out) float64.
    Sequences go through in length order (each batch pads only to its own longest)."""
    lengths = getattr(data, "lengths", None)
    order = torch.argsort(lengths, stable=True) if lengths is not None else torch.arange(len(data))
    out: Optional[torch.Tensor] = None
    for idx in order.split(batch):
        logits = forward(model, data.get(idx)).detach().double().reshape(len(idx), -1)
        if out is None:
            out = torch.empty(len(data), logits.shape[1], dtype=torch.float64)
        out[idx] = logits
    assert out is not None  # a dataset has at least one row (empty files are refused)
    return out


def probabilities(logits: torch.Tensor, bce: bool) -> torch.Tensor:
    """(N, C) class probabilities: softmax over C logits; a bce run's one logit is
    P(class 1) = sigmoid(z)."""
    if bce:
        z = logits[:, 0]
        return torch.stack([torch.sigmoid(-z), torch.sigmoid(z)], dim=1)
    return torch.softmax(logits, dim=1)


def table(r: Run, logits: torch.Tensor, carried: Optional[Carried] = None) -> str:
    """The predictions CSV (header + one line per row), after the carried input columns."""
    names, values = carried or ([], [[] for _ in range(len(logits))])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if r.task == "regression":
        w.writerow([*names, "prediction"])
        w.writerows([*c, repr(v)] for c, v in zip(values, target_units(r, logits[:, 0]).tolist()))
        return buf.getvalue()
    classes = r.classes or []
    probs = probabilities(logits, r.info.get("loss") == "bce")
    if probs.shape[1] != len(classes):
        raise GradtuneError(
            f"{r.folder}: the model has {probs.shape[1]} outputs but the run names {len(classes)} classes"
        )
    w.writerow([*names, "prediction", *(f"p_{c}" for c in classes)])
    for c, k, row in zip(values, probs.argmax(1).tolist(), probs.tolist()):
        w.writerow([*c, classes[k], *map(repr, row)])
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:
    if args.batch_size is not None and args.batch_size < 1:
        raise GradtuneError(f"predict: --batch-size must be >= 1, got {args.batch_size}")
    if run_task(args.run) == "lm":
        raise GradtuneError(
            f"predict: {args.run} is a language model, it has no rows to predict; "
            f"sample text with `gradtune generate {args.run}`"
        )
    _check_out(args.out, args.data, run_folder(Path(args.run)))
    names = _carried_names(args)
    if args.out is not None:  # a folder, a device, a file of the user's (without --overwrite): refused
        outfile.check(args.out, args.overwrite, "predict: --out")
    r = load_run(args.run, inference_only=True)
    data = run_inputs(r, args.data)
    carried = input_columns(r, args.data, names, len(data)) if names else None
    cpu = torch.device("cpu")
    # The run's precision, as eval and training's validation computed: predictions agree with eval's metrics.
    amp = autocast(r.cfg.precision, cpu)
    chunk = args.batch_size or TABLE_BATCH
    if args.batch_size is None and getattr(data, "lengths", None) is not None:  # texts: as eval chooses
        chunk = choose(room_for_run(r.info, cpu), probe(r.model, _Forward(), data, cpu, amp), len(data), cpu)
    with amp:
        logits = outputs(r.model, data, chunk)
    text = table(r, logits, carried)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    outfile.write(args.out, text)  # staged rename, through a symlink, not over it
    print(f"predict: {len(data)} rows -> {args.out}")
    return 0
