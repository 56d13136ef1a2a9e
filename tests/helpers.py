"""Small builders shared by the tests (not hypothesis strategies: see strategies.py)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from prefixroute import EndpointState, LoadTracker, PrefixMatch, Request, RouteContext
from prefixroute.devtools.live import ROUND_ROBIN as ROUND_ROBIN  # shared with the benchmarks
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


# -- the drivers' end-to-end tests ------------------------------------------------------

MODEL = "qwen3-0.6b"
"""The model the fake engines serve."""

"""A router config that ignores prefixes: requests alternate between healthy endpoints."""


def chat_body(question: str, *, system: str, **extra: Any) -> dict[str, Any]:
    """A chat-completions body (max_tokens 4 unless `extra` says otherwise)."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return {"model": MODEL, "messages": messages, "max_tokens": 4, **extra}


def cached_tokens(answer: Any) -> int:
    """`usage.prompt_tokens_details.cached_tokens` of a JSON answer (an httpx response)."""
    return int(answer.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def pool(*addresses: str) -> list[dict[str, str]]:
    """A config's `endpoints` list for `addresses`, ids e0, e1, ..."""
    return [{"address": a, "id": f"e{i}"} for i, a in enumerate(addresses)]
