"""What came back: one request's `Result`, a run's `LoadReport`, and `summarise`.

Per request a `Result` records status, kind, tenant, TTFT, latency, the
usage's prompt/cached/completion tokens
(`usage.prompt_tokens_details.cached_tokens`, as vLLM reports it) and the
`x-fake-engine-id` response header if any; `summarise` turns results into a
`LoadReport` (counts by status, achieved req/s, TTFT and latency
percentiles, hit rate = cached / prompt tokens, per tenant, per engine and
per URL), which prints as a few lines (`lines`) or JSON (`as_dict`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import attrs

__all__ = ["LoadReport", "Result", "percentile", "summarise"]


@attrs.frozen
class Result:
    """One request's outcome, as the client saw it.

    `status` is the HTTP status, 0 when no response came (`error` says why:
    `ConnectError`, `ConnectTimeout`, `ReadTimeout`, another transport
    error's class name, `cancelled`, `in-flight-limit`). Times are
    seconds: `sent_s` since the run started, `lag_s` how late the request
    left against its schedule (open loop), `ttft_s` to the first content
    chunk (streaming only), `latency_s` to the end of the response. Token
    counts come from the response's usage (None when absent).
    """

    index: int
    kind: str
    tenant: str | None
    url: str
    status: int
    sent_s: float
    latency_s: float
    lag_s: float = 0.0
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    engine: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True for a 200 with a complete body."""
        return self.status == 200 and self.error is None


@attrs.frozen
class LoadReport:
    """The summary of a run (or of any list of results); see `summarise`.

    `hit_rate` is cached / prompt tokens over the successful requests that
    reported usage (None without usage). Percentiles are over successful
    requests, in seconds (None when there are none). `achieved_rps` is
    successful requests per second of `duration_s`, the run's wall-clock
    time (`run_load`: from its start until it stopped sending and the last
    answer came in). `engines` counts requests by the engine that
    answered (the `x-fake-engine-id` header), `by_url` by the URL they went to.
    """

    requests: int
    ok: int
    failures: int
    by_status: dict[str, int]
    by_kind: dict[str, int]
    duration_s: float
    offered_rps: float | None
    achieved_rps: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    latency_p50_s: float | None
    latency_p99_s: float | None
    lag_p99_s: float | None
    prompt_tokens: int
    cached_tokens: int
    hit_rate: float | None
    tenants: dict[str, tuple[int, float | None]]
    engines: dict[str, int]
    by_url: dict[str, int] = attrs.field(factory=dict)
    results: tuple[Result, ...] = attrs.field(repr=False, default=())

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready values (without the per-request results)."""
        out = attrs.asdict(self, recurse=False)
        del out["results"]
        out["tenants"] = {t: {"requests": n, "hit_rate": h} for t, (n, h) in self.tenants.items()}
        return out

    def lines(self) -> list[str]:
        """A few human-readable lines."""
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_status.items()))
        offered = f" of {self.offered_rps:g} offered" if self.offered_rps else ""
        out = [
            f"requests {self.requests} ({statuses}), failures {self.failures}",
            f"achieved {self.achieved_rps:.1f} req/s{offered} over {self.duration_s:.1f} s",
            f"TTFT p50 {_ms(self.ttft_p50_s)} p99 {_ms(self.ttft_p99_s)}; "
            f"latency p50 {_ms(self.latency_p50_s)} p99 {_ms(self.latency_p99_s)}",
            f"hit rate {_pct(self.hit_rate)} ({self.cached_tokens} of "
            f"{self.prompt_tokens} prompt tokens cached)",
        ]
        if self.tenants:
            out.append(
                "per tenant: "
                + ", ".join(f"{t} {n} req {_pct(h)}" for t, (n, h) in sorted(self.tenants.items()))
            )
        if self.engines:
            out.append(
                "per engine: " + ", ".join(f"{e} {n}" for e, n in sorted(self.engines.items()))
            )
        if len(self.by_url) > 1:
            out.append("per URL: " + ", ".join(f"{u} {n}" for u, n in sorted(self.by_url.items())))
        return out


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.1f}%"


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The `q` quantile (0..1) of ascending `sorted_values`, linearly interpolated; O(1)."""
    if not sorted_values:
        return None
    pos = q * (len(sorted_values) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def summarise(
    results: Sequence[Result], *, duration_s: float, offered_rps: float | None = None
) -> LoadReport:
    """Summarise `results` of a run that lasted `duration_s`. O(n log n) for the percentiles."""
    ok = [r for r in results if r.ok]
    ttfts = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
    latencies = sorted(r.latency_s for r in ok)
    lags = sorted(r.lag_s for r in results)
    by_status = Counter(
        str(r.status) if r.error is None else f"{r.status}:{r.error}" for r in results
    )
    prompt = cached = 0
    tenant_tokens: dict[str, list[int]] = {}
    tenant_requests: Counter[str] = Counter()
    for r in results:
        tenant_requests[r.tenant or "-"] += 1
    for r in ok:
        if r.prompt_tokens is None or r.cached_tokens is None:
            continue
        prompt += r.prompt_tokens
        cached += r.cached_tokens
        pair = tenant_tokens.setdefault(r.tenant or "-", [0, 0])
        pair[0] += r.prompt_tokens
        pair[1] += r.cached_tokens
    tenants: dict[str, tuple[int, float | None]] = {}
    for tenant, n in tenant_requests.items():
        p, c = tenant_tokens.get(tenant, (0, 0))
        tenants[tenant] = (n, c / p if p else None)
    return LoadReport(
        requests=len(results),
        ok=len(ok),
        failures=len(results) - len(ok),
        by_status=dict(by_status),
        by_kind=dict(Counter(r.kind for r in results)),
        duration_s=duration_s,
        offered_rps=offered_rps,
        achieved_rps=len(ok) / duration_s if duration_s > 0 else 0.0,
        ttft_p50_s=percentile(ttfts, 0.5),
        ttft_p99_s=percentile(ttfts, 0.99),
        latency_p50_s=percentile(latencies, 0.5),
        latency_p99_s=percentile(latencies, 0.99),
        lag_p99_s=percentile(lags, 0.99),
        prompt_tokens=prompt,
        cached_tokens=cached,
        hit_rate=cached / prompt if prompt else None,
        tenants=tenants,
        engines=dict(Counter(r.engine for r in results if r.engine is not None)),
        by_url=dict(Counter(r.url for r in results if r.url)),
        results=tuple(results),
    )
