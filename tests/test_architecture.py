"""The layout promises of docs/architecture.md, checked on the source: lifecycle subpackages, no import cycles,
short functions, and a package that imports no orchestration framework."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "src" / "bonetumor"
SUBPACKAGES = {"data", "transforms", "balance", "training", "evaluation", "registry", "serving", "slide", "cli"}
#: Code lines a function may have, its docstring not counted.
MAX_FUNCTION_LINES = 80
ADAPTERS = [REPO / "components", REPO / "pipelines", REPO / "serving", REPO / "benchmarks"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, tree: ast.Module) -> set[str]:
    """Every bonetumor module ``name`` imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("bonetumor"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bonetumor"):
            found.add(node.module)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_the_package_is_grouped_by_lifecycle() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders >= SUBPACKAGES
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    # Only what every stage shares stays at the top: config, errors, utils, the process set-up (with its locks and
    # fault injection), stage adapters.
    expected = ["__init__.py", "config.py", "errors.py", "faults.py", "locks.py", "runtime.py", "stages.py", "utils.py"]
    assert loose == expected
    for name, tree in _modules().items():
        assert ast.get_docstring(tree), f"{name} has no module docstring"


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {name: {m for m in _imports(name, tree) if m in modules} for name, tree in modules.items()}
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def _long_functions(paths: list[Path]) -> list[str]:
    long = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if ast.get_docstring(node) is not None:
                    doc = node.body[0]
                    lines -= doc.end_lineno - doc.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}::{node.name} ({lines} lines)")
    return long


def test_no_function_is_longer_than_the_limit() -> None:
    paths = sorted(PACKAGE.rglob("*.py")) + [p for folder in ADAPTERS for p in sorted(folder.rglob("*.py"))]
    assert _long_functions(paths) == []


@pytest.mark.parametrize("framework", ["kfp", "dvc", "bentoml"])
def test_the_package_imports_no_orchestration_framework(framework: str) -> None:
    users = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                roots = {node.module.split(".")[0]}
            else:
                continue
            if framework in roots:
                users.append(name)
    assert users == []
