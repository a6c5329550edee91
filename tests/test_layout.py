"""The package's layout is its architecture: no import cycles, and the Manager
side and the wire import nothing from the client side, Django or gunicorn.

Read statically (every import statement, at any depth, lazy ones included),
so a new dependency that breaks the layout fails here, not in production.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "django_clustershm"
PACKAGE = "django_clustershm"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """Every module ``name`` imports (package-internal ones resolved, others as written)."""
    path = MODULES[name]
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import conf` imports a module, not the package's names
                if f"{target}.{alias.name}" in MODULES:
                    found.add(f"{target}.{alias.name}")
                else:
                    found.add(target)
    return found


GRAPH = {name: {m for m in _imports(name) if m in MODULES} for name in MODULES}


def test_the_layout_is_what_the_readme_says():
    for package in ("client", "server", "wire", "serve"):
        assert f"{PACKAGE}.{package}" in MODULES
    for old in ("protocol", "engine", "store", "caches", "locks", "listeners", "near", "manager", "cluster"):
        assert f"{PACKAGE}.{old}" not in MODULES, f"{old}.py came back at the top level"


@pytest.mark.parametrize("side", ["server", "wire"])
def test_the_manager_side_and_the_wire_import_no_client_django_or_gunicorn(side):
    for name in MODULES:
        if name.startswith(f"{PACKAGE}.{side}"):
            for imported in _imports(name):
                assert not imported.startswith((f"{PACKAGE}.client", "django.", "gunicorn")), (name, imported)
                assert imported not in ("django", "gunicorn"), (name, imported)
                if side == "wire":
                    assert not imported.startswith(f"{PACKAGE}.server"), (name, imported)


def test_the_client_side_imports_no_django_or_gunicorn():
    for name in MODULES:
        if name.startswith(f"{PACKAGE}.client"):
            for imported in _imports(name):
                assert not imported.startswith(("django.", "gunicorn")) and imported not in ("django", "gunicorn"), (
                    name,
                    imported,
                )


def test_no_import_cycles():
    # Package __init__ modules re-export their submodules; an edge from a
    # submodule to its own package's __init__ (or up to the top package, which
    # only re-exports) would be a cycle too, except the top package, whose
    # __init__ every submodule runs first anyway and which nothing imports back.
    graph = {n: {m for m in deps if m != PACKAGE} for n, deps in GRAPH.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(dep) :], dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not any(PACKAGE in deps for name, deps in GRAPH.items() if name != PACKAGE)
