from __future__ import annotations

import pytest

from prefixroute import PluginError, Registry, default_registry
from prefixroute.registry import plugin_kind
from prefixroute.scorers import QueueDepthScorer


def test_builtins_are_kebab_case_and_refuse_duplicates() -> None:
    registry = default_registry()
    assert "prefix-affinity-scorer" in registry
    with pytest.raises(ValueError, match="already registered"):
        registry.register("prefix-affinity-scorer", QueueDepthScorer)
    with pytest.raises(ValueError, match="kebab-case"):
        registry.register("MyScorer", QueueDepthScorer)


def test_create_checks_types_and_parameters() -> None:
    registry = default_registry()
    assert registry.create("queue-depth-scorer", {"scale": 2.0}) == QueueDepthScorer(scale=2.0)
    with pytest.raises(PluginError, match="unknown plugin type"):
        registry.create("nope")
    with pytest.raises(PluginError) as err:
        registry.create("queue-depth-scorer", {"sclae": 2})
    assert err.value.field == "sclae"
    with pytest.raises(PluginError, match="scale"):
        registry.create("queue-depth-scorer", {"scale": 0})


def test_custom_plugins_register_and_must_implement_one_protocol() -> None:
    class Both:
        def score(self, ctx: object, candidates: object) -> list[float]:
            return []

        def filter(self, ctx: object, candidates: object) -> list[object]:
            return []

    registry = Registry()
    registry.register("both-ways", Both)
    with pytest.raises(PluginError, match="exactly one"):
        registry.create("both-ways")
    with pytest.raises(PluginError, match="exactly one"):
        plugin_kind(object())
    assert registry.types() == ["both-ways"]
