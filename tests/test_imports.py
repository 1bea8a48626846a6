"""The layering of the code, read from every module's imports (ast: nothing is imported).

Every import counts, at module level or inside a function (a lazy import hides a cycle but
does not remove it); only imports under `if TYPE_CHECKING:` are left out, as they never run.
The rules are those of ARCHITECTURE.md.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "bench", "loadtest")

# (importer prefix, imported prefix) pairs that must never occur
FORBIDDEN = [
    ("server.lora", "server.model"), ("server.lora", "server.engine"), ("server.lora", "server.api"),
    ("server.structured", "server.engine"), ("server.structured", "server.api"),
    ("server.model", "server.engine"), ("server.model", "server.api"),
    ("server.engine", "server.api"),
    ("server", "tests"), ("bench", "tests"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imports_of(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}   # `from server.engine import isolation`
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    files |= {module_name(p): p for p in (ROOT / "tests").rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in files.items():
        if name.startswith("tests"):
            continue
        edges[name] = {m for m in imports_of(path, name) if m in files or m.split(".")[0] == "tests"}
    return edges


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_no_forbidden_imports():
    bad = sorted(f"{a} imports {b}" for a, deps in graph().items() for b in deps
                 for src, dst in FORBIDDEN if _under(a, src) and _under(b, dst))
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    edges = graph()
    # package __init__ modules are where their children are imported from; an edge to a
    # package stands for its __init__ only
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt == node or nxt not in edges:
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("pkg", ["server"])
def test_modules_stay_near_300_lines(pkg):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 320}
    assert not long, long


def test_the_rule_reader_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import server.api.app\n"
                 "def g():\n    from server.engine import engine\n")
    found = imports_of(f, "server.lora.m")
    assert "server.engine.engine" in found and "server.api.app" not in found
