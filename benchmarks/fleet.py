"""A warm 64-endpoint fleet for the route benchmarks (shared by the script and the suite).

The index is warmed by routing real requests (so it holds what routing puts
there, not a synthetic layout) until it holds about `entries` (block, endpoint)
entries: each endpoint's capacity is `entries / endpoints` blocks, so the
index is full and every further decision also pays for evictions.
Requests are 4,096 token ids: a 2,048-token prefix shared by one of
`groups` groups, then a unique 2,048-token tail.
"""

from __future__ import annotations

import numpy as np

from prefixroute import Decision, EndpointState, Request, Router, Usage

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
    """Deterministic requests: group prefix + unique tail."""

    def __init__(self, groups: int = 256, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.prefixes = self.rng.integers(0, 150_000, size=(groups, SHARED_TOKENS), dtype=np.uint32)

    def request(self, i: int) -> Request:
        tail = self.rng.integers(0, 150_000, size=PROMPT_TOKENS - SHARED_TOKENS, dtype=np.uint32)
        tokens = np.concatenate([self.prefixes[i % len(self.prefixes)], tail])
        return Request(model="m", token_ids=tokens, tenant=f"t{i % 7}", max_tokens=128)


def warm_router(
    endpoints: int = 64, entries: int = 1_000_000, seed: int = 0
) -> tuple[Router, list[EndpointState], Workload]:
    """A router whose index holds `entries` entries across `endpoints` endpoints."""
    router = Router.default(seed=seed)
    fleet = make_fleet(endpoints, capacity_blocks=entries // endpoints)
    work = Workload(seed=seed)
    i = 0
    now = 0.0
    # Affinity keeps some endpoints emptier than others, so the index may never
    # reach every capacity: stop at 99.5% full or after four times the requests
    # that filling it with all-new blocks would take.
    while len(router.index) < entries * 0.995 and i < 4 * entries // 128:
        now += 0.001
        decision = router.route(work.request(i), fleet, now)
        assert isinstance(decision, Decision)
        router.on_complete(decision, Usage(prompt_tokens=decision.prompt_tokens), now)
        i += 1
    return router, fleet, work
