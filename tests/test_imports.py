"""No import cycle anywhere in `src/prefixroute` (STYLE.md: the folder tree is the architecture).

The graph is read from the source with `ast`, not by importing it: every
`import x` and `from x import y` counts, wherever it stands (inside a
function, under `if TYPE_CHECKING:`, in a `try`), because a lazy or
type-only import back into a module that imports you is still a cycle of
design, only hidden from the interpreter. `importlib.import_module` with a
literal name counts too. Edges go to the module named: `from a.b import c`
points at `a.b.c` when that is a module of its own, else at `a.b`; a parent
package's `__init__` is not an edge, as in import-linter and pydeps.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "prefixroute"

Graph = dict[str, set[str]]


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every `.py` file under `root / package`."""
    out: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, list[str]]]:
    """(module named, names imported from it) for every import statement in `tree`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # `from . import x` in a.b.c names a.b; in package a.b (its __init__), a.b
                base = module.split(".")
                drop = node.level - 1 if is_package else node.level
                if drop:
                    base = base[:-drop]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            yield name, [alias.name for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value, []


def import_graph(root: Path, package: str) -> Graph:
    """Module -> the modules of `package` it imports (see the module docstring). O(source)."""
    modules = module_names(root, package)
    graph: Graph = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for target, names in _imported(tree, name, path.name == "__init__.py"):
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            if subs:  # `from pkg import module`
                graph[name].update(subs)
            if len(subs) < len(names) or not names:  # names defined in `target` itself
                while target and target not in modules:  # `import a.b.attr` is rare; be safe
                    target = target.rpartition(".")[0]
                if target:
                    graph[name].add(target)
        graph[name].discard(name)
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative). O(V + E)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = []
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        work.append((start, iter(sorted(graph[start]))))
        while work:
            node, edges = work[-1]
            for succ in edges:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, ())))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def cycle_path(graph: Mapping[str, set[str]], component: list[str]) -> list[str]:
    """One closed walk through `component`, for the message: a -> b -> ... -> a."""
    members = set(component)
    start = component[0]
    # breadth-first from start's successors back to start, inside the component
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & members):
                if succ == start:
                    path = [start]
                    while node != start:
                        path.append(node)
                        node = previous[node]
                    return [start, *reversed(path[1:]), start]
                if succ not in previous:
                    previous[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"{component} is not strongly connected")


# --- the project -------------------------------------------------------------------------


def test_no_import_cycle_in_the_package() -> None:
    graph = import_graph(SRC, PACKAGE)
    found = [" -> ".join(cycle_path(graph, c)) for c in cycles(graph)]
    assert not found, "import cycles:\n  " + "\n  ".join(found)


def test_the_graph_sees_the_package() -> None:
    graph = import_graph(SRC, PACKAGE)
    assert {"prefixroute", "prefixroute.router", "prefixroute.sim.workload"} <= set(graph)
    assert "prefixroute.request" in graph["prefixroute.openai"]
    assert "prefixroute.sim.trace" in graph["prefixroute.sim.workload_schema"]
    assert "prefixroute.sim.source" in graph["prefixroute.sim.trace"]
    assert "prefixroute.histogram" in graph["prefixroute.ledger"]


def test_the_broken_cycles_stay_broken() -> None:
    """The value stays plain; the generators and the trace do not know the scenario reader."""
    graph = import_graph(SRC, PACKAGE)
    assert graph["prefixroute.request"] == set()
    assert graph["prefixroute.sim.source"] == {"prefixroute.request"}
    for module in ("prefixroute.sim.workload", "prefixroute.sim.trace"):
        assert "prefixroute.sim.workload_schema" not in graph[module]
    assert "prefixroute.sim.workload" not in graph["prefixroute.sim.trace"]


def _layer(module: str) -> str:
    """Which part of the architecture a module belongs to (ARCHITECTURE.md's table)."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in {"drivers", "devtools", "sim", "cli"}:
        return parts[1]
    return "core"


# What each part may import besides itself: the core nothing else, the drivers only the
# core, the simulator the core and the drivers' file reader (it is a driver of its own
# that reads scenario and policy files); dev tools and the CLI may use anything.
LAYERS = {"core": {"core"}, "drivers": {"core"}, "sim": {"core"}}
CROSSINGS = {("sim", "prefixroute.drivers.documents")}


def test_the_layers_import_only_downwards() -> None:
    graph = import_graph(SRC, PACKAGE)
    wrong = [
        f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if _layer(module) in LAYERS
        and _layer(target) != _layer(module)
        and _layer(target) not in LAYERS[_layer(module)]
        and (_layer(module), target) not in CROSSINGS
    ]
    assert not wrong, "\n".join(wrong)


# --- the checker itself ------------------------------------------------------------------


def write(root: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


BASE = {"pkg/__init__.py": "", "pkg/sub/__init__.py": ""}


@pytest.mark.parametrize(
    ("files", "cycle"),
    [
        # a lazy import inside a function
        (
            {"pkg/a.py": "import pkg.b\n", "pkg/b.py": "def f():\n    from pkg.a import x\n"},
            ["pkg.a", "pkg.b"],
        ),
        # a TYPE_CHECKING back-import, relative
        (
            {
                "pkg/a.py": "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from .sub import c\n",
                "pkg/sub/c.py": "from .. import a\n",
            },
            ["pkg.a", "pkg.sub.c"],
        ),
        # `from pkg.sub import module` and a package __init__ that re-exports
        (
            {
                "pkg/sub/__init__.py": "from pkg.sub.c import C\n",
                "pkg/sub/c.py": "from pkg import d\n",
                "pkg/d.py": "from pkg.sub import C\n",
            },
            ["pkg.d", "pkg.sub", "pkg.sub.c"],
        ),
        # a literal importlib.import_module
        (
            {
                "pkg/a.py": "import importlib\nimportlib.import_module('pkg.b')\n",
                "pkg/b.py": "from pkg import a\n",
            },
            ["pkg.a", "pkg.b"],
        ),
    ],
)
def test_the_checker_finds_hidden_cycles(
    tmp_path: Path, files: dict[str, str], cycle: list[str]
) -> None:
    write(tmp_path, {**BASE, **files})
    graph = import_graph(tmp_path, "pkg")
    assert cycles(graph) == [cycle]
    path = cycle_path(graph, cycle)
    assert path[0] == path[-1] and set(path) == set(cycle)
    assert all(b in graph[a] for a, b in itertools.pairwise(path))


def test_the_checker_accepts_a_layered_package(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            **BASE,
            "pkg/value.py": "import numpy\n",
            "pkg/parse.py": "from pkg.value import V\nfrom . import value\n",
            "pkg/sub/use.py": "from ..parse import p\nfrom pkg import value, parse\n",
            "pkg/__init__.py": "from pkg.parse import p\nfrom pkg.value import V\n",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert cycles(graph) == []
    assert graph["pkg.sub.use"] == {"pkg.parse", "pkg.value"}
    assert graph["pkg.value"] == set()  # outside imports are not nodes
