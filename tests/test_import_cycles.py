"""No import cycles in oscqat/ (the library) and oscqat/app/ (the application): the module import graph, read from
the source with ast and counting imports inside functions as well as at the top, has no cycle. A cycle hidden by a
function-level import is still a cycle: the shared piece belongs in a module both can import."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports anywhere in its source (top level, functions, branches)}. A
module's own parent packages are not counted unless it names them: Python imports them first in any case."""
    root = package_dir.parent
    files = {module_name(p, root): p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts}
    graph = {}
    for mod, path in files.items():
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]     # the module's package
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):            # `import a.b`: a.b (its parents are implied)
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[:len(here) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                for alias in node.names:                # `from pkg import x`: the module pkg.x, else pkg
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if sub in files else target)
        graph[mod] = {e for e in edges if e in files and e != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each holds at least one cycle)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _explain(graph, comp) -> str:
    return "\n".join(f"  {m} -> {', '.join(sorted(graph[m] & set(comp)))}" for m in comp)


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n    return b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("import os\nfrom .. import c\n")
    (pkg / "c.py").write_text("def g():\n    from pkg.a import f\n")
    g = import_graph(pkg)
    assert g == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(), "pkg.sub.b": {"pkg.c"},
                 "pkg.c": {"pkg.a"}}
    assert cycles(g) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert cycles({"x": {"y"}, "y": set()}) == []


def test_oscqat_and_its_application_import_without_cycles():
    graph = import_graph(ROOT / "oscqat")
    assert "oscqat.app.train" in graph and "oscqat.nn.quantizers" in graph
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n\n".join(_explain(graph, c) for c in found)


def test_the_application_is_built_on_the_library_alone():
    """oscqat/app/ imports oscqat; nothing in the library imports oscqat/app/."""
    graph = import_graph(ROOT / "oscqat")
    lib = {m: e for m, e in graph.items() if not m.startswith("oscqat.app")}
    assert not {m: e for m, e in lib.items() if any(x.startswith("oscqat.app") for x in e)}


# The library's rooms, each importing only rooms listed before it (and oscqat.errors, which imports nothing).
ROOMS = ("oscqat.ops", "oscqat.nn", "oscqat.training", "oscqat.export")


def _room(module: str) -> str | None:
    return next((r for r in ROOMS if module == r or module.startswith(r + ".")), None)


def test_rooms_import_only_earlier_rooms():
    """ops (the op contract and backends) <- nn (modules, prepare) <- training, export: a room never imports a
    later one, so each can be read knowing only the rooms before it. training and export do not import each other."""
    graph = import_graph(ROOT / "oscqat")
    assert {_room(m) for m in graph} >= set(ROOMS)
    wrong = []
    for mod, edges in graph.items():
        here = _room(mod)
        if here is None:
            continue
        for e in edges:
            there = _room(e)
            if there is None:
                assert e in ("oscqat", "oscqat.errors", "oscqat._C"), f"{mod} imports {e}, outside the rooms"
            elif there != here and (ROOMS.index(there) > ROOMS.index(here)
                                    or min(ROOMS.index(here), ROOMS.index(there)) >= 2):
                wrong.append(f"{mod} -> {e}")
    assert not wrong, "a room imports a later one: " + ", ".join(sorted(wrong))
