"""The core stays pure: no I/O libraries, clocks, threads or async (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "prefixroute"
DRIVERS = {"cli.py", "config.py"}  # config reads a file at the boundary; cli prints
FORBIDDEN_MODULES = {
    "httpx",
    "starlette",
    "uvicorn",
    "grpc",
    "zmq",
    "redis",
    "prometheus_client",
    "socket",
    "asyncio",
    "threading",
    "subprocess",
    "time",
    "datetime",
    "os",
    "urllib",
    "requests",
}
FORBIDDEN_PACKAGES = (
    "prefixroute.drivers",
    "prefixroute.devtools",
    "prefixroute.sim",
    "prefixroute.cli",
)


def core_modules() -> list[Path]:
    return [
        p
        for p in SRC.rglob("*.py")
        if p.name not in DRIVERS
        and not {"drivers", "devtools", "sim"} & set(p.relative_to(SRC).parts)
    ]


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: p.name)
def test_core_module_is_pure(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN_MODULES, f"{path.name} imports {name}"
            assert not name.startswith(FORBIDDEN_PACKAGES), f"{path.name} imports {name}"
        assert not isinstance(node, ast.AsyncFunctionDef | ast.Await), f"{path.name} is async"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in {"open", "print", "input"}, (
                f"{path.name} calls {node.func.id}"
            )


def test_the_purity_check_sees_the_core() -> None:
    names = {p.name for p in core_modules()}
    assert {"router.py", "index.py", "blocks.py", "scorers.py"} <= names
