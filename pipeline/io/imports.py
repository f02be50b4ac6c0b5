"""The project's own import graph, read from the source (ast), with no module imported.

Used to derive the code dependencies of each stage for ``dvc.yaml`` (:mod:`pipeline.app.dvcgen`),
the code bundle of the logged MLflow model (:func:`bundle_files`: the pyfunc module's closure, see
:mod:`pipeline.io.pyfunc`) and by the architecture tests (no circles, no upward imports between
layers). Standard library only: it travels inside that bundle.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
PACKAGE = PACKAGE_DIR.name  # "pipeline"


def module_files() -> dict[str, Path]:
    """``pipeline.x.y`` -> file, for every module of the package."""
    out: dict[str, Path] = {}
    for f in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = f.relative_to(PACKAGE_DIR.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module ``name`` refers to (a module, or the package of an imported attribute)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


@lru_cache(maxsize=1)
def import_graph() -> dict[str, frozenset[str]]:
    """module -> the package modules it imports (module level and inside functions)."""
    modules = module_files()
    graph: dict[str, frozenset[str]] = {}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_pkg = path.name == "__init__.py"
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # "from pkg import module" imports the module (the package's __init__ is not a
                # dependency of its own); "from module import name" imports the module.
                names = [f"{prefix}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                if n == PACKAGE or n.startswith(PACKAGE + "."):
                    target = _resolve(n, modules)
                    if target and target != mod:
                        found.add(target)
        graph[mod] = frozenset(found)
    return graph


def closure(module: str) -> list[str]:
    """``module`` and every package module it imports, directly or not (sorted)."""
    graph = import_graph()
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(graph.get(m, ()))
    return sorted(seen)


def cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (import circles)."""
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def bundle_files(module: str) -> list[Path]:
    """The files a copy of the package needs so that ``module`` imports from it alone: the module's
    closure plus the ``__init__.py`` of every package on the way (Python runs a package's
    ``__init__`` before any module below it; the closure leaves them out), with theirs."""
    files = module_files()
    todo = list(closure(module))
    seen: set[str] = set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        parts = mod.split(".")
        parents = [".".join(parts[:i]) for i in range(1, len(parts))]
        todo.extend(p for p in parents if p in files)
        todo.extend(closure(mod))
    return sorted(files[m] for m in seen)
