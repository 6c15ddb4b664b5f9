"""The shell blocks of a Markdown file (README.md, ARCHITECTURE.md) or the commands of a commented
YAML config, as the README harness runs them.

A block is a fenced code block tagged ``bash``, ``sh``, ``shell`` or ``console``. Blocks tagged
otherwise (``text``, ``python``, ``yaml``) are not shell and are not run. An HTML comment on the
line(s) just above the fence controls how it runs, visible in the README source:

    <!-- readme-test: skip (why it cannot run here) -->
    <!-- readme-test: slow; scale=0.01; id=recipe; after=other-id; exit=2; tol=0.02 -->

- ``skip (reason)``: not run; the reason is required.
- ``slow``: in the slow set (``make test-fast`` and ``-m 'not slow'`` leave it out).
- ``scale=S``: runs with ``GRADTUNE_BUDGET_SCALE=S`` (config loading multiplies ``max_time``,
  ``max_steps`` and ``epochs`` by S): the command stays as written, its budget shrinks.
- ``id=NAME`` / ``after=NAME``: a block runs in a fresh folder after the blocks it names ran there
  (a ``generate`` needs the run that trained the model).
- ``exit=N``: every command of the block must exit with N (default 0).
- ``file=NAME`` (python blocks): the block is written to NAME in the folder; with ``run``, it is
  also run as ``python NAME`` (python blocks must carry ``file``, ``run`` or ``skip``).
- ``tol=T``: numbers in the shown output must agree within relative T (default: shape only —
  any number where the README shows one; for timings and load-dependent figures).

Inside a block: in ``console`` blocks, a line starting ``$ `` is a command and the lines under it
its output; elsewhere every line is a command (a trailing ``\\`` continues it) and comment lines
``# ...`` right under a command are its shown output. ``...`` in shown output stands for any text.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

SHELL_TAGS = {"bash", "sh", "shell", "console"}
MARKER = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w-]*)\s*$")


@dataclasses.dataclass
class Command:
    text: str  # the command as written (continuations joined)
    line: int  # 1-based line in the file
    shown: list[str] = dataclasses.field(default_factory=list)  # output lines the file shows


@dataclasses.dataclass
class Block:
    path: Path
    line: int  # the fence's line, 1-based
    tag: str
    commands: list[Command]
    options: dict[str, str]
    text: str = ""  # the block's body as written

    @property
    def name(self) -> str:
        return self.options.get("id") or f"{self.path.name}:{self.line}"

    @property
    def skip(self) -> str | None:
        return self.options.get("skip")


def parse_options(text: str) -> dict[str, str]:
    """``skip (reason); slow; scale=0.1`` -> {'skip': 'reason', 'slow': '', 'scale': '0.1'}."""
    out: dict[str, str] = {}
    m = re.search(r"\bskip\s*\(([^)]*)\)", text)  # the reason may hold ';'
    if m:
        if not m.group(1).strip():
            raise ValueError(f"readme-test marker '{text}': skip needs a reason")
        out["skip"] = m.group(1).strip()
        text = text[: m.start()] + text[m.end() :]
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        if part.startswith("skip"):
            reason = part[4:].strip().strip("():").strip()
            if not reason:
                raise ValueError(f"readme-test marker '{text}': skip needs a reason")
            out["skip"] = reason
        elif "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
        else:
            out[part] = ""
    unknown = set(out) - {"skip", "slow", "scale", "id", "after", "exit", "tol", "file", "run"}
    if unknown:
        raise ValueError(f"readme-test marker '{text}': unknown option(s) {sorted(unknown)}")
    return out


def _commands(lines: list[tuple[int, str]], console: bool) -> list[Command]:
    cmds: list[Command] = []
    pending, start, last = "", 0, -10  # last: the line the latest command or shown line ended on
    for no, raw in lines:
        s = raw.strip()
        if console:
            if s.startswith("$ "):
                cmds.append(Command(s[2:].strip(), no))
            elif s and cmds:
                cmds[-1].shown.append(s)
            continue
        if pending:
            pending += " " + s.rstrip("\\").strip()
            if not s.endswith("\\"):
                cmds.append(Command(pending, start))
                pending, last = "", no
            continue
        if not s:
            last = -10
            continue
        if s.startswith("#"):
            if cmds and no == last + 1:  # right under a command: what it prints
                cmds[-1].shown.append(s[1:].strip())
                last = no
            continue
        if s.endswith("\\"):
            pending, start = s.rstrip("\\").strip(), no
        else:
            cmds.append(Command(s, no))
            last = no
    return cmds


def markdown_blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path`` with its options; non-shell ones too (tag tells)."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, tag, start = m.group(2), m.group(3).lower(), i
        body: list[tuple[int, str]] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append((i + 1, lines[i]))
            i += 1
        i += 1
        options: dict[str, str] = {}
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0 and (mm := MARKER.search(lines[j])):
            options = parse_options(mm.group(1))
        cmds = _commands(body, tag == "console") if tag in SHELL_TAGS else []
        blocks.append(Block(path, start + 1, tag, cmds, options, "".join(raw + "\n" for _, raw in body)))
    return blocks


def shell_blocks(path: Path) -> list[Block]:
    return [b for b in markdown_blocks(path) if b.tag in SHELL_TAGS]


def python_blocks(path: Path) -> list[Block]:
    """Python blocks: ``file=NAME`` writes the block there (a module a later command imports);
    ``run`` also runs it with ``python``; each python block carries one of them or ``skip``."""
    return [b for b in markdown_blocks(path) if b.tag == "python"]


def indented_code(path: Path) -> list[int]:
    """Lines starting an indented (4-space) code block outside fences: the harness cannot tell
    shell from prose there, so the README must fence its commands (a test keeps it so)."""
    lines = path.read_text().splitlines()
    out, in_fence, prev_blank = [], False, True
    for no, line in enumerate(lines, 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence and line.startswith("    ") and line.strip() and prev_blank:
            out.append(no)
        prev_blank = not line.strip()
    return out


def yaml_commands(path: Path) -> Block:
    """A commented config's header lines ``#   gradtune ...``: the commands it tells you to run."""
    cmds = []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r"#\s{2,}((?:gradtune|python)\b.*)$", line)
        if m:
            cmds.append(Command(m.group(1).strip(), no))
    options: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if mm := MARKER.search(line):
            options = parse_options(mm.group(1))
    return Block(path, 1, "bash", cmds, options)
