"""The house rules of docs/architecture.md, measured: short functions and modules, thin flows,
no import cycle. (The layer contracts themselves run in `make lint`: lint-imports.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "segflow").rglob("*.py"), *(ROOT / "flows").glob("*.py")])
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 700
# a flow file holds argument parsing, @flow/@task wrappers, progress bars and summaries only
MAX_FLOW_LINES = 170


def _functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    return [
        (f"{path.relative_to(ROOT)}:{n.lineno} {n.name}", n.end_lineno - n.lineno + 1)  # type: ignore[operator]
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


def test_no_function_longer_than_80_lines() -> None:
    long = [f"{name} ({n} lines)" for p in SOURCES for name, n in _functions(p)
            if n > MAX_FUNCTION_LINES]  # fmt: skip
    assert not long, "split these: " + ", ".join(long)


def test_no_module_longer_than_700_lines() -> None:
    long = [f"{p.relative_to(ROOT)} ({n})" for p in SOURCES
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]  # fmt: skip
    assert not long, "split these: " + ", ".join(long)


def test_flows_stay_thin() -> None:
    fat = [f"{p.name} ({n})" for p in (ROOT / "flows").glob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_FLOW_LINES]  # fmt: skip
    assert not fat, "move the logic of these flows into segflow/: " + ", ".join(fat)


def test_no_import_cycle() -> None:
    grimp = pytest.importorskip("grimp")  # installed with import-linter (make install)
    graph = grimp.build_graph("segflow")
    modules = graph.modules
    # a module that reaches itself through the imports of another is on a cycle
    cycles = [
        m for m in sorted(modules)
        for d in graph.find_modules_directly_imported_by(m)
        if d in modules and d != m and graph.chain_exists(importer=d, imported=m)
    ]  # fmt: skip
    assert not cycles, f"import cycles through {cycles[:5]}"
