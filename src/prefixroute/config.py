"""Build a `Router` from a config document: a mapping, as decoded from YAML or JSON.

The document, every key optional:

    seed: 0                      # seeds the picker's random tie-breaks
    hashing:  {mode: token, block_size: 16, seed: 0, chars_per_token: 4.0,
               isolate_tenants: false, tenant_groups: {}}
    index:    {default_capacity_blocks: 65536, tier_weights: {gpu: 1.0, cpu: 0.8, disk: 0.5}}
    router:   {speculative_ttl_s: 30.0, precise_speculative_ttl_s: 2.0,
               confirm_on_complete: true}  # engine_block_size: unset = as scraped, else 16
    tenants:  {top_k: 128, pinned: [], tail_quantile: 0.5}   # the TenantLedger
    objectives: {ttft_ms: 500, tpot_ms: 50,  # latency objectives per request (default: none)
                 tenants: {acme: {ttft_ms: 200}}}  # per tenant; a request's headers win
    latency:  {forgetting: 0.99, clip: 4.0,   # the online latency model (prefixroute.latency)
               prior: {ttft_base_s: 0.03, prefill_s_per_token: 0.0001, ...}}  # LatencyPrior
    plugins:                     # instances: type, name (default: the type), parameters
      - {type: prefix-affinity-scorer, name: prefix, parameters: {length_weight: 0.2}}
    profiles:                    # plugin references; weights apply to scorers only
      - name: default
        max_fallbacks: 2
        plugins: [{pluginRef: prefix, weight: 3}]
    profile: default             # which profile routes (default: the first)

Without `plugins` and `profiles` the router runs the built-in default profile.
Plugin and profile entries follow the Gateway API Inference Extension's
`EndpointPickerConfig` spelling (`type`, `name`, `parameters`, `pluginRef`,
`weight`). Unknown keys anywhere are errors: every `ConfigError` names the
field's path, e.g. `profiles[0].plugins[1].weight`. The path comes from the
structure (`prefixroute.schema`: `Fields` reads each mapping, `build` checks
each argument against its field), never from an exception's message.

The core reads no file: drivers and the CLI turn a YAML/JSON file into a
mapping (`prefixroute.drivers.documents.read_document`) and pass it here.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import attrs

from prefixroute.admission import AdmissionChain
from prefixroute.blocks import Blocker
from prefixroute.compiled_index import make_index
from prefixroute.index import Tier
from prefixroute.latency import (
    NO_OBJECTIVES,
    LatencyModel,
    LatencyPrior,
    ObjectivePolicy,
    Objectives,
)
from prefixroute.ledger import TenantLedger
from prefixroute.plugins import AdmissionPolicy, Filter, Picker, Scorer
from prefixroute.profile import Profile, WeightedScorer
from prefixroute.registry import PluginError, Registry, default_registry, plugin_kind
from prefixroute.router import Router, default_profile
from prefixroute.schema import DocumentError, Fields, build, join

__all__ = [
    "ConfigError",
    "ConfigFields",
    "load_config",
    "read_section",
]

_TOP_KEYS = (
    "seed",
    "hashing",
    "index",
    "router",
    "tenants",
    "objectives",
    "latency",
    "plugins",
    "profiles",
    "profile",
)
# Section schemas: key -> the JSON type its value must have.
_HASHING = {
    "mode": "str",
    "block_size": "int",
    "seed": "int",
    "chars_per_token": "float",
    "isolate_tenants": "bool",
    "tenant_groups": "mapping",
}
_INDEX = {"default_capacity_blocks": "int", "tier_weights": "mapping"}
_TENANTS = {"top_k": "int", "pinned": "list", "tail_quantile": "float"}
_ROUTER = {
    "speculative_ttl_s": "float",
    "precise_speculative_ttl_s": "float",
    "confirm_on_complete": "bool",
    "engine_block_size": "int",
}


class ConfigError(DocumentError):
    """An invalid config document; `path` names the field (e.g. `plugins[2].type`)."""


class ConfigFields(Fields):
    """`Fields` over a config document: its errors are `ConfigError`s."""

    error = ConfigError


def read_section(doc: Mapping[str, Any], name: str, schema: Mapping[str, str]) -> dict[str, Any]:
    """The mapping at `doc[name]`, with only `schema`'s keys, each of its JSON type."""
    section = ConfigFields(doc.get(name), name)
    section.allow(*schema)
    return {key: section.typed(key, schema[key]) for key in section.doc}


def load_config(source: Mapping[str, Any], *, registry: Registry | None = None) -> Router:
    """Validate a config document (a mapping) and build its `Router`.

    Raises `ConfigError` naming the field for anything invalid; nothing is
    half-built. A file name is a TypeError: read the file first
    (`prefixroute.drivers.documents.read_document`).
    """
    if isinstance(source, str | bytes) or hasattr(source, "__fspath__"):
        raise TypeError(
            "load_config takes a mapping, not a file name: read the file with "
            "prefixroute.drivers.documents.read_document"
        )
    top = ConfigFields(source, "")
    top.allow(*_TOP_KEYS)
    doc = top.doc
    registry = registry if registry is not None else default_registry()
    seed = top.integer("seed", 0)

    blocker = build(Blocker, read_section(doc, "hashing", _HASHING), "hashing", error=ConfigError)
    index_kwargs = read_section(doc, "index", _INDEX)
    if "tier_weights" in index_kwargs:
        weights = ConfigFields(index_kwargs["tier_weights"], "index.tier_weights")
        tiers = {t.name.lower(): t for t in Tier}
        parsed: dict[Tier, float] = {}
        for name in weights.doc:
            if name not in tiers:
                raise ConfigError(weights.where(name), f"unknown tier (use {sorted(tiers)})")
            parsed[tiers[name]] = weights.number(name, 0.0)
        index_kwargs["tier_weights"] = parsed
    index = build(make_index, index_kwargs, "index", error=ConfigError)
    router_kwargs = read_section(doc, "router", _ROUTER)
    ledger = build(
        TenantLedger, read_section(doc, "tenants", _TENANTS), "tenants", error=ConfigError
    )

    profile, admission = _profiles(top, registry)
    parts = {
        "objectives": _objectives(top.sub("objectives")),
        "latency": _latency(top.sub("latency")),
        "profile": profile,
        "blocker": blocker,
        "index": index,
        "admission": admission,
        "ledger": ledger,
        "rng": random.Random(seed),
    }
    return build(Router, router_kwargs, "router", error=ConfigError, base=parts)


def _objective(section: ConfigFields, base: Objectives) -> Objectives:
    """One `{ttft_ms, tpot_ms}` entry, milliseconds in, seconds out; unset axes from `base`."""
    values = []
    for key, fallback in (("ttft_ms", base.ttft_s), ("tpot_ms", base.tpot_s)):
        if section.raw(key) is None:
            values.append(fallback)
        else:
            values.append(section.number(key, 0.0, above=0.0) / 1000.0)
    return Objectives(*values)


def _objectives(section: ConfigFields) -> ObjectivePolicy:
    """The `objectives` section: defaults for every request, then per tenant."""
    section.allow("ttft_ms", "tpot_ms", "tenants")
    default = _objective(section, NO_OBJECTIVES)
    tenants = section.sub("tenants")
    per_tenant = {}
    for name in tenants.doc:
        entry = tenants.sub(name)
        entry.allow("ttft_ms", "tpot_ms")
        per_tenant[name] = _objective(entry, default)
    return ObjectivePolicy(default=default, tenants=per_tenant)


_PRIOR = {f.name: "float" for f in attrs.fields(LatencyPrior)}


def _latency(section: ConfigFields) -> LatencyModel:
    """The `latency` section: the online model's parameters and cold-start prior."""
    section.allow("forgetting", "clip", "prior")
    fields = section.sub("prior")
    fields.allow(*_PRIOR)
    prior = build(
        LatencyPrior,
        {key: fields.typed(key, _PRIOR[key]) for key in fields.doc},
        fields.path,
        error=ConfigError,
    )
    return build(
        LatencyModel,
        {
            "forgetting": section.number("forgetting", 0.99, min=0.5, max=1.0),
            "clip": section.number("clip", 4.0, above=0.0),
        },
        section.path,
        error=ConfigError,
        base={"prior": prior},
    )


def _plugins(top: ConfigFields, registry: Registry) -> dict[str, object]:
    built: dict[str, object] = {}
    for i, raw in enumerate(top.items("plugins")):
        spec = ConfigFields(raw, f"plugins[{i}]")
        spec.allow("type", "name", "parameters")
        type_name = spec.string("type", "")
        name = spec.string("name", type_name)
        if name in built:
            raise ConfigError(spec.where("name"), f"duplicate plugin name {name!r}")
        params = spec.sub("parameters")
        if type_name not in registry:
            known = ", ".join(registry.types())
            raise ConfigError(
                spec.where("type"), f"unknown plugin type {type_name!r}; known: {known}"
            )
        try:
            built[name] = registry.create(type_name, params.doc)
        except PluginError as exc:
            where = join(params.path, exc.path) if exc.path else spec.path
            raise ConfigError(where, exc.message) from exc
    return built


def _profiles(top: ConfigFields, registry: Registry) -> tuple[Profile, AdmissionPolicy | None]:
    plugins = _plugins(top, registry)
    if top.raw("profiles") is None:
        if plugins:
            raise ConfigError("profiles", "plugins are declared but no profile uses them")
        if top.has("profile"):
            raise ConfigError("profile", "names a profile but no profiles are declared")
        return default_profile(), None

    profiles: dict[str, tuple[Profile, AdmissionPolicy | None]] = {}
    for i, raw in enumerate(top.items("profiles", required=True)):
        spec = ConfigFields(raw, f"profiles[{i}]")
        spec.allow("name", "plugins", "max_fallbacks")
        name = spec.string("name", "")
        if name in profiles:
            raise ConfigError(spec.where("name"), f"duplicate profile name {name!r}")
        filters: list[tuple[str, Filter]] = []
        scorers: list[WeightedScorer] = []
        pickers: list[tuple[str, Picker]] = []
        admissions: list[AdmissionPolicy] = []
        for j, raw_ref in enumerate(spec.items("plugins", required=True)):
            ref = ConfigFields(raw_ref, f"{spec.where('plugins')}[{j}]")
            ref.allow("pluginRef", "weight")
            pname = ref.string("pluginRef", "")
            if pname not in plugins:
                raise ConfigError(ref.where("pluginRef"), f"no plugin named {pname!r} is declared")
            plugin = plugins[pname]
            kind = plugin_kind(plugin)
            if kind != "scorer" and ref.has("weight"):
                raise ConfigError(
                    ref.where("weight"), f"weight applies to scorers, {pname} is a {kind}"
                )
            if kind == "scorer":
                weight = ref.number("weight", 1.0)
                assert isinstance(plugin, Scorer)
                try:  # WeightedScorer owns the rule (>= 0); the weight is its only input here
                    scorers.append(WeightedScorer(pname, plugin, weight))
                except ValueError as exc:
                    raise ConfigError(ref.where("weight"), str(exc)) from exc
            elif kind == "filter":
                assert isinstance(plugin, Filter)
                filters.append((pname, plugin))
            elif kind == "picker":
                assert isinstance(plugin, Picker)
                pickers.append((pname, plugin))
            else:
                assert isinstance(plugin, AdmissionPolicy)
                admissions.append(plugin)
        if len(pickers) > 1:
            raise ConfigError(spec.where("plugins"), "a profile takes at most one picker")
        if not scorers:
            raise ConfigError(spec.where("plugins"), "a profile needs at least one scorer")
        parts: dict[str, Any] = {"name": name, "filters": filters, "scorers": scorers}
        if pickers:
            parts["picker"] = pickers[0]
        max_fallbacks = spec.integer("max_fallbacks", 2, min=0)
        profile = build(
            Profile, {"max_fallbacks": max_fallbacks}, spec.path, error=ConfigError, base=parts
        )
        admission = AdmissionChain(admissions) if admissions else None
        profiles[name] = (profile, admission)

    if not top.has("profile"):
        return next(iter(profiles.values()))
    chosen = top.string("profile", "")
    if chosen not in profiles:
        raise ConfigError("profile", f"no profile named {chosen!r} (have {', '.join(profiles)})")
    return profiles[chosen]
