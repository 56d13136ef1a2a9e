"""The endpoint model: what the router knows about one serving pod.

`EndpointState` is a frozen snapshot that a driver builds from whatever it
scrapes (Prometheus metrics, health checks, a simulator's engine). The core
never fetches it; drivers pass a fresh sequence of snapshots to every
`Router.route` call.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from typing import NewType

import attrs

from prefixroute.request import is_text

__all__ = ["MAX_COUNT", "EndpointId", "EndpointState", "Role"]

EndpointId = NewType("EndpointId", str)


class Role(enum.StrEnum):
    """What part of inference an endpoint serves (disaggregated serving)."""

    BOTH = "both"
    PREFILL = "prefill"
    DECODE = "decode"


MAX_COUNT = 2**63 - 1
"""Largest `waiting`, `running`, `kv_capacity_blocks` or `max_model_len` accepted (int64):
beyond it a value is a scrape gone wrong, and float arithmetic on it would overflow."""


def _endpoint_id(value: object) -> EndpointId:
    if not isinstance(value, str) or not value:
        raise ValueError(f"endpoint id must be a non-empty string, got {value!r}")
    if not is_text(value):
        raise ValueError(f"endpoint id must be valid text (no lone surrogates), got {value!r}")
    return EndpointId(value)


def _names(field: str, value: object) -> frozenset[str]:
    """`value` as a frozenset of non-empty strings (a bare string is refused, not split)."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError(f"{field} must be a collection of names, got {value!r}")
    out = frozenset(value)
    for name in out:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{field} must hold non-empty strings, got {name!r}")
    return out


def _models(value: object) -> frozenset[str]:
    return _names("models", value)


def _adapters(value: object) -> frozenset[str]:
    return _names("adapters", value)


def _check_address(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"address must be host:port, got {value!r}")
    host, sep, port = value.rpartition(":")
    if (
        not sep
        or not host
        or not (port.isascii() and port.isdigit())
        or not 0 < int(port) < 65536
        or not is_text(host)
    ):
        raise ValueError(f"address must be host:port, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_fraction(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    if not (_is_real(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{attr.name} must be a number within [0, 1], got {value!r}")


def _check_count(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if not (_is_int(value) and 0 <= value <= MAX_COUNT):
        raise ValueError(f"{attr.name} must be an integer in [0, 2**63), got {value!r}")


def _check_positive(_inst: object, attr: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and not (_is_int(value) and 0 < value <= MAX_COUNT):
        raise ValueError(f"{attr.name} must be an integer in [1, 2**63) or None, got {value!r}")


def _check_time(_inst: object, attr: attrs.Attribute[float | None], value: float | None) -> None:
    if value is not None and not (_is_real(value) and math.isfinite(value)):
        raise ValueError(f"{attr.name} must be a finite number or None, got {value!r}")


def _check_bool(_inst: object, attr: attrs.Attribute[bool], value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{attr.name} must be a boolean, got {value!r}")


@attrs.frozen(slots=True)
class EndpointState:
    """A snapshot of one endpoint as last observed by the driver.

    `models` and `adapters` name what the endpoint serves; an empty `models`
    means "any model" (a driver that does not know). `kv_capacity_blocks` is
    the engine's KV pool size in engine blocks (vLLM's `num_gpu_blocks`), or
    None when unknown. `observed_at` is the driver's time of the metrics
    behind `waiting`, `running` and `kv_usage`, or None if never observed.
    `max_model_len` is the engine's longest context in tokens (vLLM's
    `/v1/models` reports it), or None when unknown. `block_size` is the
    engine's KV block size in tokens (vLLM's `vllm:cache_config_info`
    reports it), or None when unknown.

    Every field is checked at construction: ValueError naming the field for
    a non-integer or negative count (`waiting`, `running`), a `kv_usage`
    outside [0, 1] or NaN, a `kv_capacity_blocks`, `max_model_len` or
    `block_size` that is not a positive integer (inf and NaN included), a non-finite
    `observed_at`, a bare string as `models` or `adapters` (a collection of
    names is expected), or an id or host that is not valid text. Counts are
    bounded by `MAX_COUNT`, so the router's arithmetic on them cannot
    overflow.
    """

    id: EndpointId = attrs.field(converter=_endpoint_id)
    address: str = attrs.field(validator=_check_address)
    role: Role = attrs.field(default=Role.BOTH, converter=Role)
    models: frozenset[str] = attrs.field(default=frozenset(), converter=_models)
    adapters: frozenset[str] = attrs.field(default=frozenset(), converter=_adapters)
    waiting: int = attrs.field(default=0, validator=_check_count)
    running: int = attrs.field(default=0, validator=_check_count)
    kv_usage: float = attrs.field(default=0.0, validator=_check_fraction)
    kv_capacity_blocks: int | None = attrs.field(default=None, validator=_check_positive)
    healthy: bool = attrs.field(default=True, validator=_check_bool)
    observed_at: float | None = attrs.field(default=None, validator=_check_time)
    max_model_len: int | None = attrs.field(default=None, validator=_check_positive)
    block_size: int | None = attrs.field(default=None, validator=_check_positive)

    def serves(self, model: str) -> bool:
        """Whether this endpoint serves `model` (an empty `models` serves all)."""
        return not self.models or model in self.models
