"""The core only decides: what its modules may import and call (ARCHITECTURE.md).

The core is everything under `src/prefixroute` except `drivers/`, `devtools/`,
`sim/` and `cli.py`, with no exemption. It is checked against an allow-list:
a core module may import the pure standard-library modules below, numpy,
attrs and other core modules, and nothing else (no I/O library, no clock, no
thread, no environment, no YAML, no driver, no simulator). An import outside
the list fails with the module and the import named; widening the list is a
reviewed decision, not a side effect. Imports inside functions count too.

Beyond imports: nothing is `async`; no call to the builtins that do I/O,
import dynamically or hash per process (`hash()` of a str follows
`PYTHONHASHSEED`); no file I/O through an allowed module (`json.load`,
`numpy.load`, ...); no module-level `random` function (hidden global state:
randomness is a `random.Random` the caller passes).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "prefixroute"
NOT_CORE_DIRS = frozenset({"drivers", "devtools", "sim"})
NOT_CORE_FILES = frozenset({"cli.py"})

ALLOWED_STDLIB = frozenset(
    {
        "__future__",
        "abc",
        "bisect",
        "collections",
        "copy",
        "dataclasses",
        "decimal",
        "enum",
        "fractions",
        "functools",
        "hashlib",
        "heapq",
        "itertools",
        "json",  # parsing and dumping strings; json.load/json.dump are refused below
        "math",
        "numbers",
        "operator",
        "random",  # for `random.Random`; module-level functions are refused below
        "re",
        "statistics",
        "string",
        "struct",
        "types",
        "typing",
        "unicodedata",
    }
)
"""Standard-library modules with no I/O, clock, thread, process or environment access."""

ALLOWED_THIRD_PARTY = frozenset({"numpy", "attrs", "numba"})
"""The core's runtime dependencies (pyproject: numpy and attrs; PyYAML is the drivers').

numba (the optional `fast` extra) compiles kernels that the pure paths beside
them compute bit for bit (`prefixroute.jit`); it decides nothing.
"""

FORBIDDEN_BUILTINS = frozenset(
    {"open", "print", "input", "breakpoint", "exec", "eval", "compile", "__import__", "hash"}
)
FORBIDDEN_ATTRIBUTE_CALLS = frozenset(
    {
        "json.load",
        "json.dump",
        "numpy.load",
        "numpy.save",
        "numpy.savez",
        "numpy.savez_compressed",
        "numpy.loadtxt",
        "numpy.savetxt",
        "numpy.genfromtxt",
        "numpy.fromfile",
        "numpy.memmap",
    }
)
RANDOM_ALLOWED_CALLS = frozenset({"random.Random"})


def is_core(path: Path) -> bool:
    rel = path.relative_to(SRC)
    return not (NOT_CORE_DIRS & set(rel.parts[:-1])) and str(rel) not in NOT_CORE_FILES


def core_modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if is_core(p))


def module_name(path: Path, src: Path = SRC) -> str:
    """The dotted module name of `path` (a package's `__init__.py` is the package)."""
    parts = path.relative_to(src.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


ALL_MODULES = frozenset(module_name(p) for p in SRC.rglob("*.py"))
CORE_MODULES = frozenset(module_name(p) for p in core_modules())


def import_allowed(name: str) -> bool:
    """Whether a core module may import the module `name` (absolute, dotted).

    For prefixroute's own modules, the longest existing module that `name`
    starts with decides (`prefixroute.Router` is a name in `prefixroute`):
    it must be a core module, never a driver, dev tool, simulator or the CLI.
    """
    top = name.split(".")[0]
    if top in ALLOWED_STDLIB or top in ALLOWED_THIRD_PARTY:
        return True
    if top != "prefixroute":
        return False
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in ALL_MODULES:
            return prefix in CORE_MODULES
    return False


def resolve(node: ast.ImportFrom, package: str) -> str:
    """The absolute module an ImportFrom reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imported_modules(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """The modules an import loads (`from prefixroute import x`: x may be a submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = resolve(node, package)
    if base == "prefixroute":
        return [f"prefixroute.{a.name}" if a.name != "*" else base for a in node.names]
    return [base]


def dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """`np.random.seed` -> "numpy.random.seed" when `np` is an imported module alias."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in aliases:
        return None
    return ".".join([aliases[node.id], *reversed(parts)])


def violations(path: Path, src: Path = SRC) -> list[str]:
    """Every way the module at `path` (under `src`) breaks the core's rules, each named."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(src.parent)
    name = module_name(path, src)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    aliases: dict[str, str] = {}  # local name -> module, for attribute-call checks
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for name in imported_modules(node, package):
                if not import_allowed(name):
                    out.append(f"{rel}:{node.lineno} imports {name} (not on the core's allow-list)")
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:
                        top = a.name.split(".")[0]
                        aliases[top] = top
            else:
                base = resolve(node, package)
                for a in node.names:
                    aliases[a.asname or a.name] = f"{base}.{a.name}"
        elif isinstance(node, ast.AsyncFunctionDef | ast.Await | ast.AsyncFor | ast.AsyncWith):
            out.append(f"{rel}:{node.lineno} is async")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_BUILTINS:
            if node.func.id not in aliases:  # a builtin, not a local import of that name
                out.append(f"{rel}:{node.lineno} calls {node.func.id}()")
            continue
        target = (
            aliases.get(node.func.id)
            if isinstance(node.func, ast.Name)
            else dotted(node.func, aliases)
        )
        if target is None:
            continue
        if target in FORBIDDEN_ATTRIBUTE_CALLS:
            out.append(f"{rel}:{node.lineno} calls {target}() (file I/O)")
        elif target.startswith(("random.", "numpy.random.")) and target not in RANDOM_ALLOWED_CALLS:
            if target.startswith("numpy.random.") and target.rpartition(".")[2][:1].isupper():
                continue  # a Generator or bit generator class, seeded by its caller
            out.append(f"{rel}:{node.lineno} calls {target}() (global random state)")
    return out


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_core_module_is_pure(path: Path) -> None:
    found = violations(path)
    assert not found, "\n".join(found)


def test_the_purity_check_sees_the_whole_core() -> None:
    names = {str(p.relative_to(SRC)) for p in core_modules()}
    assert {"__init__.py", "router.py", "index.py", "blocks.py", "config.py"} <= names
    assert "cli.py" not in names
    assert not any(n.split("/")[0] in NOT_CORE_DIRS for n in names)


@pytest.mark.parametrize(
    ("source", "culprit"),
    [
        ("import os", "imports os"),
        ("from pathlib import Path", "imports pathlib"),
        ("import yaml", "imports yaml"),
        ("import time", "imports time"),
        ("from prefixroute.sim import engine", "imports prefixroute.sim"),
        ("from prefixroute import cli", "imports prefixroute.cli"),
        ("from prefixroute.drivers.pool import EndpointPool", "imports prefixroute.drivers.pool"),
        ("from . import devtools", "imports prefixroute.devtools"),
        ("def f():\n    import socket", "imports socket"),
        ("async def f():\n    pass", "is async"),
        ("print('x')", "calls print()"),
        ("open('f')", "calls open()"),
        ("hash('tenant')", "calls hash()"),
        ("import json\njson.load(f)", "calls json.load() (file I/O)"),
        ("import numpy as np\nnp.load('x.npy')", "calls numpy.load() (file I/O)"),
        ("import random\nrandom.random()", "calls random.random() (global random state)"),
        ("from random import shuffle\nshuffle(x)", "calls random.shuffle() (global random state)"),
        ("import numpy as np\nnp.random.seed(0)", "calls numpy.random.seed()"),
    ],
)
def test_the_check_names_what_breaks_the_rules(tmp_path: Path, source: str, culprit: str) -> None:
    fake_src = tmp_path / "prefixroute"
    fake_src.mkdir()
    module = fake_src / "bad.py"
    module.write_text(source + "\n", encoding="utf-8")
    found = violations(module, fake_src)
    assert any(culprit in v and "bad.py" in v for v in found), found


@pytest.mark.parametrize(
    "source",
    [
        "import math\nfrom collections import OrderedDict",
        "import numpy as np\nimport numpy.typing as npt\nnp.random.default_rng",
        "import numpy as np\nnp.random.Generator(np.random.PCG64(0))",
        "import attrs\nfrom prefixroute.router import Router",
        "import random\nrng = random.Random(0)\nrng.random()",
        "import json\njson.loads('{}')",
        "from prefixroute import Router",
    ],
)
def test_the_check_lets_pure_code_through(tmp_path: Path, source: str) -> None:
    fake_src = tmp_path / "prefixroute"
    fake_src.mkdir()
    module = fake_src / "good.py"
    module.write_text(source + "\n", encoding="utf-8")
    assert violations(module, fake_src) == []
