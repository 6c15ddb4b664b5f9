"""Fine-tuning through the one loop and the CLI, on tiny random models saved to a folder.

Every method trains a tiny BERT classifier end to end (``gradtune train``) and prints its
trainable / total count; a tiny Llama learns instruction responses (prompt tokens masked);
the exported PEFT adapter gives peft's logits within 1e-4 of ours; eval rejects unseen labels.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from gradtune.cli import main  # noqa: E402
from gradtune.jobs.reload import load_run  # noqa: E402
from gradtune.models.bert import BertModel  # noqa: E402
from tests import tiny_hf  # noqa: E402

QUIET = ["progress=off", "plot=false"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """Tiny BERT and Llama folders, a spam/ham CSV and a prompt/response JSONL."""
    d = tmp_path_factory.mktemp("ft")
    tiny_hf.bert(d / "bert")
    tiny_hf.llama(d / "llama")
    rng = random.Random(0)
    rows = ["label,text"]
    for i in range(40):
        words = ["free", "win", "prize", "call", "now"] if i % 2 else ["meet", "me", "at", "home", "ok"]
        rows.append(f"{'spam' if i % 2 else 'ham'},{' '.join(rng.sample(words, 3))}")
    (d / "cls.csv").write_text("\n".join(rows) + "\n")
    pairs = [
        ("what time", "the answer is now"),
        ("hello world", "yes good"),
        ("the question", "no bad"),
        ("call me", "ok at home"),
    ]
    (d / "ins.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs * 2))
    return d


def _evals(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "eval"]


@pytest.mark.parametrize(
    "method,extra",
    [
        ("head", []),
        ("lora", []),
        ("full", []),
        ("freeze", ["freeze.train_last_blocks=1"]),
        ("bitfit", []),
        ("head+lora", []),
    ],
)
def test_train_each_method_on_tiny_bert(assets, tmp_path, capsys, method, extra):
    run = tmp_path / "run"
    rc = main(
        [
            "train",
            f"model={assets / 'bert'}",
            f"data={assets / 'cls.csv'}",
            f"method={method}",
            f"out_dir={run}",
            "epochs=2",
            "batch_size=8",
            *QUIET,
            *extra,
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert f"method {method}: trainable " in out and " parameters (" in out
    trainable, total = [
        int(s.replace(",", "")) for s in out.split("trainable ")[1].split(" parameters")[0].split(" / ")
    ]
    assert 0 < trainable <= total
    assert (trainable > 0.9 * total) == (method == "full")  # full: all but BERT's unused pooler
    last = _evals(run)[-1]
    assert "val_accuracy" in last and "accuracy" in last
    assert json.loads((run / "labels.json").read_text())["labels"] == ["ham", "spam"]
    assert (run / "tokenizer" / "tokenizer.json").is_file() and (run / "model.safetensors").is_file()
    # eval and predict reload the body as gradtune's own encoder: transformers' outputs, bit for bit
    ours, theirs = load_run(run, inference_only=True).model, load_run(run).model
    assert isinstance(ours.body, BertModel) and not isinstance(theirs.body, BertModel)
    ids = torch.tensor([[2, 6, 7, 8, 3, 0], [2, 9, 10, 11, 12, 3]])  # [CLS] words [SEP] [PAD]
    with torch.no_grad():
        assert torch.equal(ours(ids, (ids != 0).long()), theirs(ids, (ids != 0).long()))


def test_instruction_tuning_loss_falls_and_generates(assets, tmp_path, capsys):
    run = tmp_path / "ins"
    rc = main(
        [
            "train",
            f"model={assets / 'llama'}",
            f"data={assets / 'ins.jsonl'}",
            "task=instruction",
            "method=full",
            f"out_dir={run}",
            "epochs=15",
            "batch_size=4",
            "lr=3e-3",
            "val_fraction=0",
            *QUIET,
        ]
    )
    assert rc == 0
    losses = [r["loss"] for r in _evals(run)]
    assert losses[-1] < 0.8 * losses[0], losses
    capsys.readouterr()
    args = ["--prompt", "what time", "--temperature", "0", "--max-new-tokens", "6", "--echo"]
    assert main(["generate", str(run), *args]) == 0
    assert capsys.readouterr().out.startswith("what time")


def test_exported_adapter_loads_in_peft_with_our_logits(assets, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    run = tmp_path / "lora"
    assert (
        main(
            [
                "train",
                f"model={assets / 'llama'}",
                f"data={assets / 'ins.jsonl'}",
                "task=instruction",
                "method=lora",
                "lora.rank=4",
                f"out_dir={run}",
                "epochs=3",
                "batch_size=4",
                "lr=1e-2",
                "val_fraction=0",
                *QUIET,
            ]
        )
        == 0
    )
    assert main(["export", str(run), "--adapter", str(tmp_path / "adapter")]) == 0
    loaded = load_run(run)
    ours, tokenizer = loaded.model, loaded.tokenizer
    base = AutoModelForCausalLM.from_pretrained(str(assets / "llama"), local_files_only=True)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([tokenizer("what time is the answer")["input_ids"]])
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(assets / "llama"), local_files_only=True)(input_ids=ids).logits
    assert (a - plain).abs().max() > 1e-3  # the adapter changed something ...
    assert (a - b).abs().max() < 1e-4  # ... and peft reproduces it


def test_eval_reports_accuracy_and_rejects_unseen_labels(assets, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                f"model={assets / 'bert'}",
                f"data={assets / 'cls.csv'}",
                "method=head",
                f"out_dir={run}",
                "epochs=1",
                *QUIET,
            ]
        )
        == 0
    )
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_text("label,text\nspam,free win\nham,meet me\n")
    bad.write_text("label,text\nspam,free win\nmaybe,meet me\n")
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(good)]) == 0
    assert "accuracy=" in capsys.readouterr().out
    assert main(["eval", str(run), "--data", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "label 'maybe' was not seen in training" in err[0], err


def test_a_roberta_run_reloads_as_gradtunes_own_encoder(assets, tmp_path, capsys):
    """A RoBERTa body (positions from the pad id + 1) fine-tuned with LoRA: eval's reload computes
    transformers' logits bit for bit, padded rows included."""
    tiny_hf.roberta(tmp_path / "roberta", pad_token_id=0)  # the tiny tokenizer's [PAD]
    tiny_hf.tokenizer("bert").save_pretrained(str(tmp_path / "roberta"))
    run = tmp_path / "run"
    settings = [f"model={tmp_path / 'roberta'}", f"data={assets / 'cls.csv'}", "method=lora", f"out_dir={run}"]
    assert main(["train", *settings, "epochs=2", "batch_size=8", *QUIET]) == 0
    ours, theirs = load_run(run, inference_only=True).model, load_run(run).model
    assert isinstance(ours.body, BertModel) and not isinstance(theirs.body, BertModel)
    ids = torch.tensor([[2, 6, 7, 8, 3, 0], [2, 9, 10, 11, 12, 3]])
    with torch.no_grad():
        assert torch.equal(ours(ids, (ids != 0).long()), theirs(ids, (ids != 0).long()))


def test_predict_computes_at_the_runs_precision_as_eval_does(assets, tmp_path, capsys):
    """A bf16 run: predict's probabilities are the model's under bf16 autocast (as eval and
    training's validation computed), at any chunk; before, predict computed in float32."""
    import csv
    import io

    from gradtune.jobs.reload import run_inputs

    run = tmp_path / "run"
    settings = [f"model={assets / 'bert'}", f"data={assets / 'cls.csv'}", "method=head+lora", "precision=bf16"]
    assert main(["train", *settings, f"out_dir={run}", "epochs=2", "batch_size=8", "lr=1e-2", *QUIET]) == 0
    capsys.readouterr()
    tables = []
    for extra in ([], ["--batch-size", "3"]):
        assert main(["predict", str(run), "--data", str(assets / "cls.csv"), *extra]) == 0
        tables.append(list(csv.DictReader(io.StringIO(capsys.readouterr().out))))
    assert tables[0] == tables[1]
    r = load_run(run, inference_only=True)
    batch = run_inputs(r, str(assets / "cls.csv")).get(torch.arange(40))
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16):
            bf16 = torch.softmax(r.model(batch["input_ids"], batch["attention_mask"]).double(), 1)
        fp32 = torch.softmax(r.model(batch["input_ids"], batch["attention_mask"]).double(), 1)
    got = torch.tensor([[float(row["p_ham"]), float(row["p_spam"])] for row in tables[0]], dtype=torch.float64)
    assert (got - bf16).abs().max() < 1e-12 < (got - fp32).abs().max()


def test_bad_method_and_export_are_one_line_errors(assets, tmp_path, capsys):
    base = [f"model={assets / 'bert'}", f"data={assets / 'cls.csv'}", f"out_dir={tmp_path / 'r'}", *QUIET]
    assert main(["train", *base, "method=lora+bitfit"]) == 2
    assert main(["train", *base, "method=full", "finetune.export=adapter"]) == 2
    assert main(["train", *base, "method=lorra"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("gradtune: error:") for e in err), err
    assert not (tmp_path / "r").exists()  # rejected before anything was written


def test_pretrained_defaults_pick_adamw_and_an_lr_per_method(assets):
    from gradtune.config import load_config

    model = f"model={assets / 'bert'}"
    cfg = load_config(None, [model])
    assert (cfg.optimizer, cfg.batch_size, cfg.epochs, cfg.text.max_length) == ("adamw", 16, 1, 64)
    assert cfg.lr == 5e-5  # method full
    assert load_config(None, [model, "method=head"]).lr == 1e-2
    assert load_config(None, [model, "method=head+lora"]).lr == 5e-4  # the smaller: the body's
    assert load_config(None, [model, "method=lora", "lr=3e-4"]).lr == 3e-4  # explicit wins
    assert load_config(None, []).optimizer == "sgd"  # tabular models keep their own defaults


def test_regression_reports_rmse(assets, tmp_path, capsys):
    data = tmp_path / "reg.csv"
    data.write_text("score,text\n" + "".join(f"{i % 3},{' '.join(['good'] * (i % 3 + 1))}\n" for i in range(30)))
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                f"model={assets / 'bert'}",
                f"data={data}",
                "task=regression",
                "method=full",
                "text.label_column=score",
                "lr=1e-3",
                "epochs=2",
                "batch_size=8",
                f"out_dir={run}",
                *QUIET,
            ]
        )
        == 0
    )
    assert "val_rmse" in _evals(run)[-1]
    assert main(["eval", str(run), "--data", str(data)]) == 0
    assert "rmse=" in capsys.readouterr().out


def test_activation_checkpointing_is_opt_in_and_changes_nothing(assets, tmp_path):
    """Off by default; true turns it on (not for head); with or without it a run is the same run
    (non-reentrant checkpointing replays dropout exactly)."""
    from gradtune.config import load_config
    from gradtune.jobs.registry import build
    from gradtune.loop.fit import fit

    def job(method: str, ckpt: str):
        cfg = load_config(
            None,
            [
                f"model={assets / 'bert'}",
                f"data={assets / 'cls.csv'}",
                f"method={method}",
                f"finetune.checkpointing={ckpt}",
                "max_steps=3",
                "batch_size=8",
                *QUIET,
            ],
        )
        return build(cfg), cfg

    def enabled(j) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in j.model.modules())

    assert not enabled(job("full", "false")[0]) and not enabled(job("lora", "false")[0])
    assert enabled(job("lora", "true")[0]) and enabled(job("full", "true")[0])
    assert not enabled(job("head", "true")[0])  # the frozen body has no backward to save
    weights = {}
    for ckpt in ("true", "false"):
        j, cfg = job("full", ckpt)
        fit(j, cfg)
        weights[ckpt] = {k: v.clone() for k, v in j.model.state_dict().items()}
    for k, v in weights["true"].items():
        torch.testing.assert_close(v, weights["false"][k], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "method,head_lr,expected",
    [
        ("full", None, [5e-5, 1e-2]),
        ("lora", None, [5e-4, 1e-2]),
        ("full", 3e-3, [5e-5, 3e-3]),
        ("head", None, None),
        ("head+lora", None, [5e-4, 1e-2]),
    ],
)
def test_a_new_head_beside_a_training_body_gets_its_own_lr(assets, method, head_lr, expected):
    """The body keeps the method's lr; the fresh head the lr a head trained alone gets (or
    finetune.head_lr); the optimizer sees exactly the head's parameters in the second group."""
    from gradtune.config import load_config
    from gradtune.jobs.pretrained import build_pretrained

    extra = [f"finetune.head_lr={head_lr}"] if head_lr else []
    cfg = load_config(
        None, [f"model={assets / 'bert'}", f"data={assets / 'cls.csv'}", f"method={method}", *QUIET, *extra]
    )
    job = build_pretrained(cfg)
    if expected is None:
        assert job.param_groups is None
        return
    body, head = job.param_groups
    assert [body.get("lr", cfg.lr), head["lr"]] == pytest.approx(expected)
    assert {id(p) for p in head["params"]} == {id(p) for p in job.model.head.parameters()}
    trainable = {id(p) for p in job.model.parameters() if p.requires_grad}
    assert {id(p) for p in body["params"]} | {id(p) for p in head["params"]} == trainable
