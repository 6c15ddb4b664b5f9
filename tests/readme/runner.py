"""Runs a README block as a user would: in a fresh folder holding the files the README names
(``sandbox.populate``), with ``gradtune`` on PATH, each command through bash exactly as written.

Failures are ``BlockFailed`` with the file and line of the command and what it printed."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.readme.blocks import Block, Command

ROOT = Path(__file__).resolve().parents[2]
# A number as gradtune prints it: 1,041 / 0.132272 / 1e-9 / -3.5 / 12.3%
NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?"
TIMEOUT_S = 900


class BlockFailed(AssertionError):
    pass


def environment(scale: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(ROOT)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="100")
    env.pop("GRADTUNE_BUDGET_SCALE", None)
    if scale:
        env["GRADTUNE_BUDGET_SCALE"] = scale
    return env


def shown_pattern(line: str) -> re.Pattern:
    """The shown line as a regex: text literal, ``...`` any text, each number a group."""
    parts = re.split(rf"(\.\.\.|{NUMBER})", line)
    out = []
    for i, p in enumerate(parts):
        if i % 2 == 0:
            out.append(re.escape(p))
        elif p == "...":
            out.append(".*?")
        else:
            out.append(f"({NUMBER})")
    return re.compile("".join(out))


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def _close(want: str, got: str, tol: float) -> bool:
    a, b = _num(want), _num(got)
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol * 1e-3)


def check_shown(cmd: Command, output: str, tol: float | None, where: str) -> None:
    """Each shown line must appear, in order, in the output: same text, numbers where numbers are
    (within ``tol`` when given)."""
    lines = output.splitlines()
    at = 0
    for want in cmd.shown:
        pat = shown_pattern(want)
        hit = None
        for i in range(at, len(lines)):
            m = pat.search(lines[i])
            if m:
                hit = (i, m)
                break
        if hit is None:
            raise BlockFailed(f"{where}: the README shows\n    {want}\nbut the command printed:\n{_tail(output)}")
        i, m = hit
        if tol is not None:
            wants = [p for j, p in enumerate(re.split(rf"(\.\.\.|{NUMBER})", want)) if j % 2 and p != "..."]
            for w, g in zip(wants, m.groups()):
                if not _close(w, g, tol):
                    raise BlockFailed(f"{where}: the README shows {w}, the command printed {g} (tol {tol}): {lines[i]}")
        at = i + 1


def _tail(text: str, n: int = 40) -> str:
    return "\n".join("    " + s for s in text.splitlines()[-n:])


def run_command(cmd: Command, block: Block, cwd: Path) -> str:
    where = f"{block.path.name}:{cmd.line}"
    want = int(block.options.get("exit", "0"))
    try:
        p = subprocess.run(
            ["bash", "-c", cmd.text],
            cwd=cwd,
            env=environment(block.options.get("scale")),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise BlockFailed(f"{where}: `{cmd.text}` ran over {TIMEOUT_S} s") from None
    output = p.stdout + p.stderr
    if p.returncode != want:
        raise BlockFailed(f"{where}: `{cmd.text}` exited {p.returncode}, want {want}:\n{_tail(output)}")
    tol = block.options.get("tol")
    check_shown(cmd, output, float(tol) if tol else None, where)
    return output


def run_block(block: Block, cwd: Path) -> list[str]:
    if block.tag == "python":
        name = block.options.get("file") or "readme_block.py"
        (cwd / name).write_text(block.text)
        if "run" not in block.options:
            return []
        return [run_command(Command(f"python {name}", block.line), block, cwd)]
    return [run_command(c, block, cwd) for c in block.commands]
