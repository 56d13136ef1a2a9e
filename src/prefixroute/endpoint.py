"""The endpoint model: what the router knows about one serving pod.

`EndpointState` is a frozen snapshot that a driver builds from whatever it
scrapes (Prometheus metrics, health checks, a simulator's engine). The core
never fetches it; drivers pass a fresh sequence of snapshots to every
`Router.route` call.
"""

from __future__ import annotations

import enum
from typing import NewType

import attrs

__all__ = ["EndpointId", "EndpointState", "Role"]

EndpointId = NewType("EndpointId", str)


class Role(enum.StrEnum):
    """What part of inference an endpoint serves (disaggregated serving)."""

    BOTH = "both"
    PREFILL = "prefill"
    DECODE = "decode"


def _endpoint_id(value: object) -> EndpointId:
    if not isinstance(value, str) or not value:
        raise ValueError(f"endpoint id must be a non-empty string, got {value!r}")
    return EndpointId(value)


def _check_address(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address must be host:port, got {value!r}")


def _check_fraction(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attr.name} must be within [0, 1], got {value!r}")


def _check_non_negative(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attr.name} must be >= 0, got {value!r}")


def _check_capacity(_inst: object, attr: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attr.name} must be > 0 or None, got {value!r}")


@attrs.frozen(slots=True)
class EndpointState:
    """A snapshot of one endpoint as last observed by the driver.

    `models` and `adapters` name what the endpoint serves; an empty `models`
    means "any model" (a driver that does not know). `kv_capacity_blocks` is
    the engine's KV pool size in engine blocks (vLLM's `num_gpu_blocks`), or
    None when unknown. `observed_at` is the driver's time of the metrics
    behind `waiting`, `running` and `kv_usage`, or None if never observed.
    """

    id: EndpointId = attrs.field(converter=_endpoint_id)
    address: str = attrs.field(validator=_check_address)
    role: Role = attrs.field(default=Role.BOTH, converter=Role)
    models: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    adapters: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    waiting: int = attrs.field(default=0, validator=_check_non_negative)
    running: int = attrs.field(default=0, validator=_check_non_negative)
    kv_usage: float = attrs.field(default=0.0, validator=_check_fraction)
    kv_capacity_blocks: int | None = attrs.field(default=None, validator=_check_capacity)
    healthy: bool = True
    observed_at: float | None = None

    def serves(self, model: str) -> bool:
        """Whether this endpoint serves `model` (an empty `models` serves all)."""
        return not self.models or model in self.models
