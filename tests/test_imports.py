"""Imports point down and never loop (docs/architecture.md §1).

Every module of the package is read as source (ast, nothing imported), its `magnet_engine...`
imports resolved to modules, the lazy ones inside functions included. The layers are the
public surface (`magnet_engine.*`), the engine (`magnet_engine.engine`) and the kernels
(`magnet_engine.kernels`): the engine imports nothing above it, the kernels nothing but
kernels. And no two modules reach each other through their imports.
"""
from __future__ import annotations

import ast
import itertools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# setup.py's package_dir: three folders, one package
FOLDERS = {"magnet_engine": ROOT / "python" / "magnet_engine", "magnet_engine.engine": ROOT / "engine",
           "magnet_engine.kernels": ROOT / "kernels"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules `name` imports, anywhere in its source. `from a import b` is
    module a.b when that is a module, else module a (b a name in it)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[:len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:          # `import a.b.c` with c a name: a.b
                target = target.rpartition(".")[0]
            if target.startswith("magnet_engine") and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def layer(module: str) -> int:
    if module.startswith("magnet_engine.kernels"):
        return 0
    if module.startswith("magnet_engine.engine"):
        return 1
    return 2


def test_imports_point_down():
    up = sorted(f"{a} -> {b}" for a, targets in graph().items() for b in targets if layer(b) > layer(a))
    assert not up, "imports pointing up:\n" + "\n".join(up)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], itertools.count()

    def visit(v):
        index[v] = low[v] = next(counter)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def module_edges() -> dict[str, set[str]]:
    # a package's __init__ re-exporting its modules is not a loop of modules
    return {a: {b for b in targets if not a.startswith(b + ".")} for a, targets in graph().items()
            if a not in FOLDERS}


def test_no_import_cycles():
    found = cycles(module_edges())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for b in edges.get(todo.pop(), ()):
            if b not in seen:
                seen.add(b)
                todo.append(b)
    return seen


def test_no_cycles_through_a_subpackage():
    """A subpackage (engine.playdiffusion, server, server.routes) is one unit: `generate.run`
    dispatches PlayDiffusion's plan, so nothing in playdiffusion may use `generate`. A subpackage
    may use its parent's modules that sit below it (server.routes -> server.batcher, which reaches
    no router): layers inside one package, not a loop between packages."""
    subpackages = {name for name, path in modules().items() if path.name == "__init__.py" and name not in FOLDERS}

    def unit(module: str) -> str:   # the innermost subpackage holding the module
        return max((p for p in subpackages if module.startswith(p + ".")), key=len, default=module)
    module_graph = module_edges()

    def below(a: str, b: str) -> bool:
        inner = unit(a)
        return inner.startswith(unit(b) + ".") and not any(m.startswith(inner + ".") for m in reachable(module_graph, b))
    edges: dict[str, set[str]] = {}
    for a, targets in module_graph.items():
        edges.setdefault(unit(a), set()).update(unit(b) for b in targets if unit(b) != unit(a) and not below(a, b))
    found = cycles(edges)
    assert not found, "import cycles between packages:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_walk_sees_every_kind_of_import():
    edges = graph()
    assert "magnet_engine.engine.errors" in edges["magnet_engine.errors"]                    # from a import names
    assert {"magnet_engine.kernels.masking", "magnet_engine.engine.playdiffusion.plan"} <= edges[
        "magnet_engine.engine.generate"]                                                   # from a import module
    assert "magnet_engine.audio" in edges["magnet_engine.api"]                  # inside a function (read_audio)
    assert "magnet_engine.bench_hybrid" in edges["magnet_engine.bench"]         # the bench hand-offs, lazily


def test_relative_imports_resolve(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from ..engine import config\n    from . import masking\n")
    known = modules()
    assert imports("magnet_engine.kernels.x", source, known) == {"magnet_engine.engine.config",
                                                                 "magnet_engine.kernels.masking"}


def test_errors_live_in_the_engine_and_are_named_where_users_import_them():
    import pickle

    from magnet_engine import errors
    from magnet_engine.engine import errors as engine_errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert cls is getattr(engine_errors, name) and cls.__module__ == "magnet_engine.errors"
    error = pickle.loads(pickle.dumps(errors.ModelNotFoundError("no such model")))
    assert type(error) is errors.ModelNotFoundError and str(error) == "no such model"
