"""A warm fleet for the route benchmarks (shared by `route_latency` and the suite).

The index is warmed by routing real requests (so it holds what routing puts
there, not a synthetic layout) until it holds about `entries` (block, endpoint)
entries: each endpoint's capacity is `entries / endpoints` blocks, so the
index is full and every further decision also pays for evictions.
Requests are `prompt_tokens` token ids (4,096 by default): a prefix of half
the prompt shared by one of `groups` groups (256, or one per endpoint for
larger fleets: prefix affinity keeps each group on its endpoint, so fewer
groups would leave endpoints empty), then a unique tail.

`build_router(compiled=...)` picks the hashing and index implementations:
True is the numba kernels (`Blocker(compiled=True)` and `make_index(compiled=True)`,
the `CompiledPrefixIndex`), False the pure numpy/Python paths (`PrefixIndex`),
None each class's default. A tree without the compiled index gets the
router's default index, one without the `compiled` switches (an older tree,
run as a baseline) its only paths; `describe` says what a router really runs.
"""

from __future__ import annotations

import importlib
import random
from typing import Any

import attrs
import numpy as np

from prefixroute import Decision, EndpointState, Request, Router, Usage
from prefixroute import index as index_module
from prefixroute.blocks import Blocker
from prefixroute.router import default_profile

__all__ = [
    "COMPILED_AVAILABLE",
    "Workload",
    "build_router",
    "describe",
    "make_fleet",
    "warm_router",
]

try:
    from prefixroute.jit import AVAILABLE as COMPILED_AVAILABLE
except ImportError:  # a tree from before the compiled paths (a baseline run)
    COMPILED_AVAILABLE = False

PROMPT_TOKENS = 4096
SHARED_TOKENS = 2048


def make_fleet(endpoints: int, capacity_blocks: int) -> list[EndpointState]:
    return [
        EndpointState(
            id=f"pod-{i:02d}",
            address=f"127.0.0.1:{20000 + i}",
            waiting=i % 5,
            running=8 + i % 7,
            kv_usage=0.3 + 0.01 * (i % 40),
            kv_capacity_blocks=capacity_blocks,
            observed_at=0.0,
        )
        for i in range(endpoints)
    ]


class Workload:
    """Deterministic requests: a group's prefix (half the prompt) + a unique tail."""

    def __init__(
        self, groups: int = 256, seed: int = 0, prompt_tokens: int = PROMPT_TOKENS
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.prompt_tokens = prompt_tokens
        self.shared_tokens = prompt_tokens // 2
        self.prefixes = self.rng.integers(
            0, 150_000, size=(groups, self.shared_tokens), dtype=np.uint32
        )

    def request(self, i: int) -> Request:
        tail = self.rng.integers(
            0, 150_000, size=self.prompt_tokens - self.shared_tokens, dtype=np.uint32
        )
        tokens = np.concatenate([self.prefixes[i % len(self.prefixes)], tail])
        return Request(model="m", token_ids=tokens, tenant=f"t{i % 7}", max_tokens=128)


def _index(compiled: bool | None) -> Any:
    """The index for `compiled`: None leaves the router's default in place."""
    if compiled is None:
        return None
    if not compiled:
        return index_module.PrefixIndex()
    for name in ("prefixroute.compiled_index", "prefixroute.index"):
        try:
            module = importlib.import_module(name)
        except ImportError:  # a tree without the compiled index
            continue
        make_index = getattr(module, "make_index", None)
        if make_index is not None:
            return make_index(compiled=True)
    return None


def build_router(seed: int = 0, compiled: bool | None = None) -> Router:
    """`Router.default(seed=seed)` with the chosen hashing and index paths."""
    if compiled and not COMPILED_AVAILABLE:
        raise ValueError("compiled=True needs numba (the `fast` extra)")
    switch: dict[str, Any] = {}
    if "compiled" in attrs.fields_dict(Blocker):
        switch["compiled"] = compiled
    return Router(
        default_profile(),
        blocker=Blocker(seed=seed, **switch),
        index=_index(compiled),
        rng=random.Random(seed),
    )


def describe(router: Router) -> str:
    """What `router` runs: its index class and its hashing path."""
    hashing = "kernel" if getattr(router.blocker, "compiled", False) else "numpy"
    return f"{type(router.index).__name__} + {hashing} hashing"


def warm_router(
    endpoints: int = 64,
    entries: int = 1_000_000,
    seed: int = 0,
    *,
    prompt_tokens: int = PROMPT_TOKENS,
    compiled: bool | None = None,
) -> tuple[Router, list[EndpointState], Workload]:
    """A router whose index holds `entries` entries across `endpoints` endpoints.

    The returned workload continues where the warm-up stopped: its next
    requests are new tails of the groups the index already holds.
    """
    router = build_router(seed, compiled)
    fleet = make_fleet(endpoints, capacity_blocks=max(1, entries // endpoints))
    # a group per endpoint at least: the index can only fill the endpoints traffic reaches
    work = Workload(groups=max(256, endpoints), seed=seed, prompt_tokens=prompt_tokens)
    new_blocks = max(1, (prompt_tokens - prompt_tokens // 2) // router.blocker.block_size)
    i = 0
    now = 0.0
    last = 0
    # Affinity keeps some endpoints emptier than others, so the index may never
    # reach every capacity: stop at 99.5% full, when 2,000 requests grew it by
    # less than 1%, or after four times the requests that filling it with
    # all-new blocks would take.
    while len(router.index) < entries * 0.995 and i < 4 * entries // new_blocks:
        now += 0.001
        decision = router.route(work.request(i), fleet, now)
        assert isinstance(decision, Decision)
        router.on_complete(decision, Usage(prompt_tokens=decision.prompt_tokens), now)
        i += 1
        if i % 2000 == 0:
            size = len(router.index)
            if size < last * 1.01:
                break
            last = size
    return router, fleet, work
