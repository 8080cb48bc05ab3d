"""Imports go one way inside each package (docs/design.md): no module imports, at the top or
late inside a function, a module that imports it back, directly or through others.  A circle
means no file of it can be read or changed on its own."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "resnext", "benchmarks")


def import_graph(package: str) -> dict:
    """{module: the package's modules it imports}, every import statement of the file counted."""
    folder = ROOT / package
    modules = {p.stem for p in folder.glob("*.py")}
    graph = {}
    for path in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                absolute = node.level == 0 and (node.module or "").split(".")[0] == package
                if node.level == 1 or absolute:
                    parts = (node.module or "").split(".")[absolute:]  # the module path below the package
                    deps |= {parts[0]} if parts and parts[0] else {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names
                         if a.name.startswith(package + ".")}
        graph[path.stem] = {d for d in deps if d in modules and d != path.stem}
    return graph


def circles(graph: dict) -> list:
    """Every elementary cycle of the graph, each once (rotated to start at its smallest name)."""
    found = set()

    def walk(node, path):
        for nxt in graph.get(node, ()):
            if nxt in path:
                cycle = path[path.index(nxt):]
                i = cycle.index(min(cycle))
                found.add(tuple(cycle[i:] + cycle[:i]))
            else:
                walk(nxt, path + [nxt])

    for start in graph:
        walk(start, [start])
    return sorted(found)


def test_the_checker_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]
    assert circles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circles(package):
    graph = import_graph(package)
    assert len(graph) > 3, f"{package}: no modules found"
    found = circles(graph)
    assert not found, f"{package}: import circles " + "; ".join(" -> ".join(c + (c[0],)) for c in found)
