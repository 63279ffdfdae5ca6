"""The package's shape, checked from its source (DESIGN.md, "Layers"): no import cycle, no
private name imported across modules, no `TYPE_CHECKING` import, `sharding.py` below everything
but the models, and no function over 80 lines of code without a stated reason."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxalign"
LONG_FUNCTION_MARK = "# long function:"  # the comment that states why a function is longer
MAX_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def imports(name: str) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every `import` / `from ... import` of a jaxalign module in the
    module's source, at any depth (function-level imports count: they run too). A name that is
    itself a module (`from jaxalign.models import heads`) counts as that module."""
    found = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "jaxalign"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jaxalign":
            names = [a.name for a in node.names]
            subs = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in MODULES]
            found.append((node.module, [n for n in names if f"{node.module}.{n}" not in MODULES]))
            found += [(s, []) for s in subs]
    return found


def graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in imports(name) if m in MODULES and m != name} for name in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    edges = graph()
    assert len(edges) > 40  # the walk saw the package
    assert find_cycle(edges) is None


def test_only_the_top_level_imports_the_top_level():
    offenders = [name for name in MODULES if name != "jaxalign" and "jaxalign" in graph()[name]]
    assert offenders == []


def test_no_private_name_crosses_modules():
    crossings = [
        f"{name} imports {module}.{n}"
        for name in MODULES
        for module, names in imports(name)
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert crossings == []


def test_no_type_checking_import():
    assert [name for name, path in MODULES.items() if "TYPE_CHECKING" in path.read_text()] == []


def test_sharding_imports_nothing_above_the_models():
    above = {m for m in graph()["jaxalign.sharding"] if not m.startswith("jaxalign.models")}
    assert above == set()


def code_lines(node: ast.FunctionDef, source: list[str]) -> int:
    """Lines of a function's body that hold code: not its docstring, blank lines or comments."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # the docstring
    if not body:
        return 0
    lines = source[body[0].lineno - 1 : node.end_lineno]
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def test_no_function_over_80_lines_without_a_reason():
    long = []
    for name, path in MODULES.items():
        source = path.read_text().splitlines()
        for node in ast.walk(TREES[name]):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                text = "\n".join(source[node.lineno - 1 : node.end_lineno])
                if code_lines(node, source) > MAX_LINES and LONG_FUNCTION_MARK not in text:
                    long.append(f"{name}.{node.name}: {code_lines(node, source)} lines")
    assert long == []
