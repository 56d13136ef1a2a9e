"""The docs are true to the code: their Python examples run, their plugin tables are complete."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest

from prefixroute import default_registry

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def examples() -> list[tuple[str, int, str]]:
    out = []
    for path in DOCS:
        for i, m in enumerate(BLOCK.finditer(path.read_text(encoding="utf-8"))):
            out.append((path.name, i, m.group(1)))
    return out


@pytest.mark.parametrize(("name", "i", "code"), examples(), ids=lambda v: str(v)[:20])
def test_python_examples_run(
    name: str, i: int, code: str, capsys: pytest.CaptureFixture[str]
) -> None:
    exec(compile(code, f"{name}[{i}]", "exec"), {"__name__": f"doc_{i}"})


def test_there_are_examples_to_run() -> None:
    assert any(name == "README.md" for name, _, _ in examples())


def test_every_plugin_and_parameter_is_documented() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    registry = default_registry()
    for type_name in registry.types():
        row = next(
            (line for line in text.splitlines() if line.startswith(f"| `{type_name}`")), None
        )
        assert row is not None, f"{type_name} missing from docs/configuration.md"
        factory = registry.factory(type_name)
        for field in attrs.fields(factory):  # type: ignore[arg-type]
            assert f"`{field.alias}`" in row, f"{type_name}.{field.alias} undocumented"
            default = field.default
            if isinstance(default, int | float) and not isinstance(default, bool):
                assert f"({default})" in row or f"({default:g})" in row, (
                    f"{type_name}.{field.alias} default {default} not in docs"
                )
