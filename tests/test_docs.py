"""The docs are true to the code: their Python examples run, their plugin tables are complete."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from prefixroute import default_registry
from prefixroute.schema import parameters

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
        assert isinstance(factory, type)
        for field in parameters(factory).values():
            assert f"`{field.alias}`" in row, f"{type_name}.{field.alias} undocumented"
            default = field.default
            if isinstance(default, int | float) and not isinstance(default, bool):
                assert f"({default})" in row or f"({default:g})" in row, (
                    f"{type_name}.{field.alias} default {default} not in docs"
                )


SCENARIO_BLOCK = re.compile(r"```yaml\n(name: .*?)```", re.S)


def test_scenario_examples_in_the_simulator_docs_load() -> None:
    import yaml

    from prefixroute.sim.compare import make_source
    from prefixroute.sim.scenario import load_scenario

    text = (ROOT / "docs" / "simulator.md").read_text(encoding="utf-8")
    blocks = SCENARIO_BLOCK.findall(text)
    assert len(blocks) >= 3
    for block in blocks:
        scenario = load_scenario(yaml.safe_load(block))
        if "trace" not in scenario.workload:  # the trace example names a file of the reader's
            make_source(scenario)


def test_simulator_docs_name_every_builtin() -> None:
    from prefixroute.sim.policy import builtin_policies
    from prefixroute.sim.scenario import builtin_scenarios

    text = (ROOT / "docs" / "simulator.md").read_text(encoding="utf-8")
    for name in builtin_scenarios() + builtin_policies():
        assert f"| `{name}` |" in text, f"docs/simulator.md does not list {name}"


NAMED_YAML = re.compile(r"```yaml\n# (\S+\.yaml)\n(.*?)```", re.S)


def test_the_api_key_example_in_the_tenants_docs_loads(tmp_path: Path) -> None:
    """docs/tenants.md's isolation example: check-config passes it; keys beat headers."""
    from prefixroute.cli import check_config
    from prefixroute.drivers.settings import DriverConfig
    from prefixroute.request import RequestError

    files = NAMED_YAML.findall((ROOT / "docs" / "tenants.md").read_text(encoding="utf-8"))
    assert {name for name, _ in files} == {"gateway.yaml", "keys.yaml"}
    for name, text in files:
        (tmp_path / name).write_text(text, encoding="utf-8")
    config = tmp_path / "gateway.yaml"
    assert check_config(config)[0] == "gateway"
    driver = DriverConfig.from_file(config)
    assert driver.build_router().blocker.isolate_tenants
    identity = driver.identity
    keyed = {"authorization": "Bearer sk-acme-3f9a1c07e2b84d6f", "x-tenant-id": "globex"}
    assert identity.resolve(keyed, {}).tenant == "acme"
    with pytest.raises(RequestError) as refused:
        identity.resolve({"x-tenant-id": "acme"}, {})
    assert refused.value.status == 401
