"""The README is a test: every shell block of README.md and ARCHITECTURE.md, and the commands a
commented config in configs/ tells you to run, run as written (``tests/readme/blocks.py`` says how
a block is marked: skip with a reason, slow, a budget scale, what it shows)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.readme import blocks as md
from tests.readme import sandbox
from tests.readme.runner import ROOT, BlockFailed, run_block

SOURCES = [ROOT / "README.md", ROOT / "ARCHITECTURE.md"]


def all_blocks() -> list[md.Block]:
    out = [b for p in SOURCES for b in md.shell_blocks(p) + md.python_blocks(p)]
    out += [md.yaml_commands(p) for p in sorted((ROOT / "configs").glob("*.yaml"))]
    return out


BLOCKS = all_blocks()
BY_ID = {b.options["id"]: b for b in BLOCKS if "id" in b.options}


def _needs(block: md.Block) -> list[md.Block]:
    """The blocks that must run before ``block`` in its folder, first ones first."""
    out: list[md.Block] = []
    for name in filter(None, block.options.get("after", "").split(",")):
        dep = BY_ID[name.strip()]
        out += [d for d in _needs(dep) if d not in out] + [dep]
    return out


def _group(block: md.Block) -> str:
    """The xdist group of ``block``: the first root (a block needing none) of the blocks linked to
    it by ``after``, either way. Blocks sharing a run folder then share one worker, so RAN spares
    every rerun (a block after two roots would otherwise run one of them again)."""
    linked, todo = {block.name}, [block]
    while todo:
        b = todo.pop()
        near = _needs(b) + [o for o in BLOCKS if b in _needs(o)]
        todo += [o for o in near if o.name not in linked]
        linked |= {o.name for o in near}
    return min(o.name for o in BLOCKS if o.name in linked and not _needs(o))


def _params():
    for b in BLOCKS:
        marks = []
        if b.skip:
            marks.append(pytest.mark.skip(reason=f"README marker: {b.skip}"))
        chain = [*_needs(b), b]
        if any("slow" in d.options for d in chain):
            marks.append(pytest.mark.slow)
        # A time budget (max_time=null turns it off) in a block that shows output: what it shows
        # depends on wall time, run alone (make test). A budgeted block showing nothing asserts nothing
        # on time: it runs beside other tests (its runs calibrate to the pace they get).
        budget = any(re.search(r"max_time(?!=null)", d.text) for d in chain)
        if budget and any(c.shown for c in b.commands):
            marks.append(pytest.mark.serial)
        # A block and the blocks it needs run in one pytest-xdist worker, so RAN spares the reruns.
        marks.append(pytest.mark.xdist_group(_group(b)))
        yield pytest.param(b, id=b.name, marks=marks)


# id -> the folder where that block ran (and passed) in this session: a later block that needs it
# starts from a copy instead of running it again (the GPT recipe is needed four times). Never
# written after the block's run.
RAN: dict[str, Path] = {}


def _copy_into(where: Path, ran: Path) -> None:
    """A finished block's files and run folders into ``where`` (whose sandbox links are in place)."""
    links = lambda d, names: [n for n in names if (Path(d) / n).is_symlink()]  # noqa: E731
    shutil.copytree(ran, where, ignore=links, dirs_exist_ok=True)


def _ran(dep: md.Block, factory: pytest.TempPathFactory) -> Path:
    """The folder where ``dep`` ran, running it (in a folder of its own) if no test has yet: a
    block tested before the block it needs does not make that one run twice."""
    if dep.name not in RAN:
        where = factory.mktemp("needed")
        sandbox.populate(where)
        for d in _needs(dep):
            _copy_into(where, _ran(d, factory))
        run_block(dep, where)
        RAN[dep.name] = where
    return RAN[dep.name]


@pytest.mark.parametrize("block", list(_params()))
def test_block_runs_as_written(block: md.Block, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    if block.name in RAN:  # it ran, as written, and passed already: as another block's need
        return
    sandbox.populate(tmp_path)
    for dep in _needs(block):
        _copy_into(tmp_path, _ran(dep, tmp_path_factory))
    run_block(block, tmp_path)
    RAN[block.name] = tmp_path


def test_every_block_is_shell_or_tagged() -> None:
    # An indented code block or an untagged fence could hold a command the harness never runs.
    for p in SOURCES:
        assert md.indented_code(p) == [], f"{p.name}: indented code at lines {md.indented_code(p)}: fence and tag it"
        untagged = [b.line for b in md.markdown_blocks(p) if not b.tag]
        assert untagged == [], f"{p.name}: fences without a language at lines {untagged}"


def test_configs_skipped_as_duplicates_run_in_the_readme() -> None:
    # A config whose header commands are skipped as "run in README.md" must have them there, verbatim.
    readme = {c.text.split("#")[0].strip() for b in md.shell_blocks(ROOT / "README.md") for c in b.commands}
    for p in sorted((ROOT / "configs").glob("*.yaml")):
        block = md.yaml_commands(p)
        if block.skip and "README.md" in block.skip:
            missing = [c.text for c in block.commands if c.text not in readme]
            assert not missing, f"{p.name}: {missing} are not in README.md's blocks"


def test_markers_name_known_blocks() -> None:
    for b in BLOCKS:
        for name in filter(None, b.options.get("after", "").split(",")):
            assert name.strip() in BY_ID, f"{b.name}: after={name}: no block has that id"
        if b.tag == "python":
            assert {"file", "run", "skip"} & set(b.options), f"{b.name}: mark a python block file=, run or skip"
        else:
            assert b.commands or b.skip, f"{b.name}: a shell block without commands"


# --- the harness itself: a README changed to something wrong fails ---------------------------


def _copy_with(tmp_path: Path, old: str, new: str) -> list[md.Block]:
    text = (ROOT / "README.md").read_text()
    assert old in text
    copy = tmp_path / "README.md"
    copy.write_text(text.replace(old, new, 1))
    return [b for b in md.shell_blocks(copy) if any(new in c.text or new in " ".join(c.shown) for c in b.commands)]


def test_harness_fails_on_a_wrong_flag(tmp_path: Path) -> None:
    (block,) = _copy_with(tmp_path, "batch_size=full lr=0.2 tol=1e-9", "batch_size=full learning_rat=0.2 tol=1e-9")
    block.commands = [c for c in block.commands if "learning_rat" in c.text]
    work = tmp_path / "work"
    work.mkdir()
    sandbox.populate(work)
    with pytest.raises(BlockFailed, match=r"README.md:\d+: .*learning_rat.* exited 2, want 0"):
        run_block(block, work)


@pytest.mark.slow
def test_harness_fails_on_stale_output(tmp_path: Path) -> None:
    # The README's shown output is compared: a number off by more than the block's tolerance fails.
    (block,) = _copy_with(tmp_path, "best 0.1319", "best 0.1500")
    work = tmp_path / "work"
    work.mkdir()
    sandbox.populate(work)
    with pytest.raises(BlockFailed, match="the README shows"):
        run_block(block, work)


def test_shown_pattern() -> None:
    from tests.readme.runner import shown_pattern

    m = shown_pattern("done: 120 steps (6 epochs) ...; best 0.13 at step 60").search(
        "done: 121 steps (6 epochs) in 2.1s; stopped: x; best 0.1301 at step 60"
    )
    assert m and m.groups() == ("121", "6", "0.1301", "60")
    assert not shown_pattern("stopped: converged").search("stopped: budget reached")
