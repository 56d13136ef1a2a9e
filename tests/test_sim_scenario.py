"""Scenario documents: built-ins load, bad documents fail with their path, overrides apply."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from prefixroute.sim.compare import make_source
from prefixroute.sim.scenario import builtin_scenarios, load_scenario
from prefixroute.sim.schema import ScenarioError

BUILTINS = {"seed", "seed-4x", "tenants-50", "tenants-500", "tenants-5000", "chat", "mooncake"}


def minimal(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "t",
        "duration_s": 5,
        "workload": {
            "arrival": {"process": "poisson", "rate_rps": 10},
            "mix": {"cold": {"weight": 1}},
        },
    }
    doc.update(extra)
    return doc


def test_every_named_scenario_is_shipped_and_loads() -> None:
    assert set(builtin_scenarios()) >= BUILTINS
    for name in builtin_scenarios():
        sc = load_scenario(name)
        assert sc.name == name
        assert sc.description
        make_source(sc)  # the workload section is valid too


def test_seed_matches_the_published_setup() -> None:
    sc = load_scenario("seed")
    assert sc.endpoints == 1
    assert sc.duration_s == 1800
    assert sc.cost.name == "qwen3-0.6b-h100"
    assert sc.metrics_interval_s == 0.05


def test_defaults_and_overrides() -> None:
    sc = load_scenario(minimal())
    assert sc.endpoints == 1 and sc.seed == 0 and sc.metrics_interval_s == 0.05
    assert sc.engine.max_num_seqs == 1024 and sc.engine.max_num_batched_tokens == 8192
    assert sc.engine.kv_capacity_tokens == sc.cost.kv_capacity_tokens
    sc2 = sc.with_overrides(endpoints=3, duration_s=9.0, seed=7)
    assert (sc2.endpoints, sc2.duration_s, sc2.seed) == (3, 9.0, 7)
    with pytest.raises(ScenarioError, match=r"endpoints\.count"):
        sc.with_overrides(endpoints=0)


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        (minimal(colour="red"), "colour"),
        (minimal(endpoints={"count": 0}), "endpoints.count"),
        (minimal(endpoints={"profile": "gpt-9"}), "endpoints.profile"),
        (minimal(endpoints={"kv_capacity_tokens": 3}), "endpoints.kv_capacity_tokens"),
        (minimal(endpoints={"cuont": 2}), "endpoints.cuont"),
        (minimal(duration_s=-1), "duration_s"),
        (minimal(duration_s="long"), "duration_s"),
        (minimal(metrics_interval_s=0), "metrics_interval_s"),
        (minimal(seed=True), "seed"),
        (minimal(workload=None), "workload"),
        ({"duration_s": 5, "workload": {}}, "name"),
    ],
)
def test_bad_documents_name_their_field(doc: dict[str, Any], path: str) -> None:
    with pytest.raises(ScenarioError) as info:
        load_scenario(doc)
    assert info.value.path == path


def test_bad_workload_fields_name_their_path() -> None:
    doc = minimal()
    doc["workload"]["arrival"]["rate_rsp"] = 3
    with pytest.raises(ScenarioError, match=r"workload\.arrival\.rate_rsp"):
        make_source(load_scenario(doc))


def test_files_and_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="unknown scenario"):
        load_scenario("no-such-scenario")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(bad)
    good = tmp_path / "good.json"
    good.write_text(
        '{"name": "j", "workload": {"arrival": {"process": "constant", '
        '"rate_rps": 2}, "mix": {"cold": {"weight": 1}}}}'
    )
    assert load_scenario(good).name == "j"
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.yaml")
