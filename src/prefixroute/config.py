"""Build a `Router` from a config document (a mapping, or a YAML/JSON file).

The document, every key optional:

    seed: 0                      # seeds the picker's random tie-breaks
    hashing:  {mode: token, block_size: 16, seed: 0, chars_per_token: 4.0,
               isolate_tenants: false, tenant_groups: {}}
    index:    {default_capacity_blocks: 65536, tier_weights: {gpu: 1.0, cpu: 0.8, disk: 0.5}}
    router:   {speculative_ttl_s: 30.0, confirm_on_complete: true, engine_block_size: 16}
    tenants:  {top_k: 128, pinned: [], tail_quantile: 0.5}   # the TenantLedger
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
field's path, e.g. `profiles[0].plugins[1].weight`.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import yaml

from prefixroute.admission import AdmissionChain
from prefixroute.blocks import Blocker
from prefixroute.index import PrefixIndex, Tier
from prefixroute.ledger import TenantLedger
from prefixroute.plugins import AdmissionPolicy, Filter, Picker, Scorer
from prefixroute.profile import Profile, WeightedScorer
from prefixroute.registry import (
    PluginError,
    Registry,
    default_registry,
    json_type_ok,
    plugin_kind,
)
from prefixroute.router import Router, default_profile

__all__ = [
    "ConfigError",
    "build_section",
    "load_config",
    "positive_number",
    "read_document",
    "read_section",
]

T = TypeVar("T")

_TOP_KEYS = {"seed", "hashing", "index", "router", "tenants", "plugins", "profiles", "profile"}
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
_ROUTER = {"speculative_ttl_s": "float", "confirm_on_complete": "bool", "engine_block_size": "int"}


class ConfigError(ValueError):
    """An invalid config document; `path` names the field (e.g. `plugins[2].type`)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


def _mapping(value: object, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"must be a mapping, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(path, f"keys must be strings, got {key!r}")
    return value


def _only(doc: Mapping[str, Any], allowed: set[str], path: str) -> None:
    for key in doc:
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            raise ConfigError(where, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _build(path: str, make: Callable[..., T], **kwargs: Any) -> T:
    """Call `make`; a refusal becomes a ConfigError naming the argument it mentions."""
    try:
        return make(**kwargs)
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        named = [k for k in kwargs if f"'{k}'" in msg or msg.startswith(k)]
        raise ConfigError(f"{path}.{named[0]}" if named else path, msg) from exc


def read_section(doc: Mapping[str, Any], name: str, schema: Mapping[str, str]) -> dict[str, Any]:
    """The mapping at `doc[name]`, with only `schema`'s keys, each of its JSON type."""
    section = _mapping(doc.get(name), name)
    _only(section, set(schema), name)
    for key, value in section.items():
        if not json_type_ok(value, schema[key]):
            raise ConfigError(f"{name}.{key}", f"must be of type {schema[key]}, got {value!r}")
    return dict(section)


def positive_number(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    """An attrs validator for drivers' config fields: a finite number > 0 (not a bool)."""
    if isinstance(value, bool) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{attr.name} must be a finite number > 0, got {value!r}")


def build_section(doc: Mapping[str, Any], name: str, schema: Mapping[str, str], cls: Any) -> Any:
    """`cls(**read_section(doc, name, schema))`, its ValueError a ConfigError naming the field."""
    section = read_section(doc, name, schema)
    try:
        return cls(**section)
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0].strip("'")
        raise ConfigError(f"{name}.{field}" if field in section else name, str(exc)) from exc


def _str(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(path, "must be a non-empty string")
    return value


def _number(value: object, path: str) -> float:
    if not json_type_ok(value, "float"):
        raise ConfigError(path, f"must be a number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def read_document(source: str | os.PathLike[str]) -> Mapping[str, Any]:
    """The mapping in a YAML/JSON file (empty for an empty file); ConfigError otherwise."""
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"config file {path} is not UTF-8 text: {exc}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML/JSON: {exc}") from exc
    return _mapping(doc, "")


def load_config(
    source: Mapping[str, Any] | str | os.PathLike[str], *, registry: Registry | None = None
) -> Router:
    """Validate a config document (or read one from a YAML/JSON file) and build its `Router`.

    Raises `ConfigError` naming the field for anything invalid; nothing is
    half-built.
    """
    doc = read_document(source) if isinstance(source, str | os.PathLike) else _mapping(source, "")
    _only(doc, _TOP_KEYS, "")
    registry = registry if registry is not None else default_registry()

    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError("seed", f"must be an integer, got {seed!r}")

    blocker = _build("hashing", Blocker, **read_section(doc, "hashing", _HASHING))

    index_kwargs = read_section(doc, "index", _INDEX)
    if "tier_weights" in index_kwargs:
        weights = _mapping(index_kwargs["tier_weights"], "index.tier_weights")
        tiers = {t.name.lower(): t for t in Tier}
        parsed: dict[Tier, float] = {}
        for name, value in weights.items():
            if name not in tiers:
                raise ConfigError(
                    f"index.tier_weights.{name}", f"unknown tier (use {sorted(tiers)})"
                )
            parsed[tiers[name]] = _number(value, f"index.tier_weights.{name}")
        index_kwargs["tier_weights"] = parsed
    index = _build("index", PrefixIndex, **index_kwargs)
    router_kwargs = read_section(doc, "router", _ROUTER)
    ledger = _build("tenants", TenantLedger, **read_section(doc, "tenants", _TENANTS))

    profile, admission = _profiles(doc, registry)
    return _build(
        "router",
        Router,
        profile=profile,
        blocker=blocker,
        index=index,
        admission=admission,
        ledger=ledger,
        rng=random.Random(seed),
        **router_kwargs,
    )


def _plugins(doc: Mapping[str, Any], registry: Registry) -> dict[str, object]:
    raw = doc.get("plugins", [])
    if not isinstance(raw, list):
        raise ConfigError("plugins", "must be a list")
    built: dict[str, object] = {}
    for i, spec in enumerate(raw):
        path = f"plugins[{i}]"
        spec = _mapping(spec, path)
        _only(spec, {"type", "name", "parameters"}, path)
        type_name = _str(spec.get("type"), f"{path}.type")
        name = _str(spec.get("name", type_name), f"{path}.name")
        if name in built:
            raise ConfigError(f"{path}.name", f"duplicate plugin name {name!r}")
        params = _mapping(spec.get("parameters"), f"{path}.parameters")
        try:
            built[name] = registry.create(type_name, params)
        except PluginError as exc:
            where = f"{path}.parameters.{exc.field}" if exc.field else path
            if type_name not in registry:
                where = f"{path}.type"
            raise ConfigError(where, str(exc)) from exc
    return built


def _profiles(doc: Mapping[str, Any], registry: Registry) -> tuple[Profile, AdmissionPolicy | None]:
    plugins = _plugins(doc, registry)
    raw = doc.get("profiles")
    if raw is None:
        if plugins:
            raise ConfigError("profiles", "plugins are declared but no profile uses them")
        if "profile" in doc:
            raise ConfigError("profile", "names a profile but no profiles are declared")
        return default_profile(), None
    if not isinstance(raw, list) or not raw:
        raise ConfigError("profiles", "must be a non-empty list")

    profiles: dict[str, tuple[Profile, AdmissionPolicy | None]] = {}
    for i, spec in enumerate(raw):
        path = f"profiles[{i}]"
        spec = _mapping(spec, path)
        _only(spec, {"name", "plugins", "max_fallbacks"}, path)
        name = _str(spec.get("name"), f"{path}.name")
        if name in profiles:
            raise ConfigError(f"{path}.name", f"duplicate profile name {name!r}")
        refs = spec.get("plugins")
        if not isinstance(refs, list) or not refs:
            raise ConfigError(f"{path}.plugins", "must be a non-empty list of plugin references")
        filters: list[tuple[str, Filter]] = []
        scorers: list[WeightedScorer] = []
        pickers: list[tuple[str, Picker]] = []
        admissions: list[AdmissionPolicy] = []
        for j, ref in enumerate(refs):
            rpath = f"{path}.plugins[{j}]"
            ref = _mapping(ref, rpath)
            _only(ref, {"pluginRef", "weight"}, rpath)
            pname = _str(ref.get("pluginRef"), f"{rpath}.pluginRef")
            if pname not in plugins:
                raise ConfigError(f"{rpath}.pluginRef", f"no plugin named {pname!r} is declared")
            plugin = plugins[pname]
            kind = plugin_kind(plugin)
            if kind != "scorer" and "weight" in ref:
                raise ConfigError(
                    f"{rpath}.weight", f"weight applies to scorers, {pname} is a {kind}"
                )
            if kind == "scorer":
                weight = _number(ref.get("weight", 1.0), f"{rpath}.weight")
                assert isinstance(plugin, Scorer)
                try:  # WeightedScorer owns the rule (finite, >= 0)
                    scorers.append(WeightedScorer(pname, plugin, weight))
                except ValueError as exc:
                    raise ConfigError(f"{rpath}.weight", str(exc)) from exc
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
            raise ConfigError(f"{path}.plugins", "a profile takes at most one picker")
        if not scorers:
            raise ConfigError(f"{path}.plugins", "a profile needs at least one scorer")
        max_fallbacks = spec.get("max_fallbacks", 2)
        if (
            isinstance(max_fallbacks, bool)
            or not isinstance(max_fallbacks, int)
            or max_fallbacks < 0
        ):
            raise ConfigError(f"{path}.max_fallbacks", "must be an integer >= 0")
        profile = _build(
            path,
            Profile,
            name=name,
            filters=filters,
            scorers=scorers,
            max_fallbacks=max_fallbacks,
            **({"picker": pickers[0]} if pickers else {}),
        )
        admission = AdmissionChain(admissions) if admissions else None
        profiles[name] = (profile, admission)

    chosen = doc.get("profile")
    if chosen is None:
        return next(iter(profiles.values()))
    chosen = _str(chosen, "profile")
    if chosen not in profiles:
        raise ConfigError("profile", f"no profile named {chosen!r} (have {', '.join(profiles)})")
    return profiles[chosen]
