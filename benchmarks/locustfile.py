"""The seed experiment's Locust script, against any OpenAI-compatible endpoint.

    pip install locust -e ".[gateway]"   # locust is not a prefixroute dependency
    locust -f benchmarks/locustfile.py --host http://127.0.0.1:8080 \\
        --headless --users 52 --spawn-rate 5 --run-time 60s

Users think `between(0.5, 2)` seconds between requests, as the published
llm-d run's Locust users did. The requests are not written here: each comes
from `prefixroute.devtools.bench.seed_requests` (one sequence shared by all
users of this process), so Locust and `prefixroute bench --rate R` (or
`--users N`; the `seed` scenario) send the same traffic: the three tenant
personas' chat completions with `x-tenant-id` (max_tokens 80) and cold
`/v1/completions` "Question N" (max_tokens 50), 4:1. Requests are not streamed (Locust times whole
responses). Environment: `PREFIXROUTE_SEED` (default 0) picks the sequence,
`PREFIXROUTE_MODEL` the model name (default `qwen3-0.6b`).

Locust's own statistics are per request kind (`tenant`, `cold`). At the end
the script also prints the prefix-cache hit rate the engines reported in the
responses' usage (`usage.prompt_tokens_details.cached_tokens` / prompt tokens)
overall and per tenant. With several Locust worker processes each worker
replays its own copy of the sequence.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

from locust import HttpUser, between, events, task

from prefixroute.devtools.bench import MODEL, request_kind, seed_requests

_REQUESTS = seed_requests(
    int(os.environ.get("PREFIXROUTE_SEED", "0")),
    model=os.environ.get("PREFIXROUTE_MODEL", MODEL),
)
_TOKENS: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # tenant -> [prompt, cached]


class SeedUser(HttpUser):  # type: ignore[misc]
    """One Locust user of the seed experiment: a request, a think, again."""

    wait_time = between(0.5, 2)

    @task
    def send(self) -> None:
        path, body, headers = next(_REQUESTS)
        with self.client.post(
            path,
            json=body,
            headers=headers,
            name=request_kind(path, headers),
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}: {resp.text[:200]}")
                return
            try:
                usage: dict[str, Any] = resp.json().get("usage") or {}
            except ValueError:
                resp.failure("the body is not JSON")
                return
            details = usage.get("prompt_tokens_details") or {}
            tokens = _TOKENS[headers.get("x-tenant-id", "-")]
            tokens[0] += int(usage.get("prompt_tokens") or 0)
            tokens[1] += int(details.get("cached_tokens") or 0)
            resp.success()


@events.test_stop.add_listener  # type: ignore[misc]
def _print_hit_rate(**_: Any) -> None:
    prompt = sum(p for p, _ in _TOKENS.values())
    cached = sum(c for _, c in _TOKENS.values())
    if not prompt:
        return
    per_tenant = ", ".join(f"{t} {c / p:.1%}" for t, (p, c) in sorted(_TOKENS.items()) if p)
    print(f"prefix-cache hit rate (usage): {cached / prompt:.1%} ({per_tenant})")
