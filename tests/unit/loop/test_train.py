"""The loop end to end: outputs, determinism, convergence, metrics, the CLI and lr-find."""

import json

import torch
from safetensors.torch import load_file

from gradtune.cli import main
from gradtune.config import load_config
from gradtune.train import train


def test_outputs_and_determinism(tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = load_config(
            None, ["model=mlp", "batch_size=16", "epochs=3", "progress=off", "seed=7", f"out_dir={tmp_path / name}"]
        )
        runs.append(train(cfg))
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for f in ("metrics.jsonl", "summary.json", "config.yaml", "loss.png"):
        assert (tmp_path / "a" / f).is_file(), f
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert len(evals) == 3 and {"loss", "rmse", "val_loss", "val_rmse", "val_r2"} <= evals[-1].keys()
    assert not any(k.startswith("_orig_mod") or k.startswith("module.") for k in a)


def test_seed_changes_the_run(tmp_path):
    r1 = train(load_config(None, ["model=mlp", "epochs=2", "progress=off", "seed=1", f"out_dir={tmp_path / '1'}"]))
    r2 = train(load_config(None, ["model=mlp", "epochs=2", "progress=off", "seed=2", f"out_dir={tmp_path / '2'}"]))
    assert r1.train_loss != r2.train_loss


def test_classification_reports_accuracy(tmp_path):
    cfg = load_config(
        None,
        [
            "model=logistic",
            "data=breast_cancer",
            "batch_size=32",
            "lr=0.1",
            "epochs=20",
            "progress=off",
            f"out_dir={tmp_path}",
        ],
    )
    r = train(cfg)
    assert r.metrics["val_accuracy"] > 0.93 and r.info["classes"] == ["benign", "malignant"]


def test_tol_and_grad_tol_stop_and_say_why(tmp_path):
    base = [
        "model=linear",
        "batch_size=full",
        "lr=0.2",
        "epochs=100000",
        "progress=off",
        "plot=false",
        "standardize_target=true",
        f"out_dir={tmp_path}",
    ]
    r = train(load_config(None, base + ["tol=1e-6", "patience=3"]))
    assert r.stop_reason.startswith("converged (loss improved") and r.steps < 100000
    r = train(load_config(None, base + ["grad_tol=1e-3"]))
    assert r.stop_reason.startswith("converged (gradient norm")


def test_too_large_lr_is_reported_as_diverged(tmp_path):
    r = train(
        load_config(
            None,
            [
                "model=linear",
                "batch_size=full",
                "lr=0.5",
                "epochs=2000",
                "progress=off",
                "standardize_target=true",
                "plot=false",
                f"out_dir={tmp_path}",
            ],
        )
    )
    assert r.stop_reason.startswith("diverged") and r.steps < 2000


def test_init_from_weights_file(tmp_path):
    first = train(load_config(None, ["model=mlp", "epochs=5", "progress=off", f"out_dir={tmp_path / 'a'}"]))
    again = train(
        load_config(
            None,
            [
                "model=mlp",
                "epochs=1",
                "lr=1e-12",
                "progress=off",
                f"init={tmp_path / 'a' / 'model.safetensors'}",
                f"out_dir={tmp_path / 'b'}",
            ],
        )
    )
    assert abs(again.val_loss - first.val_loss) / first.val_loss < 1e-4


def test_cli_train_and_lr_find(tmp_path, capsys):
    assert main(["train", "model=linear", "epochs=2", "progress=off", f"out_dir={tmp_path / 't'}"]) == 0
    assert "stopped: budget reached" in capsys.readouterr().out
    assert (
        main(["lr-find", "model=linear", "batch_size=32", "standardize_target=true", f"out_dir={tmp_path / 'f'}"]) == 0
    )
    out = capsys.readouterr().out
    lr = float(out.split("suggested lr = ")[1].split()[0])
    assert 0.005 < lr < 0.3  # stable rates for standardised diabetes lie below 2 / lambda_max ~ 0.25
    assert (tmp_path / "f" / "lr_find.png").is_file()
