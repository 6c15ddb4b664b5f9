"""Outputs never overwrite inputs or foreign files (gradtune/runtime/outdir.py).

Every data-loss case found on the old code is here: the command exits 2 with one line on stderr
(no traceback) and every input file is byte-identical afterwards. Then the out_dir shapes that
must be refused before training (a file, /dev/null, under a file, not writable, checkpoints/ a
file), the atomic metrics.jsonl, exports into temporary siblings, and the library entry point.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from gradtune.cli import main
from gradtune.config import load_config
from gradtune.jobs.registry import build
from gradtune.loop.fit import fit
from gradtune.runtime import outdir, testhooks
from gradtune.runtime.errors import GradtuneError

QUIET = ["progress=off", "plot=false"]
ROWS = "".join(f"{i % 7},{(i * 3) % 5},{i % 4 + 0.5}\n" for i in range(30))


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (a file root: itself); folders as 'dir'."""
    out = {}
    for root in roots:
        items = [root] if root.is_file() else sorted(root.rglob("*"))
        for p in items:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def refused(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI: exit 2, one line on stderr without a traceback, containing ``needles``."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("gradtune: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def tab(tmp: Path) -> list[str]:
    if not (tmp / "d.csv").exists():
        (tmp / "d.csv").write_text("a,b,y\n" + ROWS)
    return [f"data={tmp / 'd.csv'}", "model=linear", "batch_size=8", "max_steps=4", *QUIET]


@pytest.fixture(scope="module")
def ft(tmp_path_factory) -> Path:
    """A tiny pretrained BERT folder ``base``, a spam/ham CSV, and a LoRA run ``run`` on them."""
    pytest.importorskip("transformers")
    from tests import tiny_hf

    d = tmp_path_factory.mktemp("ft")
    tiny_hf.bert(d / "base")
    rows = ["label,text"] + [
        f"{'spam' if i % 2 else 'ham'},{'free win prize' if i % 2 else 'meet me home'}" for i in range(16)
    ]
    (d / "cls.csv").write_text("\n".join(rows) + "\n")
    assert (
        main(
            [
                "train",
                f"model={d / 'base'}",
                f"data={d / 'cls.csv'}",
                "method=lora",
                "max_steps=2",
                "batch_size=8",
                f"out_dir={d / 'run'}",
                *QUIET,
            ]
        )
        == 0
    )
    return d


# --- the data-loss cases reproduced on the old code ----------------------------------------------


def test_export_merged_onto_its_own_run_is_refused(ft, capsys):
    before = snapshot(ft / "run", ft / "base")
    refused(capsys, ["export", str(ft / "run"), "--merged", str(ft / "run")], "export folder", "a gradtune run folder")
    assert snapshot(ft / "run", ft / "base") == before


def test_export_merged_onto_the_pretrained_folder_is_refused(ft, capsys):
    before = snapshot(ft / "run", ft / "base")
    refused(capsys, ["export", str(ft / "run"), "--merged", str(ft / "base")], str(ft / "base"))
    assert snapshot(ft / "run", ft / "base") == before


def test_export_into_a_new_folder_inside_the_base_model_is_refused(ft, capsys):
    before = snapshot(ft / "base")
    refused(capsys, ["export", str(ft / "run"), "--adapter", str(ft / "base" / "adapter")], "overlaps the input")
    assert snapshot(ft / "base") == before


def test_training_into_the_pretrained_folder_is_refused(ft, capsys):
    before = snapshot(ft / "base", ft / "cls.csv")
    refused(
        capsys,
        [
            "train",
            f"model={ft / 'base'}",
            f"data={ft / 'cls.csv'}",
            "method=lora",
            "max_steps=1",
            f"out_dir={ft / 'base'}",
            *QUIET,
        ],
        str(ft / "base"),
    )
    assert snapshot(ft / "base", ft / "cls.csv") == before
    assert not (ft / "base" / outdir.MARKER).exists()


def test_training_over_the_config_file_it_read_is_refused(tmp_path, capsys, monkeypatch):
    """``gradtune train config.yaml out_dir=.`` in a project folder: foreign, and the config is an input."""
    (tmp_path / "config.yaml").write_text(
        "# my carefully commented config\nmodel: linear  # why linear\nmax_steps: 2\nprogress: 'off'\nplot: false\n"
    )
    (tmp_path / "d.csv").write_text("a,b,y\n" + ROWS)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    refused(capsys, ["train", "config.yaml", "data=d.csv", "out_dir=."], "not a gradtune run folder")
    assert snapshot(tmp_path) == before


def test_a_run_folder_config_read_back_is_not_overwritten(tmp_path, capsys):
    """Even in gradtune's own folder, an input at a path the run writes (its config.yaml) is refused."""
    run = tmp_path / "run"
    assert main(["train", *tab(tmp_path), f"out_dir={run}"]) == 0
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + "# my note\n")
    before = snapshot(run)
    refused(capsys, ["train", str(run / "config.yaml")], "lies in out_dir", "config.yaml")
    assert snapshot(run) == before


@pytest.mark.parametrize("owned", [True, False], ids=["run folder", "foreign folder"])
def test_data_living_at_out_metrics_jsonl_is_refused(tmp_path, capsys, owned):
    out = tmp_path / "out"
    if owned:
        assert main(["train", *tab(tmp_path), f"out_dir={out}"]) == 0
    else:
        out.mkdir()
    data = out / "metrics.jsonl"
    data.write_text("".join(json.dumps({"a": i % 7, "y": i % 4 + 0.5}) + "\n" for i in range(30)))
    before = snapshot(out)
    needle = "lies in out_dir" if owned else "not a gradtune run folder"
    refused(capsys, ["train", f"data={data}", "model=linear", "max_steps=2", f"out_dir={out}", *QUIET], needle)
    assert snapshot(out) == before


def test_init_weights_at_out_model_safetensors_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", *tab(tmp_path), f"out_dir={out}"]) == 0
    before = snapshot(out)
    refused(
        capsys,
        ["train", *tab(tmp_path), f"init={out / 'model.safetensors'}", f"out_dir={out}"],
        "model.safetensors",
        "lies in out_dir",
    )
    assert snapshot(out) == before


def test_checkpoints_a_file_keeps_the_previous_metrics(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", *tab(tmp_path), f"out_dir={out}"]) == 0
    (out / "checkpoints").write_text("not a folder")
    before = snapshot(out)
    refused(
        capsys,
        ["train", *tab(tmp_path), "checkpoint_every=2", f"out_dir={out}"],
        "checkpoints exists but is not a folder",
    )
    assert snapshot(out) == before and (out / "metrics.jsonl").stat().st_size > 0


# --- out_dir shapes refused before training -----------------------------------------------------


def test_out_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    refused(capsys, ["train", *tab(tmp_path), f"out_dir={tmp_path / 'f'}"], "exists and is a file")
    assert (tmp_path / "f").read_text() == "mine"


def test_out_dir_dev_null(tmp_path, capsys):
    refused(capsys, ["train", *tab(tmp_path), "out_dir=/dev/null"], "/dev/null", "not a folder")


def test_out_dir_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    refused(capsys, ["train", *tab(tmp_path), f"out_dir={tmp_path / 'f' / 'run'}"], "is a file, not a folder")
    assert (tmp_path / "f").read_text() == "mine"


def test_out_dir_not_writable(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a read-only folder is still writable, nothing to refuse")
        refused(capsys, ["train", *tab(tmp_path), f"out_dir={locked / 'run'}"], "is not writable")
        refused(capsys, ["train", *tab(tmp_path), f"out_dir={locked}"], "is not writable")
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def test_out_dir_not_writable_as_the_os_reports_it(tmp_path, capsys, monkeypatch):
    """The same refusal whoever runs the tests: os.access answers 'no' for one folder."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real(p, mode, **kw))
    refused(capsys, ["train", *tab(tmp_path), f"out_dir={locked / 'run'}"], "is not writable")
    assert list(locked.iterdir()) == []


def test_foreign_folder_refused_empty_one_claimed_old_run_adopted(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused(capsys, ["train", *tab(tmp_path), f"out_dir={foreign}"], "not a gradtune run folder", "notes.txt")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", *tab(tmp_path), f"out_dir={empty}"]) == 0
    assert outdir.is_run_folder(empty)
    # A run made before the marker existed (only names a run writes, a run's summary.json) is
    # gradtune's; a lone metrics.jsonl is not evidence enough.
    (empty / outdir.MARKER).unlink()
    assert main(["train", *tab(tmp_path), f"out_dir={empty}"]) == 0
    assert outdir.is_run_folder(empty)
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "metrics.jsonl").write_text('{"my": "log"}\n')
    refused(capsys, ["train", *tab(tmp_path), f"out_dir={lone}"], "not a gradtune run folder")
    assert not [p.name for p in empty.iterdir() if p.name.startswith(".tmp")]


def test_lr_find_and_demo_refuse_a_foreign_folder(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "lr_find.png").write_text("not ours")
    refused(capsys, ["lr-find", "--steps", "5", *tab(tmp_path), f"out_dir={foreign}"], "not a gradtune run folder")
    refused(capsys, ["demo", "--out-dir", str(foreign)], "not a gradtune run folder")
    assert (foreign / "lr_find.png").read_text() == "not ours"
    assert main(["lr-find", "--steps", "5", *tab(tmp_path), f"out_dir={tmp_path / 'lr'}"]) == 0
    assert outdir.is_run_folder(tmp_path / "lr") and (tmp_path / "lr" / "lr_find.png").is_file()


def test_library_fit_gets_the_same_protection(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"someone's weights")
    cfg = load_config(None, tab(tmp_path) + [f"out_dir={foreign}"])
    with pytest.raises(GradtuneError, match="not a gradtune run folder"):
        fit(build(cfg), cfg, foreign)
    assert (foreign / "model.safetensors").read_bytes() == b"someone's weights"
    fit(build(cfg), cfg, tmp_path / "lib")  # claims a new folder; twice is fine (idempotent)
    fit(build(cfg), cfg, tmp_path / "lib")
    assert outdir.is_run_folder(tmp_path / "lib")


# --- atomic outputs ---------------------------------------------------------------------------


def test_a_run_failing_before_its_first_row_keeps_the_old_metrics(tmp_path):
    out = tmp_path / "out"
    assert main(["train", *tab(tmp_path), f"out_dir={out}"]) == 0
    before = snapshot(out)
    testhooks.configure("step.begin@1=RAISE")
    try:
        with pytest.raises(RuntimeError):
            main(["train", *tab(tmp_path), "resume=never", f"out_dir={out}"])
    finally:
        testhooks.configure("")
    assert snapshot(out) == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_export_writes_a_whole_folder_and_refuses_a_run_or_full_folder(ft, tmp_path, capsys):
    assert main(["export", str(ft / "run"), "--adapter", str(tmp_path / "a"), "--merged", str(tmp_path / "m")]) == 0
    assert (tmp_path / "a" / "adapter_config.json").is_file() and (tmp_path / "m" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "m"]  # no temporary sibling left
    before = snapshot(tmp_path / "a")
    refused(capsys, ["export", str(ft / "run"), "--adapter", str(tmp_path / "a")], "not empty")
    assert snapshot(tmp_path / "a") == before
    other = outdir.claim(tmp_path / "other-run")  # a run folder holding nothing but its marker
    refused(capsys, ["export", str(ft / "run"), "--merged", str(other)], "a gradtune run folder")
    refused(
        capsys,
        ["export", str(ft / "run"), "--adapter", str(tmp_path / "x"), "--merged", str(tmp_path / "x")],
        "the same folder",
    )


def test_in_run_export_replaces_its_own_folders(ft, tmp_path):
    run = tmp_path / "run"
    args = [
        "train",
        f"model={ft / 'base'}",
        f"data={ft / 'cls.csv'}",
        "method=lora",
        "max_steps=1",
        "batch_size=8",
        "finetune.export=both",
        f"out_dir={run}",
        *QUIET,
    ]
    assert main(args) == 0
    first = snapshot(run / "merged")
    assert main(args[:-3] + ["seed=1", f"out_dir={run}", *QUIET]) == 0
    assert snapshot(run / "merged") != first and (run / "adapter" / "adapter_config.json").is_file()
    assert not [p.name for p in run.iterdir() if p.name.startswith((".tmp", ".old"))]
