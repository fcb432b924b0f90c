"""The package's structure: what imports what, read from the code."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "featx"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The featx modules `name` imports anywhere in it, lazy imports in functions included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
    return {m for m in found if m in mods and m != name}


def test_the_library_has_no_import_cycles():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    assert {"featx.config", "featx.storage"} <= graph.keys() and graph["featx.train"]
    cycles = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                cycles.append(" -> ".join([*path, start]))
            elif nxt > start and nxt not in path:
                walk(start, nxt, [*path, nxt])

    for m in sorted(graph):
        walk(m, m, [m])
    assert not cycles, "\n".join(cycles)


def test_only_the_entry_points_import_ingest():
    """featx.dataset owns the format: the stages that read datasets go through it, never
    through the stage that writes them."""
    mods = _modules()
    importers = sorted(m for m, p in mods.items() if "featx.ingest" in _imports(m, p, mods))
    assert importers == ["featx.cli", "featx.pipeline"], importers


def test_the_library_never_imports_its_flows():
    """flows/ imports featx, never the other way: the commands that run flows join the CLI
    through an entry point."""
    mods = _modules()
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            assert not [n for n in names if n.split(".")[0] == "flows"], (name, names)
