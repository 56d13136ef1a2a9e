"""The plugin registry: stable kebab-case type names -> factories.

Config documents name plugins by type (`prefix-affinity-scorer`) and give each
instance a name; the registry builds instances and checks their parameters.
Registration refuses duplicates and malformed type names, so a typo cannot
silently shadow a built-in (after GIE's plugin registry).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

from prefixroute.admission import (
    AlwaysAdmit,
    ConcurrencyAdmission,
    SheddingAdmission,
    TokenBucketAdmission,
)
from prefixroute.fairqueue import FairQueueAdmission
from prefixroute.filters import (
    HealthyFilter,
    HotSpotFilter,
    ModelFilter,
    RoleFilter,
    SaturationFilter,
    StaleMetricsFilter,
    TailPoolFilter,
)
from prefixroute.pickers import (
    CacheAwarePicker,
    MaxScorePicker,
    PowerOfTwoPicker,
    RandomPicker,
    RoundRobinPicker,
    SoftmaxPicker,
    WeightedRandomPicker,
)
from prefixroute.plugins import AdmissionPolicy, Filter, Picker, Scorer
from prefixroute.predictive import PredictedLatencyScorer, SloFilter
from prefixroute.schema import DocumentError, build
from prefixroute.scorers import (
    ColdSpreadScorer,
    ConsistentHashScorer,
    InflightScorer,
    KVCostScorer,
    KVUtilisationScorer,
    LoraAffinityScorer,
    PrefixAffinityScorer,
    QueueDepthScorer,
    SessionAffinityScorer,
)

__all__ = [
    "PluginError",
    "PluginKind",
    "Registry",
    "default_registry",
    "plugin_kind",
]

PluginKind = Literal["filter", "scorer", "picker", "admission"]
_TYPE_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


class PluginError(DocumentError):
    """A plugin could not be built; `field` (= `path`) names the offending parameter, if any."""

    @property
    def field(self) -> str | None:
        """The parameter refused (None: the plugin type, or the parameters together)."""
        return self.path or None


def plugin_kind(plugin: object) -> PluginKind:
    """Which extension point `plugin` implements (exactly one is allowed)."""
    kinds: list[PluginKind] = []
    if isinstance(plugin, Filter):
        kinds.append("filter")
    if isinstance(plugin, Scorer):
        kinds.append("scorer")
    if isinstance(plugin, Picker):
        kinds.append("picker")
    if isinstance(plugin, AdmissionPolicy):
        kinds.append("admission")
    if len(kinds) != 1:
        raise PluginError(
            "",
            f"{type(plugin).__name__} must implement exactly one of filter/score/pick/admit, "
            f"found {kinds or 'none'}",
        )
    return kinds[0]


class Registry:
    """Maps plugin type names to factories. Lookups are O(1)."""

    def __init__(self) -> None:
        self._factories: dict[str, Callable[..., object]] = {}

    def register(self, type_name: str, factory: Callable[..., object]) -> None:
        """Register `factory` (called with a config's parameters as keywords) as `type_name`."""
        if not _TYPE_NAME.match(type_name):
            raise ValueError(f"plugin type {type_name!r} must be kebab-case, like 'my-scorer'")
        if type_name in self._factories:
            raise ValueError(f"plugin type {type_name!r} is already registered")
        self._factories[type_name] = factory

    def types(self) -> list[str]:
        """Registered type names, sorted."""
        return sorted(self._factories)

    def factory(self, type_name: str) -> Callable[..., object]:
        """The factory registered as `type_name` (KeyError if none)."""
        return self._factories[type_name]

    def __contains__(self, type_name: object) -> bool:
        return type_name in self._factories

    def create(self, type_name: str, parameters: Mapping[str, Any] | None = None) -> object:
        """Build one plugin of `type_name` from `parameters`.

        Raises `PluginError` for an unknown type, and one whose `field` names
        the parameter for an unknown parameter (attrs classes: checked
        against their `init=True` fields; `init=False` fields are state) or a
        value its field refuses (`prefixroute.schema.build` checks each one on
        its own). A refusal of the parameters together has no `field`.
        """
        factory = self._factories.get(type_name)
        if factory is None:
            raise PluginError(
                "", f"unknown plugin type {type_name!r}; known: {', '.join(self.types())}"
            )
        try:
            plugin = build(factory, dict(parameters or {}), "", error=PluginError)
        except PluginError as exc:
            raise PluginError(exc.path, f"{type_name}: {exc.message}") from exc
        plugin_kind(plugin)
        return plugin


_BUILTINS: tuple[tuple[str, Callable[..., object]], ...] = (
    ("healthy-filter", HealthyFilter),
    ("hot-spot-filter", HotSpotFilter),
    ("tail-pool-filter", TailPoolFilter),
    ("model-filter", ModelFilter),
    ("role-filter", RoleFilter),
    ("stale-metrics-filter", StaleMetricsFilter),
    ("saturation-filter", SaturationFilter),
    ("prefix-affinity-scorer", PrefixAffinityScorer),
    ("queue-depth-scorer", QueueDepthScorer),
    ("kv-utilisation-scorer", KVUtilisationScorer),
    ("inflight-scorer", InflightScorer),
    ("session-affinity-scorer", SessionAffinityScorer),
    ("lora-affinity-scorer", LoraAffinityScorer),
    ("cold-spread-scorer", ColdSpreadScorer),
    ("consistent-hash-scorer", ConsistentHashScorer),
    ("kv-cost-scorer", KVCostScorer),
    ("predicted-latency-scorer", PredictedLatencyScorer),
    ("slo-filter", SloFilter),
    ("max-score-picker", MaxScorePicker),
    ("weighted-random-picker", WeightedRandomPicker),
    ("power-of-two-picker", PowerOfTwoPicker),
    ("softmax-picker", SoftmaxPicker),
    ("round-robin-picker", RoundRobinPicker),
    ("random-picker", RandomPicker),
    ("cache-aware-picker", CacheAwarePicker),
    ("always-admit", AlwaysAdmit),
    ("token-bucket-admission", TokenBucketAdmission),
    ("concurrency-admission", ConcurrencyAdmission),
    ("shedding-admission", SheddingAdmission),
    ("fair-queue-admission", FairQueueAdmission),
)


def default_registry() -> Registry:
    """A new registry holding every built-in plugin type."""
    registry = Registry()
    for type_name, factory in _BUILTINS:
        registry.register(type_name, factory)
    return registry
