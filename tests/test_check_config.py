"""`prefixroute check-config`: every config document the project ships passes, as its kind.

The shipped documents are found on disk (a new example, policy or scenario is
checked without editing this file, and an example must say here which kind it
is); broken documents fail with one line naming the file and the field.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prefixroute.cli import CONFIG_KINDS, check_config, config_kind, main
from prefixroute.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SIM = ROOT / "src" / "prefixroute" / "sim"

# examples/envoy holds Envoy's own configs, examples/grafana a dashboard: not ours to check.
EXAMPLE_KINDS = {
    "default.yaml": "router",
    "gateway.yaml": "gateway",
    "gie-approximate.yaml": "router",
    "isolated-tenants.yaml": "router",
}


def _policy_kind(path: Path) -> str:
    """A built-in policy with a `simulator` section is a policy; without one, a router config."""
    return "policy" if "simulator" in yaml.safe_load(path.read_text()) else "router"


def shipped() -> list[tuple[Path, str]]:
    out = [(path, EXAMPLE_KINDS.get(path.name, "?")) for path in sorted(EXAMPLES.glob("*.yaml"))]
    out += [(path, _policy_kind(path)) for path in sorted((SIM / "policies").glob("*.yaml"))]
    out += [(path, "scenario") for path in sorted((SIM / "scenarios").glob("*.yaml"))]
    return out


def test_the_shipped_documents_are_found() -> None:
    kinds = {kind for _, kind in shipped()}
    assert {"router", "gateway", "policy", "scenario"} <= kinds
    assert len(shipped()) >= 20


@pytest.mark.parametrize(
    ("path", "kind"), shipped(), ids=lambda v: v.name if isinstance(v, Path) else v
)
def test_every_shipped_document_passes_as_its_kind(
    path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert kind != "?", f"add {path.name} to EXAMPLE_KINDS with the kind it is"
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: ok ({CONFIG_KINDS[kind]}: "), out


@pytest.mark.parametrize("path", sorted((SIM / "policies").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_builtin_policy_passes_as_a_policy(path: Path) -> None:
    kind, summary = check_config(path, "policy")
    assert kind == "policy" and "profile" in summary


def test_the_gateway_example_is_not_a_router_config(capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's case: recognised, it passes; forced to the router kind, it fails as before."""
    path = EXAMPLES / "gateway.yaml"
    assert main(["check-config", str(path)]) == 0
    assert "gateway config: profile default, 2 endpoints" in capsys.readouterr().out
    assert main(["check-config", "--kind", "router", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "server: unknown key" in err


EXTPROC = """
extproc: {port: 9002, metrics_port: 9090}
endpoints: [{address: "127.0.0.1:8000", models: [qwen3-0.6b]}]
hashing: {mode: text}
"""


def test_an_extproc_config_is_recognised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("grpc")
    path = tmp_path / "extproc.yaml"
    path.write_text(EXTPROC)
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ext_proc config: profile default, 1 endpoint, gRPC on 127.0.0.1:9002" in out


@pytest.mark.parametrize(
    ("doc", "kind"),
    [
        ({}, "router"),
        ({"seed": 1, "plugins": []}, "router"),
        ({"server": {"port": 1}}, "gateway"),
        ({"endpoints": []}, "gateway"),
        ({"identity": {}, "hashing": {}}, "gateway"),
        ({"extproc": {}, "server": {}, "endpoints": []}, "extproc"),
        ({"simulator": {"kv_events": True}, "plugins": []}, "policy"),
        ({"workload": {}}, "scenario"),
        ({"endpoints": {"count": 2}, "seed": 3}, "scenario"),
        ({"name": "x", "duration_s": 5}, "scenario"),
    ],
)
def test_recognition_by_keys(doc: dict[str, object], kind: str) -> None:
    assert config_kind(doc) == kind


@pytest.mark.parametrize(
    "doc",
    [
        {"workload": {}, "server": {}},
        {"simulator": {}, "scrape": {}},
        {"extproc": {}, "duration_s": 3},
    ],
)
def test_a_document_of_two_kinds_is_refused(doc: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="pass --kind"):
        config_kind(doc)


BROKEN = [
    ("gateway.yaml", "server: {port: 8080, bogus: 1}\nendpoints: []\n", "server.bogus"),
    ("gw-endpoints.yaml", "endpoints: [{address: 'no-port'}]\n", "endpoints[0]"),
    ("router.yaml", "plugins: 3\n", "plugins"),
    ("policy.yaml", "simulator: {kv_events: 3}\n", "simulator.kv_events"),
    ("scenario.yaml", "name: s\nworkload: {arrival: {process: poisson}}\n", "workload"),
    ("scenario-mix.yaml", "name: s\nworkload: {arrival: {process: poisson, rate_rps: 1}}\n", "mix"),
    ("two.yaml", "workload: {}\nserver: {}\n", "pass --kind"),
    ("list.yaml", "- 1\n- 2\n", "must hold a mapping"),
    ("bad.yaml", "a: [1, 2\n", "not valid YAML"),
]


@pytest.mark.parametrize(("name", "text", "named"), BROKEN, ids=[b[0] for b in BROKEN])
def test_a_broken_document_fails_with_its_path(
    tmp_path: Path, name: str, text: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / name
    path.write_text(text)
    assert main(["check-config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"prefixroute: {path}: invalid ")
    assert captured.err.count("\n") == 1 and named in captured.err, captured.err
    assert "Traceback" not in captured.err


def test_a_missing_file_fails_with_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nope.yaml"
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prefixroute: {path}: invalid config: ") and "cannot read" in err


def test_the_gateway_sections_match_the_drivers() -> None:
    from prefixroute.cli import _GATEWAY_KEYS
    from prefixroute.drivers.settings import DRIVER_SECTIONS

    assert tuple(_GATEWAY_KEYS) == tuple(DRIVER_SECTIONS)


# A child process where the drivers' HTTP client cannot be imported (as without the extras).
_WITHOUT_EXTRAS = """
import sys
sys.modules["aiohttp"] = None
from prefixroute.cli import main
code = main(["check-config", sys.argv[1]])
assert "prefixroute.drivers.settings" not in sys.modules or sys.argv[2] == "gateway"
raise SystemExit(code)
"""


def test_a_router_config_is_checked_without_the_driver_extras() -> None:
    router = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS, str(EXAMPLES / "default.yaml"), "router"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert router.returncode == 0, router.stderr
    assert "ok (router config: profile default)" in router.stdout
    gateway = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS, str(EXAMPLES / "gateway.yaml"), "gateway"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert gateway.returncode == 2
    assert "checking a gateway config needs the gateway extra" in gateway.stderr
    assert gateway.stderr.count("\n") == 1 and "Traceback" not in gateway.stderr


@pytest.mark.parametrize("path", sorted((EXAMPLES / "envoy").glob("*.yaml")), ids=lambda p: p.name)
def test_an_envoy_config_is_named_as_such(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Envoy config" in err and err.count("\n") == 1
