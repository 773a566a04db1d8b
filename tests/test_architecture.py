"""The package's layering (ARCHITECTURE.md): each layer imports only the layers below it,
and no module imports itself back through others. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lymphdx"
# bottom to top; a module may import its own layer and the layers before it
LAYERS = ["core", "stats", "io", "data", "models", "engine", "reporting", "workflows", "cli"]
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The lymphdx modules that ``path`` imports, relative imports resolved; ``from a
    import b`` counts as ``a.b`` when that is a module, else as ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        out.update(t for t in targets if t.split(".")[0] == "lymphdx" and t != "lymphdx")
    return out


def _top(module: str) -> str:
    """``lymphdx.<top>...``'s layer name: ``cli_<command>`` modules are the cli layer."""
    top = module.split(".")[1]
    return "cli" if top.startswith("cli_") else top


def _layer(module: str) -> int | None:
    """The layer index of ``lymphdx.<layer>...``; None for the package root and data."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in ("__main__", "configs"):
        return None
    return LAYERS.index(_top(module))


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, m, set(modules)) for m, p in modules.items()}


def test_every_module_is_in_a_layer() -> None:
    stray = [
        m
        for m in _modules()
        if m.count(".") and _top(m) not in LAYERS and m.split(".")[1] not in ("__main__", "configs")
    ]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_no_upward_import() -> None:
    upward = []
    for module, deps in _graph().items():
        own = _layer(module)
        for dep in deps:
            theirs = _layer(dep)
            if own is not None and theirs is not None and theirs > own:
                upward.append(f"{module} -> {dep}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_module_size(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)}: {lines} lines > {MAX_LINES}"


def test_the_checker_sees_a_planted_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """The checks above on a hand-made package: core.a -> engine.b (upward), engine.b ->
    core.a (a cycle through two layers)."""
    for rel, text in {
        "lymphdx/__init__.py": "",
        "lymphdx/core/__init__.py": "",
        "lymphdx/core/a.py": "def f():\n    from lymphdx.engine import b\n",
        "lymphdx/engine/__init__.py": "",
        "lymphdx/engine/b.py": "from ..core.a import f\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "lymphdx"
    try:
        graph = _graph()
        assert graph["lymphdx.core.a"] == {"lymphdx.engine.b"}
        assert graph["lymphdx.engine.b"] == {"lymphdx.core.a"}
        with pytest.raises(AssertionError, match="core.a -> lymphdx.engine.b"):
            test_no_upward_import()
        with pytest.raises(AssertionError, match="import cycles"):
            test_no_import_cycle()
    finally:
        PACKAGE = saved
