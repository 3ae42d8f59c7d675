"""Import hygiene of the hf_zero package, read from the source (nothing is imported).

Why: a cycle between two modules works only while one of them imports the other inside a
function, and breaks (a half-initialised module, an ImportError) the day someone moves that
import to the top. The engine is the lowest layer: the doctor and the Trainer seams import it,
never the other way round.

Every ``import`` and ``from ... import`` of an hf_zero module counts, at any depth (inside
functions too). ``from hf_zero.engine.offload import nvme_files`` is an edge to the submodule
``hf_zero.engine.offload.nvme_files``; ``from hf_zero.engine import ZeroEngine`` one to the package
``hf_zero.engine`` (its ``__init__.py``). Importing a submodule also runs its parents'
``__init__.py``, but that edge is left out: a package importing its own submodules is not a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "hf_zero"

# Layers the engine must not import from: it sits below both.
ENGINE_MUST_NOT_IMPORT = ("hf_zero.doctor", "hf_zero.trainer")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(level: int, module: str | None, is_package: bool, this: str) -> str:
    """The absolute name ``from <level dots><module> import`` refers to, inside module ``this``."""
    if level == 0:
        return module or ""
    parts = this.split(".")
    if not is_package:
        parts = parts[:-1]
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([module] if module else []))


def _edges(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The hf_zero modules that module ``name`` imports, anywhere in its body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()

    def add(target: str) -> None:
        # The longest known prefix: `import hf_zero.engine.offload.settings` names that module.
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hf_zero":
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.level, node.module, is_package, name)
            if base.split(".")[0] != "hf_zero":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base)
    return out


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _edges(name, path, known) for name, path in known.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (iterative DFS, three colours)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = BLACK
                stack.pop()
                path.pop()
            elif colour.get(child) == GREY:
                return path[path.index(child):] + [child]
            elif colour.get(child) == WHITE:
                colour[child] = GREY
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_finder_sees_a_cycle():
    """The checker itself: a two-module cycle and a three-module cycle are found."""
    assert _find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_edges_include_imports_inside_functions():
    """An import inside a function body is an edge like one at the top."""
    graph = _graph()
    # nvme_swap.py's import of nvme_files sits at the top; seams.py's of hf_zero.init.plugin
    # inside a function: both are seen.
    assert "hf_zero.engine.offload.nvme_files" in graph["hf_zero.engine.offload.nvme_swap"]
    assert "hf_zero.init.plugin" in graph["hf_zero.trainer.seams"]


def test_no_import_cycle():
    cycle = _find_cycle(_graph())
    if cycle is not None:
        pytest.fail("import cycle in hf_zero: " + " -> ".join(cycle))


def test_engine_imports_no_higher_layer():
    bad = sorted(
        f"{name} imports {target}"
        for name, targets in _graph().items()
        if name.startswith("hf_zero.engine")
        for target in targets
        if target.startswith(ENGINE_MUST_NOT_IMPORT)
    )
    if bad:
        pytest.fail("the engine imports a layer above it: " + "; ".join(bad))
