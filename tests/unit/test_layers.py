"""The package's shape, kept by a test: each layer imports only layers below it, no gradtune
module is imported inside a function (a hidden upward dependency or a cycle), and files and
functions stay small enough to read (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "gradtune"

# Lowest first. A module may import its own package and any layer with a smaller number.
LAYERS = {
    "runtime": 0,
    "datasets": 0,
    "config": 1,
    "data": 2,
    "models": 2,
    "optim": 2,
    "telemetry": 2,
    "objectives": 3,
    "finetune": 4,
    "jobs": 5,
    "state": 6,
    "loop": 7,
    "outputs": 8,
    "train": 9,
    "lr_find": 9,
    "commands": 10,
    "sklearn": 10,
    "cli": 11,
    "__main__": 12,
}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def _unit(module: str) -> str:
    """'gradtune.loop.guard' -> 'loop'; 'gradtune.train' -> 'train'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        out.append((".".join(rel.parts), path))
    return out


def _imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(imported gradtune module, line, inside a function?) for each gradtune import."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").startswith("gradtune"):
                if child.module == "gradtune":  # from gradtune import x: x is a module
                    found.extend((f"gradtune.{a.name}", child.lineno, in_function) for a in child.names)
                else:
                    found.append((child.module, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom) and child.level > 0:
                found.append(("<relative>", child.lineno, in_function))
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("gradtune"))
            visit(child, inner)

    visit(tree, False)
    return found


def layering_violations(root: Path = ROOT) -> list[str]:
    """Every import that breaks the layering rule, as 'file:line: why'."""
    bad = []
    for module, path in _modules():
        unit = _unit(module)
        rank = LAYERS.get(unit, 0 if unit == "__init__" else None)
        if rank is None:
            bad.append(f"{path}: '{unit}' is in no layer (add it to LAYERS)")
            continue
        for target, line, in_function in _imports(ast.parse(path.read_text())):
            where = f"{path.relative_to(root.parent)}:{line}"
            if target == "<relative>":
                bad.append(f"{where}: relative import (write the absolute gradtune path)")
                continue
            if in_function:
                bad.append(f"{where}: imports {target} inside a function")
            other = _unit(target)
            if other == unit or other == "__init__":
                continue
            other_rank = LAYERS.get(other)
            if other_rank is None or other_rank >= rank:
                bad.append(f"{where}: {unit} (layer {rank}) imports {target} (layer {other_rank})")
    return bad


def test_each_layer_imports_only_layers_below_it():
    bad = layering_violations()
    assert not bad, "\n".join(bad)


def test_a_planted_upward_import_is_caught(tmp_path):
    """The check itself can fail: a data module importing the loop, and a late import."""
    pkg = tmp_path / "gradtune"
    (pkg / "data").mkdir(parents=True)
    (pkg / "loop").mkdir()
    (pkg / "data" / "bad.py").write_text("from gradtune.loop.loop import Loop\n")
    (pkg / "loop" / "late.py").write_text("def f():\n    from gradtune.runtime import cache\n")
    global ROOT
    saved, ROOT = ROOT, pkg
    try:
        bad = layering_violations(pkg)
    finally:
        ROOT = saved
    assert any("data (layer 2) imports gradtune.loop.loop (layer 7)" in b for b in bad), bad
    assert any("inside a function" in b for b in bad), bad


@pytest.mark.parametrize("module,path", _modules(), ids=[m for m, _ in _modules()])
def test_files_and_functions_stay_small(module, path):
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_FILE_LINES, f"{path}: {len(lines)} lines (> {MAX_FILE_LINES}): split it by concept"
    long = [
        f"{n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for n in ast.walk(ast.parse("\n".join(lines)))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path}: functions over {MAX_FUNCTION_LINES} lines: {long}"
