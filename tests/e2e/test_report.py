"""report.html and compare.html as a person sees them: written by real runs, self-contained (no
network: every image a data URI, no outside link), holding the sections the issue asks for,
and rendered by headless Chromium into a screenshot that is not blank, with every image
decoded and no console error. Bad ``compare`` inputs end as one line and exit code 2."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from gradtune import cli
from gradtune.commands import compare
from gradtune.telemetry.report import write_report

QUIET = ["progress=off"]
LINEAR = ["model=linear", "epochs=30", *QUIET]
MLP = [
    "model=mlp",
    "data=breast_cancer",
    "hidden=[32]",
    "optimizer=adamw",
    "lr=0.003",
    "batch_size=16",
    "epochs=25",
    "early_stopping.enabled=true",
    "early_stopping.patience=3",
    *QUIET,
]
PNG = b"\x89PNG\r\n\x1a\n"


def gradtune(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """The CLI, with ``compare`` in its table even before cli.py lists it."""
    if "compare" not in cli.COMMANDS:
        monkeypatch.setitem(cli.COMMANDS, "compare", compare)
    return cli.main([str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {"linear": root / "lin-run", "mlp": root / "mlp-run"}
    assert cli.main(["train", *LINEAR, f"out_dir={out['linear']}"]) == 0
    assert cli.main(["train", *MLP, f"out_dir={out['mlp']}"]) == 0
    return out


class Page(HTMLParser):
    """What a page refers to and which sections it has."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []  # every href/src other than the images'
        self.ids: list[str] = []
        self.tags: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        if a.get("id"):
            self.ids.append(a["id"] or "")
        if tag == "img":
            self.images.append(a.get("src") or "")
        else:
            self.links += [v or "" for k, v in attrs if k in ("href", "src")]


def check_self_contained(path: Path) -> Page:
    page = Page(path.read_text(encoding="utf-8"))
    assert page.images, f"{path}: no chart"
    for src in page.images:
        assert src.startswith("data:image/png;base64,"), src[:80]
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    assert all(link.startswith("#") for link in page.links), page.links  # in-page anchors only
    assert "script" not in page.tags  # nothing to run, nothing to fetch
    return page


def test_every_run_writes_a_self_contained_report(runs):
    lin = check_self_contained(runs["linear"] / "report.html")
    assert {"stop", "loss", "gradients", "metrics", "guard", "config"} <= set(lin.ids), lin.ids
    text = (runs["linear"] / "report.html").read_text()
    assert "gap to the closed-form optimum" in text and "update-to-weight ratio" in text
    summary = json.loads((runs["linear"] / "summary.json").read_text())
    assert summary["stop_reason"] in text and "<details>" in text and "resolved config" in text

    mlp = check_self_contained(runs["mlp"] / "report.html")
    assert {"stop", "loss", "gradients", "metrics", "guard", "config"} <= set(mlp.ids), mlp.ids
    text = (runs["mlp"] / "report.html").read_text()
    best = json.loads((runs["mlp"] / "summary.json").read_text())["job"]["early_stopping"]["best_step"]
    assert f"best step <b>{best}</b>" in text and "closed-form" not in text


def test_report_is_rebuilt_from_the_folder_alone(runs, tmp_path):
    """Any finished run: the page comes from its files, the same page again."""
    copy = tmp_path / "copy"
    shutil.copytree(runs["linear"], copy)
    (copy / "report.html").unlink()
    assert write_report(copy) == copy / "report.html"
    assert Page((copy / "report.html").read_text()).images == Page((runs["linear"] / "report.html").read_text()).images


def test_guard_decisions_advice_and_non_finite_values_are_shown(tmp_path):
    """A hand-made run folder: guard rows, a resume, "inf" logged as a string, and lr-find /
    noise-scale advice in the summary, rendered generically."""
    rows = [
        {"time": 0.1, "kind": "eval", "step": 10, "epoch": 1.0, "lr": 0.1, "loss": 2.0, "val_loss": 2.5},
        {
            "time": 0.2,
            "kind": "guard",
            "step": 11,
            "action": "rollback",
            "reason": "loss spike 40x",
            "rollback_to": "step-00000010",
            "lr_scale": 0.5,
        },
        {"time": 0.0, "kind": "resume", "step": 10, "checkpoint": "step-00000010", "skipped": 0},
        {"time": 0.3, "kind": "eval", "step": 20, "epoch": 2.0, "lr": 0.05, "loss": "inf", "val_loss": "nan"},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut sho')
    summary = {
        "steps": 20,
        "epochs": 2.0,
        "stop_reason": "diverged: loss spike",
        "train_loss": None,
        "job": {
            "lr_find": {"suggestion": 0.0123, "stopped_early": True},
            "noise_scale": {"b_simple": 417.0, "advice": "batch_size ~ 400"},
        },
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    page = check_self_contained(write_report(tmp_path))
    text = (tmp_path / "report.html").read_text()
    assert {"guard", "advice", "config"} <= set(page.ids)
    assert "loss spike 40x" in text and "rollback_to=step-00000010" in text and "Resumed 1×" in text
    assert "0.0123" in text and "b_simple" in text and "batch_size ~ 400" in text
    assert "config.yaml is missing" in text


def test_compare_overlays_the_runs(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp" / "compare.html"
    assert gradtune(monkeypatch, "compare", runs["linear"], runs["mlp"], "--out", out) == 0
    page = check_self_contained(out)
    text = out.read_text()
    assert "lin-run" in text and "mlp-run" in text and len(page.images) >= 2  # vs steps and vs wall time
    for run in runs.values():
        assert json.loads((run / "summary.json").read_text())["stop_reason"] in text
    assert str(out.resolve()) in capsys.readouterr().out


def test_compare_default_out_is_the_working_directory(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert gradtune(monkeypatch, "compare", runs["linear"], runs["mlp"]) == 0
    check_self_contained(tmp_path / "compare.html")


@pytest.mark.parametrize(
    "case", ["not-a-run", "missing", "out-inside-run", "out-is-a-run", "out-not-html", "out-folder"]
)
def test_bad_compare_inputs_exit_2(case, runs, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    page = ["--out", tmp_path / "c.html"]
    args = {
        "not-a-run": [runs["linear"], empty, *page],
        "missing": [runs["linear"], tmp_path / "nope", *page],
        "out-inside-run": [runs["linear"], runs["mlp"], "--out", runs["mlp"] / "compare.html"],
        "out-is-a-run": [runs["linear"], "--out", runs["linear"]],
        "out-not-html": [runs["linear"], runs["mlp"], "--out", notes],
        "out-folder": [runs["linear"], "--out", empty],
    }[case]
    before = sorted(p.name for p in runs["mlp"].iterdir())
    assert gradtune(monkeypatch, "compare", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradtune: error: ") and err.count("\n") == 1, err
    assert notes.read_text() == "mine" and sorted(p.name for p in runs["mlp"].iterdir()) == before
    assert not list(empty.iterdir()) and not (tmp_path / "c.html").exists()


# --- in a browser ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def browser() -> str:
    """Debian's chromium; installed here when missing, else these tests are skipped."""
    found = shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be here (needs apt-get as root): apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True, timeout=300, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True, timeout=900, env=env
        )
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"chromium is not installed and `apt-get install chromium` failed: {e}")
    return shutil.which("chromium") or pytest.skip("apt-get installed chromium but it is not on PATH")


def chromium(browser: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: runs side by side never share one
        return subprocess.run(
            [
                browser,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )


# Added to a copy of the page only (the page itself has no script; the copy renders the same):
# after load, each image says whether the browser decoded it.
_PROBE = (
    '<script>addEventListener("load",()=>{for(const i of document.images)'
    "i.dataset.ok=i.complete&&i.naturalWidth>0})</script>"
)


def check_in_browser(browser: str, page: Path, shot: Path, sections: set[str]) -> None:
    """One Chromium launch: the DOM after load (images decoded? sections there? console
    errors?) and a 1200x2000 screenshot, which must not be blank."""
    probe = shot.with_suffix(".probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    done = chromium(
        browser,
        "--enable-logging=stderr",
        "--v=0",
        "--dump-dom",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        probe.as_uri(),
    )
    dom = Page(done.stdout)
    assert done.returncode == 0 and dom.images and shot.is_file(), done.stderr[-2000:]
    assert done.stdout.count('data-ok="true"') == len(dom.images), "an image did not decode"
    assert sections <= set(dom.ids), dom.ids
    assert "CONSOLE" not in done.stderr, [ln for ln in done.stderr.splitlines() if "CONSOLE" in ln]
    pixels = matplotlib.image.imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    colours = np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert pixels.std() > 0.05 and len(colours) > 100, "blank screenshot"  # charts, text, header


@pytest.mark.slow
def test_pages_render_in_chromium(browser, runs, tmp_path, monkeypatch):
    shots = Path(os.environ.get("GRADTUNE_TEST_SHOTS", tmp_path))  # set it to keep the screenshots
    shots.mkdir(parents=True, exist_ok=True)
    base = {"stop", "loss", "gradients", "guard", "config"}
    check_in_browser(browser, runs["linear"] / "report.html", shots / "report-linear.png", base)
    check_in_browser(browser, runs["mlp"] / "report.html", shots / "report-mlp.png", base | {"metrics"})
    out = tmp_path / "compare.html"
    assert gradtune(monkeypatch, "compare", runs["linear"], runs["mlp"], "--out", out) == 0
    check_in_browser(browser, out, shots / "compare.png", {"curves", "runs"})
