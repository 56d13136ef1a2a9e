"""Index events: what engines report about their KV caches.

Drivers translate engine KV-cache events (vLLM's `BlockStored`,
`BlockRemoved`, `AllBlocksCleared` over ZMQ, or a simulator's) and endpoint
lifecycle changes into these values and hand them to `Router.observe`. Block
keys are in the router's key space (`prefixroute.blocks`: uint64 values; an
event with a key outside [0, 2**64) is refused with ValueError when it is
built); translating an engine's own block hashes is the driver's job.
"""

from __future__ import annotations

import attrs

from prefixroute.endpoint import EndpointId
from prefixroute.index import Tier

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EndpointRemoved",
    "IndexEvent",
    "ModeChanged",
]


_KEY_LIMIT = 1 << 64


def _keys(value: object) -> tuple[int, ...]:
    """The block keys as ints; ValueError unless each is in [0, 2**64) (a uint64 key)."""
    keys = tuple(int(k) for k in value)  # type: ignore[attr-defined]
    if keys and (min(keys) < 0 or max(keys) >= _KEY_LIMIT):
        raise ValueError("block keys must be integers in [0, 2**64)")
    return keys


@attrs.frozen(slots=True)
class BlockStored:
    """`endpoint` now holds `keys` (a chain in prefix order) in `tier`; confirms speculation."""

    endpoint: EndpointId
    keys: tuple[int, ...] = attrs.field(converter=_keys)
    tier: Tier = attrs.field(default=Tier.GPU, converter=Tier)


@attrs.frozen(slots=True)
class BlockRemoved:
    """`endpoint` dropped `keys` from `tier` (from every tier when `tier` is None)."""

    endpoint: EndpointId
    keys: tuple[int, ...] = attrs.field(converter=_keys)
    tier: Tier | None = None


@attrs.frozen(slots=True)
class AllBlocksCleared:
    """`endpoint` emptied its cache (a restart or a cache reset)."""

    endpoint: EndpointId


@attrs.frozen(slots=True)
class EndpointRemoved:
    """`endpoint` left the pool: forget everything about it."""

    endpoint: EndpointId


@attrs.frozen(slots=True)
class ModeChanged:
    """`endpoint`'s index mode: `precise` (its KV events are the truth) or approximate.

    A driver sends `precise=True` once the endpoint's event stream is live,
    and `precise=False` while it is broken or silent (see `Router`).
    """

    endpoint: EndpointId
    precise: bool = attrs.field(validator=attrs.validators.instance_of(bool))


IndexEvent = BlockStored | BlockRemoved | AllBlocksCleared | EndpointRemoved | ModeChanged
