from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from prefixroute import ConfigError, Decision, Request, Router, load_config
from prefixroute.drivers.documents import read_document
from prefixroute.pickers import PowerOfTwoPicker
from tests.helpers import endpoint

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

MINIMAL: dict[str, Any] = {
    "plugins": [
        {"type": "healthy-filter"},
        {"type": "prefix-affinity-scorer", "name": "prefix"},
        {"type": "queue-depth-scorer", "name": "queue", "parameters": {"scale": 4}},
        {"type": "power-of-two-picker"},
    ],
    "profiles": [
        {
            "name": "main",
            "plugins": [
                {"pluginRef": "healthy-filter"},
                {"pluginRef": "prefix", "weight": 3},
                {"pluginRef": "queue", "weight": 1},
                {"pluginRef": "power-of-two-picker"},
            ],
        }
    ],
}


def test_empty_document_is_the_default_router() -> None:
    router = load_config({})
    assert router.profile == Router.default().profile


def test_a_minimal_document_builds_what_it_says() -> None:
    router = load_config(MINIMAL)
    assert router.profile.name == "main"
    assert [s.name for s in router.profile.scorers] == ["prefix", "queue"]
    assert [s.weight for s in router.profile.scorers] == [3.0, 1.0]
    assert isinstance(router.profile.picker[1], PowerOfTwoPicker)  # type: ignore[index]
    result = router.route(Request(model="m", prompt="hello " * 40), [endpoint(0), endpoint(1)], 0.0)
    assert isinstance(result, Decision)


# Router configs; examples/gateway.yaml is a gateway config (tests/test_gateway.py loads it).
ROUTER_EXAMPLES = sorted(p for p in EXAMPLES.glob("*.yaml") if p.name != "gateway.yaml")


@pytest.mark.parametrize("path", ROUTER_EXAMPLES, ids=lambda p: p.name)
def test_shipped_examples_load_and_route(path: Path) -> None:
    router = load_config(read_document(path))
    result = router.route(Request(model="m", prompt="hello " * 40), [endpoint(0), endpoint(1)], 0.0)
    assert isinstance(result, Decision)


def with_(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `doc` with the dotted/indexed `path` set to `value`."""
    import copy
    import re

    out = copy.deepcopy(doc)
    parts = [int(p) if p.isdigit() else p for p in re.split(r"\.|\[|\]\.?", path) if p != ""]
    node: Any = out
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value
    return out


BAD = [
    ({"bogus": 1}, "bogus"),
    ({"seed": "x"}, "seed"),
    ({"hashing": {"mode": "words"}}, "hashing.mode"),
    ({"hashing": {"block_size": 0}}, "hashing.block_size"),
    ({"hashing": {"extra": 1}}, "hashing.extra"),
    ({"index": {"tier_weights": {"tape": 0.1}}}, "index.tier_weights.tape"),
    ({"index": {"default_capacity_blocks": -5}}, "index.default_capacity_blocks"),
    ({"router": {"speculative_ttl_s": -1}}, "router.speculative_ttl_s"),
    ({"plugins": "x"}, "plugins"),
    ({"router": {"speculative_ttl_s": "30"}}, "router.speculative_ttl_s"),
    ({"router": {"confirm_on_complete": "false"}}, "router.confirm_on_complete"),
    ({"hashing": {"isolate_tenants": "no"}}, "hashing.isolate_tenants"),
    ({"hashing": {"tenant_groups": {"a": 1}}}, "hashing.tenant_groups"),
    ({"tenants": {"top_k": 0}}, "tenants.top_k"),
    ({"tenants": {"pinned": "acme"}}, "tenants.pinned"),
    ({"tenants": {"tail_quantile": 2}}, "tenants.tail_quantile"),
    ({"tenants": {"colour": 1}}, "tenants.colour"),
    ({"hashing": {"seed": 1.5}}, "hashing.seed"),
    ({"router": {"speculative_ttl_s": 10**400}}, "router.speculative_ttl_s"),
    ({"index": {"tier_weights": {"gpu": 10**400}}}, "index.tier_weights.gpu"),
    (
        with_(MINIMAL, "plugins[0]", {"type": "role-filter", "parameters": {"roles": ["bogus"]}}),
        "plugins[0].parameters.roles",
    ),
    (with_(MINIMAL, "plugins[2].parameters", {"scale": "4"}), "plugins[2].parameters.scale"),
    ({"plugins": [{"type": "healthy-filter"}]}, "profiles"),
    ({"profile": "x"}, "profile"),
    (with_(MINIMAL, "plugins[1].type", "no-such-scorer"), "plugins[1].type"),
    (with_(MINIMAL, "plugins[2].parameters", {"scael": 4}), "plugins[2].parameters.scael"),
    (with_(MINIMAL, "plugins[2].parameters", {"scale": -4}), "plugins[2].parameters.scale"),
    (with_(MINIMAL, "plugins[1].name", "healthy-filter"), "plugins[1].name"),
    (with_(MINIMAL, "plugins[0].nmae", "x"), "plugins[0].nmae"),
    (
        with_(MINIMAL, "profiles[0].plugins[1].pluginRef", "nope"),
        "profiles[0].plugins[1].pluginRef",
    ),
    (with_(MINIMAL, "profiles[0].plugins[1].weight", "heavy"), "profiles[0].plugins[1].weight"),
    (with_(MINIMAL, "profiles[0].plugins[1].weight", -2), "profiles[0].plugins[1].weight"),
    (with_(MINIMAL, "profiles[0].plugins[0].weight", 2), "profiles[0].plugins[0].weight"),
    (with_(MINIMAL, "profiles[0].plugins", []), "profiles[0].plugins"),
    (with_(MINIMAL, "profiles[0].max_fallbacks", -1), "profiles[0].max_fallbacks"),
    (with_(MINIMAL, "profiles[0].name", ""), "profiles[0].name"),
    ({**MINIMAL, "profile": "other"}, "profile"),
    (
        with_(MINIMAL, "profiles[0].plugins", [{"pluginRef": "healthy-filter"}]),
        "profiles[0].plugins",
    ),
]


@pytest.mark.parametrize(("doc", "path"), BAD, ids=[p for _, p in BAD])
def test_invalid_documents_name_the_field(doc: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(doc)
    assert err.value.path == path
    assert str(err.value).startswith(path)


def test_two_pickers_in_a_profile_are_refused() -> None:
    doc = with_(MINIMAL, "plugins", [*MINIMAL["plugins"], {"type": "max-score-picker"}])
    doc["profiles"][0]["plugins"].append({"pluginRef": "max-score-picker"})
    with pytest.raises(ConfigError, match="one picker"):
        load_config(doc)


def test_files_are_read_by_the_drivers_and_their_errors_reported(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("hashing: {mode: text, block_size: 64}\n")
    assert load_config(read_document(good)).blocker.block_size == 64
    assert load_config(read_document(str(good))).blocker.mode == "text"
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_document(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        read_document(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_document(listy)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("seed: 1 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        read_document(latin)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(read_document(empty)).profile == Router.default().profile


@pytest.mark.parametrize("source", ["config.yaml", Path("config.yaml")], ids=["str", "path"])
def test_the_core_reads_no_file(source: object) -> None:
    with pytest.raises(TypeError, match="read_document"):
        load_config(source)  # type: ignore[arg-type]


def test_profile_selection_and_admission_chain() -> None:
    doc = with_(
        MINIMAL,
        "profiles",
        [*MINIMAL["profiles"], {"name": "alt", "plugins": [{"pluginRef": "queue"}]}],
    )
    doc["plugins"].append({"type": "always-admit"})
    doc["profiles"][1]["plugins"].append({"pluginRef": "always-admit"})
    assert load_config(doc).profile.name == "main"
    doc["profile"] = "alt"
    router = load_config(doc)
    assert router.profile.name == "alt"
    assert isinstance(router.route(Request(model="m", prompt="x"), [endpoint(0)], 0.0), Decision)


def test_the_default_example_is_the_default_profile() -> None:
    router = load_config(read_document(EXAMPLES / "default.yaml"))
    default = Router.default()
    assert router.profile == default.profile
    assert router.blocker == default.blocker
    assert router.speculative_ttl_s == default.speculative_ttl_s
    assert router.confirm_on_complete == default.confirm_on_complete
    assert router.engine_block_size == default.engine_block_size
    assert router.index.default_capacity_blocks == default.index.default_capacity_blocks
    assert router.index.tier_weights == default.index.tier_weights
    assert router.rng.random() == default.rng.random()


def test_a_negative_weight_is_reported_at_the_weight_whatever_the_scorer_is_called() -> None:
    doc = with_(MINIMAL, "plugins[1].name", "scorer")
    doc["profiles"][0]["plugins"][1] = {"pluginRef": "scorer", "weight": -1}
    with pytest.raises(ConfigError) as err:
        load_config(doc)
    assert err.value.path == "profiles[0].plugins[1].weight"


def test_a_plugin_refusal_is_located_by_structure_with_a_custom_registry() -> None:
    import attrs

    from prefixroute import default_registry
    from prefixroute.scorers import QueueDepthScorer

    @attrs.frozen
    class Quiet(QueueDepthScorer):
        level: int = attrs.field(default=0)

        @level.validator
        def _level(self, attr: attrs.Attribute[int], value: int) -> None:
            if value > 3:
                raise ValueError("scale is fine; this is too loud")  # names another field

    registry = default_registry()
    registry.register("quiet-scorer", Quiet)
    doc = with_(MINIMAL, "plugins[2]", {"type": "quiet-scorer", "name": "queue"})
    assert load_config(doc, registry=registry).profile.scorer_names == ("prefix", "queue")
    doc["plugins"][2]["parameters"] = {"scale": 2, "level": 4}
    with pytest.raises(ConfigError) as err:
        load_config(doc, registry=registry)
    assert err.value.path == "plugins[2].parameters.level"


def test_config_and_scenario_errors_share_one_validation_system() -> None:
    from prefixroute.schema import DocumentError, Fields
    from prefixroute.sim.schema import Fields as ScenarioFields
    from prefixroute.sim.schema import ScenarioError

    assert issubclass(ConfigError, DocumentError) and issubclass(ScenarioError, DocumentError)
    assert not issubclass(ConfigError, ScenarioError)
    with pytest.raises(ScenarioError) as err:
        ScenarioFields({"a": {"b": "x"}}, "top").sub("a").integer("b", 0)
    assert err.value.path == "top.a.b" and err.value.message.startswith("must be an integer")
    with pytest.raises(DocumentError) as base:
        Fields({"a": 1, "z": 2}, "").allow("a")
    assert base.value.path == "z"


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"acme": {"requests_per_s": -1}}, "plugins[0].parameters.overrides.acme.requests_per_s"),
        ({"acme": {"rps": 1}}, "plugins[0].parameters.overrides.acme.rps"),
        ({"acme": 5}, "plugins[0].parameters.overrides.acme"),
    ],
)
def test_a_refusal_deep_inside_plugin_parameters_names_its_whole_path(
    overrides: dict[str, Any], path: str
) -> None:
    doc = {
        "plugins": [{"type": "token-bucket-admission", "parameters": {"overrides": overrides}}],
        "profiles": [{"name": "p", "plugins": [{"pluginRef": "token-bucket-admission"}]}],
    }
    with pytest.raises(ConfigError) as info:
        load_config(doc)
    assert info.value.path == path


def test_a_yaml_syntax_error_is_one_line_with_its_position(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins: [\n  {type: x\nfoo: : bar\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        read_document(bad)
    message = str(info.value)
    assert "\n" not in message
    assert "line 3, column 4" in message
