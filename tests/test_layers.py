"""The layers of README's "How it fits together" only point down: the engine knows no workload, the workloads
know neither the options' declarations nor the commands, and no two toyaccel modules import each other.

Read from the source (an AST walk, imports inside functions included), so an import added anywhere counts;
those under ``if TYPE_CHECKING:`` (annotations only) are not run and do not."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "toyaccel"
BASE = {"toyaccel.errors", "toyaccel.options", "toyaccel.limits"}  # utilities anyone may import
TOP = {"toyaccel.runner", "toyaccel.config", "toyaccel.default_rules", "toyaccel.validation", "toyaccel.saved"}
FACES = {"toyaccel", "toyaccel.cli", "toyaccel.inference", "toyaccel.export", "toyaccel.prepare"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def run_time_imports(tree: ast.AST):
    """Every import statement that runs (module level or in a function), skipping ``if TYPE_CHECKING:``."""
    children = tree.orelse if isinstance(tree, ast.If) and is_type_checking(tree) else ast.iter_child_nodes(tree)
    for node in children:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from run_time_imports(node)


def toyaccel_imports(name: str) -> set[str]:
    """The toyaccel modules ``name`` imports (``from toyaccel.x import y`` names toyaccel.x.y where y is a module)."""
    found = set()
    for node in run_time_imports(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        assert node.level == 0, f"{name}: relative import"
        for alias in node.names:
            sub = f"{node.module}.{alias.name}"
            found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m == "toyaccel" or m.startswith("toyaccel.")}


IMPORTS = {name: toyaccel_imports(name) for name in MODULES}


def layer_of(name: str) -> str:
    if name in BASE:
        return "base"
    if name.startswith("toyaccel.engine"):
        return "engine"
    if name.startswith("toyaccel.workloads"):
        return "workloads"
    if name in TOP:
        return "top"
    if name in FACES or name == "toyaccel.reference":
        return "faces"
    raise AssertionError(f"{name}: in no layer: add it to one (README's How it fits together)")


def offending(importers: str, allowed) -> list[str]:
    return sorted(
        f"{name} imports {target}"
        for name, targets in IMPORTS.items()
        if layer_of(name) == importers
        for target in targets
        if not allowed(target)
    )


def test_every_module_has_a_layer():
    assert {name: layer_of(name) for name in MODULES}


def test_engine_imports_only_engine_and_errors():
    assert offending("engine", lambda t: t.startswith("toyaccel.engine") or t == "toyaccel.errors") == []


def test_workloads_import_no_top_or_face_module():
    assert offending("workloads", lambda t: layer_of(t) in ("base", "engine", "workloads")) == []


def test_base_utilities_import_nothing_above_the_engine():
    assert offending("base", lambda t: layer_of(t) in ("base", "engine")) == []


def test_the_books_reference_code_stands_alone():
    # reference.py is the book's code as printed, beside ours: only torch, and no toyaccel module runs it.
    assert IMPORTS["toyaccel.reference"] == set()
    assert [name for name, targets in IMPORTS.items() if "toyaccel.reference" in targets] == []


def test_no_import_cycles():
    cycles, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(IMPORTS.get(name, ())):
            if target == "toyaccel" or target not in MODULES:
                continue  # the package's __init__ is the public face every submodule sits under
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [name])
    assert cycles == []
