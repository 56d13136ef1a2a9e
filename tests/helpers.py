"""Small builders shared by the tests (not hypothesis strategies: see strategies.py)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from prefixroute import EndpointState, LoadTracker, PrefixMatch, Request, RouteContext
from prefixroute.endpoint import EndpointId


def endpoint(i: int, **fields: object) -> EndpointState:
    """Endpoint `e{i}` on a loopback port, fresh metrics at t=0 unless overridden."""
    base: dict[str, object] = {
        "id": f"e{i}",
        "address": f"127.0.0.1:{9000 + i}",
        "observed_at": 0.0,
    }
    base.update(fields)
    return EndpointState(**base)  # type: ignore[arg-type]


def context(
    request: Request | None = None,
    *,
    now: float = 0.0,
    total_blocks: int = 0,
    matches: Mapping[str, int] | None = None,
    load: LoadTracker | None = None,
    seed: int = 0,
    candidates: Sequence[EndpointState] = (),
) -> RouteContext:
    """A `RouteContext` with `total_blocks` fake keys, GPU-only matches and `candidates` set."""
    ctx = RouteContext(
        request=request or Request(model="m", prompt="hello"),
        now=now,
        rng=random.Random(seed),
        block_keys=list(range(total_blocks)),
        prompt_tokens=total_blocks * 16,
        tokens_per_block=16.0,
        matches={EndpointId(k): PrefixMatch(v, float(v)) for k, v in (matches or {}).items()},
        load=load or LoadTracker(),
    )
    ctx.candidates = candidates
    return ctx
