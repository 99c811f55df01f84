"""The import graph of the three packages has no circle, so a picture of it reads top to bottom.

The graph is read from the source (``ast``, nothing imported): an edge for each ``import`` of one of the
packages' modules, noted as module-level (run when the module is imported) or function-level (run when the
function is called: the lazy imports that keep vLLM and torch out of light paths). Imports under ``if
TYPE_CHECKING:`` never run and are left out. A circle of module-level imports fails; so does one that only
closes through function-level imports (a lazy import that reaches back up the graph hides a circle, it does
not remove it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("online_dpo_protocol", "generator_server", "trainer_client")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = modules()


def resolve(name: str) -> str | None:
    """The module of ours that importing ``name`` runs (``a.b.C`` -> ``a.b``), or None for others."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> tuple[set[str], set[str]]:
    """``(module-level, function-level)`` imports of ``module`` among our modules."""
    top: set[str] = set()
    lazy: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for orelse in child.orelse:
                    visit(orelse, in_function)
                continue
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the module's own package
                    package = module.split(".")
                    package = package[: len(package) - child.level + (MODULES[module].name == "__init__.py")]
                    base = ".".join(package + ([base] if base else []))
                names = [f"{base}.{alias.name}" for alias in child.names]  # a submodule, or a name of base
            else:
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
                continue
            for name in names:
                target = resolve(name)
                if target is not None and target != module:
                    (lazy if in_function else top).add(target)

    visit(ast.parse(MODULES[module].read_text(), str(MODULES[module])), False)
    return top, lazy - top


GRAPH = {module: imports(module) for module in MODULES}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each as a list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def describe(component: list[str], edges: dict[str, set[str]]) -> str:
    return "; ".join(f"{m} -> {sorted(edges[m] & set(component))}" for m in component)


def test_the_graph_is_read():
    """The reader finds what is there: a module-level and a function-level import of ours."""
    top, lazy = GRAPH["trainer_client.backends"]
    assert "trainer_client.generation" in top and "trainer_client.colocate" in lazy
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("which", ["module-level", "with function-level"])
def test_no_import_circle(which):
    edges = {m: top | (lazy if which != "module-level" else set()) for m, (top, lazy) in GRAPH.items()}
    found = circles(edges)
    assert not found, "import circles: " + " | ".join(describe(c, edges) for c in found)


def test_the_protocol_is_at_the_bottom():
    """online_dpo_protocol imports neither package; the backend protocol none of its implementations."""
    for module, (top, lazy) in GRAPH.items():
        if module.startswith("online_dpo_protocol"):
            assert all(m.startswith("online_dpo_protocol") for m in top | lazy), (module, top | lazy)
    top, lazy = GRAPH["trainer_client.generation"]
    implementations = {"trainer_client.server_backend", "trainer_client.replicas", "trainer_client.colocate"}
    assert not (top | lazy) & (implementations | {"trainer_client.backends", "trainer_client.train"})


def test_the_server_does_not_import_the_trainer():
    for module, (top, lazy) in GRAPH.items():
        if module.startswith("generator_server"):
            assert not [m for m in top | lazy if m.startswith("trainer_client")], module
