"""`prefixroute bench`: replay a scenario or a trace over HTTP against any OpenAI URL.

    prefixroute bench --url http://127.0.0.1:8080 [--url ...] --scenario seed --duration 10
    prefixroute bench --url URL --scenario conversation.jsonl.gz --time-scale 0.1
    prefixroute bench --url URL --scenario my-scenario.yaml --rate 32 --json out.json

What to send (`--scenario`): a built-in scenario name (`prefixroute/sim/
scenarios/NAME.yaml`), a scenario file (YAML/JSON, docs/simulator.md), or
a Mooncake-format trace (`.jsonl` / `.jsonl.gz`, `prefixroute.sim.trace`)
given directly. `scenario_source` builds the scenario's workload with the
simulator's own code (`build_workload`) and `wire_request` turns each
`SimRequest` back into the OpenAI request it stands for: a chat prompt
(rendered by `prefixroute.openai.render_messages`) is parsed back into its
messages and sent to `/v1/chat/completions` with `x-tenant-id` (and
`x-session-id` for a conversation); other text prompts go to
`/v1/completions` untemplated, without a tenant. A token-only request (a
trace's) gets a text prompt of one common English word per token id
(`prefixroute.devtools.prompts`): the same ids give the same text, so
requests sharing leading hash blocks share leading text, and the text is
as many tokens as the trace says under GPT-2-style BPE tokenizers. Its
`max_tokens` is the trace's `output_length`.

When requests go (`run_load`):

* scenario timing (neither `rate_rps` nor `users`; the command's default):
  each request leaves at its own `arrival_s` (a trace's timestamps times
  `time_scale`, a scenario's Poisson/constant arrivals), and a closed-loop
  scenario's users send their next request a think time after the answer
  (`Source.follow_up`, called when each request ends, as the simulator
  does). Multi-turn chats continue only after their previous turn answered.
* open loop, `rate_rps`: Poisson (default) or evenly spaced arrivals in the
  scenario's request order, sent whether or not earlier requests have
  finished, as inference-perf and vLLM's `benchmark_serving.py` do.
* closed loop, `users`: Locust's model. Each user sends, waits for the
  answer, thinks a uniform `think_s` (0.5-2 s, the seed's Locust
  `between(0.5, 2)`), and sends again; users start evenly over `ramp_s`.

In open loop and scenario timing a request whose slot comes while
`max_in_flight` requests are outstanding is not sent and counts as a failure
(`in-flight-limit`): the target could not keep up. Runs are bounded: no request starts at or
after `duration_s` or beyond `max_requests`, or after `stop` is set, and
stragglers are waited for at most `timeout_s` (then cancelled, counting as
failures). The request sequence is deterministic given `seed`
(string-seeded `random.Random` streams).

Several base URLs (`spread`): `round-robin` (default) sends request i to URL
i mod n, the "direct" baseline of `benchmarks/side_by_side.py`; `sticky`
sends every request of one session (else of one tenant) to the same URL,
chosen by a keyed hash, so a conversation's history stays on one engine
the way a cache-aware router would place it; requests with neither go
round robin.

With `stream=True` (default) requests ask for `stream_options.include_usage`
and TTFT is the time to the first chunk carrying content (vLLM's first chunk
only announces the role). Per request a `Result` records status, kind,
tenant, TTFT, latency, the usage's prompt/cached/completion tokens
(`usage.prompt_tokens_details.cached_tokens`, as vLLM reports it) and the
`x-fake-engine-id` response header if any; `summarise` turns results into a
`LoadReport` (counts by status, achieved req/s, TTFT and latency
percentiles, hit rate = cached / prompt tokens, per tenant, per engine and
per URL).

The tool shares the CPU with whatever it measures; its own ceiling is
whatever rate it reaches against engines that answer instantly, and `lag`
(how late requests left against their schedule) tells when it fell behind.
So it spends as little CPU as it can per request: aiohttp's client on
uvloop when installed (`run_with_uvloop`, which the command line, the live
demo and the benchmarks use); docs/performance.md has its cost per request.
`timeout_s` limits how long a request may wait for a connection and then how
long the server may stay silent (between any two bytes), not the whole
response, so a long stream that keeps flowing is not cut; redirects are not
followed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import random
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

import aiohttp
import attrs

from prefixroute.devtools.prompts import prompt_text
from prefixroute.sim.scenario import load_scenario
from prefixroute.sim.schema import Fields
from prefixroute.sim.source import SimRequest, Source
from prefixroute.sim.trace import TraceSource
from prefixroute.sim.workload_schema import build_workload

__all__ = [
    "MODEL",
    "SPREADS",
    "LoadReport",
    "Result",
    "WireRequest",
    "Workload",
    "cli_arguments",
    "cli_main",
    "discover_model",
    "messages_of",
    "percentile",
    "request_kind",
    "run_load",
    "run_with_uvloop",
    "scenario_source",
    "seed_requests",
    "source_requests",
    "summarise",
    "wire_request",
]

MODEL = "qwen3-0.6b"
"""The model name the seed experiment's requests carry unless told otherwise."""

WireRequest = tuple[str, dict[str, Any], dict[str, str]]
"""(path, JSON body, headers) of one OpenAI request."""

SPREADS = ("round-robin", "sticky")
"""How requests are spread over several URLs (module docstring)."""

TRACE_SUFFIXES = (".jsonl", ".jsonl.gz")
"""A `--scenario` path ending so is read as a Mooncake-format trace."""

_FOREVER_S = 1e12  # a workload "duration" no run reaches: the sources are lazy

_T = TypeVar("_T")


# --- what to send ------------------------------------------------------------------------

_HEADER = re.compile(r"<\|((?:[^\\|]|\\.)*)\|(\d+)\|>")
_UNESCAPE = re.compile(r"\\(.)")


def messages_of(prompt: str) -> list[dict[str, str]]:
    """The chat messages whose `render_messages` rendering is `prompt` (its inverse).

    O(len(prompt)). ValueError if `prompt` is not such a rendering.
    """
    messages: list[dict[str, str]] = []
    pos = 0
    while pos < len(prompt):
        m = _HEADER.match(prompt, pos)
        if m is None:
            raise ValueError(f"not a rendered chat prompt at character {pos}")
        start = m.end()
        end = start + int(m.group(2))
        if end > len(prompt):
            raise ValueError("a message's content runs past the end of the prompt")
        role = _UNESCAPE.sub(r"\1", m.group(1))
        messages.append({"role": role, "content": prompt[start:end]})
        pos = end
    return messages


def wire_request(sim: SimRequest) -> WireRequest:
    """The OpenAI request a simulated request stands for.

    `tenant` and `chat` requests are chat completions with `x-tenant-id` (and
    `x-session-id` for a chat's conversation); the others (`cold`,
    `shared-prefix`, `trace`) are untemplated completions without a tenant,
    their prompt the text, or for a token-only request (a trace's)
    `prompt_text(token_ids)`: one word per token id. O(prompt length).
    """
    req = sim.request
    max_tokens = req.max_tokens if req.max_tokens is not None else sim.output_tokens
    if sim.kind in ("tenant", "chat") and req.prompt is not None:
        body: dict[str, Any] = {
            "model": req.model,
            "messages": messages_of(req.prompt),
            "max_tokens": max_tokens,
        }
        headers = {"x-tenant-id": req.tenant} if req.tenant else {}
        if req.session is not None:
            headers["x-session-id"] = req.session
        return "/v1/chat/completions", body, headers
    if req.prompt is not None:
        prompt = req.prompt
    else:
        assert req.token_ids is not None
        prompt = prompt_text(req.token_ids)
    return "/v1/completions", {"model": req.model, "prompt": prompt, "max_tokens": max_tokens}, {}


def source_requests(source: Source) -> Iterator[WireRequest]:
    """`source`'s arrivals as OpenAI requests, in order (lazy; arrival times ignored)."""
    for sim in source.arrivals():
        yield wire_request(sim)


def seed_requests(
    seed: int = 0, *, model: str = MODEL, scenario: str = "seed"
) -> Iterator[WireRequest]:
    """The seed experiment's request sequence, endless and deterministic given `seed`.

    Built from the built-in `scenario`'s workload (its personas, questions,
    mix and max_tokens) with its arrival process replaced by a constant one
    (`scenario_source(..., timed=False)`): only the order of requests matters
    here, `run_load` decides when they go. O(1) per request after the first
    of each (tenant, question).
    """
    return source_requests(scenario_source(scenario, model=model, seed=seed, timed=False).source)


@attrs.frozen
class Workload:
    """What `scenario_source` built: the source, and what to call it in reports.

    `timed` is True when the source's own arrival times (and follow-ups)
    are meant to drive the run; False for an endless source whose order
    only matters (`--rate` / `--users` decide when requests go).
    """

    source: Source
    name: str
    description: str
    timed: bool


def _is_trace(scenario: str) -> bool:
    return scenario.endswith(TRACE_SUFFIXES)


def scenario_source(
    scenario: str,
    *,
    model: str,
    seed: int | None = None,
    duration_s: float = 10.0,
    time_scale: float | None = None,
    timed: bool = True,
) -> Workload:
    """The requests of `scenario`: a built-in name, a scenario file or a trace (`.jsonl[.gz]`).

    `timed`: keep the scenario's arrival process, up to `duration_s`
    (scenario timing); otherwise the workload's arrival process is
    replaced by a constant one and the source is endless: only the order of
    requests matters, `run_load` decides when they go (a trace is replayed
    in timestamp order). `model` replaces the workload's model; `seed`
    (default: the scenario's) seeds it; `time_scale` multiplies a trace's
    timestamps (a trace given directly, or a scenario's `workload.trace`;
    ValueError for any other scenario). ScenarioError (a ValueError) names
    what is wrong: unknown name, unreadable file, invalid field, bad trace
    line. O(trace size) for a trace, read whole; lazy otherwise.
    """
    horizon = duration_s if timed else _FOREVER_S
    if _is_trace(scenario):
        trace = TraceSource(
            scenario,
            time_scale=1.0 if time_scale is None else time_scale,
            model=model,
            duration_s=horizon,
        )
        name = Path(scenario).name
        return Workload(trace, name, f"Mooncake trace {name}, {len(trace)} records", timed)
    loaded = load_scenario(scenario)
    workload = dict(loaded.workload)
    workload.pop("model", None)
    if isinstance(workload.get("trace"), dict):
        spec = dict(workload["trace"])
        if isinstance(spec.get("path"), str):
            spec["path"] = str(loaded.base_dir / spec["path"])
        if time_scale is not None:
            spec["time_scale"] = time_scale
        workload["trace"] = spec
    elif time_scale is not None:
        raise ValueError(f"--time-scale is for traces; scenario {loaded.name!r} has no trace")
    elif not timed:
        workload["arrival"] = {"process": "constant", "rate_rps": 1.0}
    source = build_workload(
        Fields(workload, "workload"),
        seed=loaded.seed if seed is None else seed,
        duration_s=horizon,
        model=model,
    )
    description = " ".join(loaded.description.split())
    return Workload(source, loaded.name or scenario, description, timed)


def request_kind(path: str, headers: dict[str, str]) -> str:
    """The label of a request for reports: `chat`, `tenant` or `cold`."""
    if path.endswith("/chat/completions"):
        return "chat" if "x-session-id" in headers else "tenant"
    return "cold"


# --- what came back ----------------------------------------------------------------------


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
    successful requests per second of `duration_s`, the time from the start
    to the last completion. `engines` counts requests by the engine that
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


# --- sending -----------------------------------------------------------------------------


def _usage(usage: Any) -> tuple[int | None, int | None, int | None]:
    if not isinstance(usage, dict):
        return None, None, None
    prompt = usage.get("prompt_tokens")
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return prompt, cached, usage.get("completion_tokens")


def _has_content(chunk: Any) -> bool:
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    if not choices:
        return False
    choice = choices[0]
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return bool(delta.get("content") or delta.get("reasoning_content"))
    return bool(choice.get("text"))


def _sticky_slot(key: str, n: int) -> int:
    """Which of `n` URLs `key` (a session or tenant) sticks to: a keyed hash, stable across runs."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=b"prefixroute.bench").digest()
    return int.from_bytes(digest, "little") % n


class _Sender:
    """Sends one request and measures it; shared by every arrival loop."""

    def __init__(
        self,
        client: aiohttp.ClientSession,
        urls: Sequence[str],
        *,
        stream: bool,
        max_tokens: int | None,
        t0: float,
        on_result: Callable[[Result], None] | None,
        spread: str = "round-robin",
    ) -> None:
        self.client = client
        self.urls = [u.rstrip("/") for u in urls]
        self.stream = stream
        self.max_tokens = max_tokens
        self.t0 = t0
        self.on_result = on_result
        self.spread = spread
        self.results: list[Result] = []
        self.in_flight = 0

    def record(self, result: Result) -> Result:
        self.results.append(result)
        if self.on_result is not None:
            self.on_result(result)
        return result

    def url_for(self, index: int, headers: dict[str, str]) -> str:
        """The URL request `index` goes to (module docstring: `spread`). O(1)."""
        n = len(self.urls)
        if self.spread == "sticky" and n > 1:
            key = headers.get("x-session-id") or headers.get("x-tenant-id")
            if key:
                return self.urls[_sticky_slot(key, n)]
        return self.urls[index % n]

    def refused(self, index: int, wire: WireRequest, due: float, lag: float, kind: str) -> None:
        """Record request `index` as not sent: `max_in_flight` requests were outstanding."""
        self.record(
            Result(
                index=index,
                kind=kind,
                tenant=wire[2].get("x-tenant-id"),
                url="",
                status=0,
                sent_s=due,
                latency_s=0.0,
                lag_s=lag,
                error="in-flight-limit",
            )
        )

    async def send(
        self, index: int, wire: WireRequest, lag_s: float = 0.0, kind: str | None = None
    ) -> Result:
        self.in_flight += 1
        try:
            return await self._send(index, wire, lag_s, kind)
        finally:
            self.in_flight -= 1

    async def _send(self, index: int, wire: WireRequest, lag_s: float, kind: str | None) -> Result:
        path, body, headers = wire
        url = self.url_for(index, headers)
        body = dict(body)
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        start = time.monotonic()
        base: dict[str, Any] = {
            "index": index,
            "kind": kind or request_kind(path, headers),
            "tenant": headers.get("x-tenant-id"),
            "url": url,
            "sent_s": start - self.t0,
            "lag_s": lag_s,
        }
        fields: dict[str, Any] = {"status": 0}
        try:
            async with self.client.post(
                url + path, json=body, headers=headers, allow_redirects=False
            ) as resp:
                fields["status"] = resp.status
                fields["engine"] = resp.headers.get("x-fake-engine-id")
                if resp.status != 200:
                    fields["error"] = _error_code(await resp.read())
                elif self.stream:
                    await self._stream(resp, start, fields)
                else:
                    answer = json.loads(await resp.read())
                    usage = answer.get("usage") if isinstance(answer, dict) else None
                    fields.update(_usage_fields(usage))
        except asyncio.CancelledError:
            fields["error"] = "cancelled"
            self.record(Result(**base, **fields, latency_s=time.monotonic() - start))
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            fields["error"] = _error_name(exc)
        return self.record(Result(**base, **fields, latency_s=time.monotonic() - start))

    @staticmethod
    async def _stream(resp: aiohttp.ClientResponse, start: float, fields: dict[str, Any]) -> None:
        """Read an SSE answer to its end: TTFT at the first content chunk, then the usage.

        Lines are split here from whatever the socket delivers (no line-length
        limit). Reading goes on past `[DONE]` to the end of the response, so
        the connection is kept for the next request.
        """
        done = False
        pending = b""
        async for data in resp.content.iter_any():
            if done:
                continue
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                event = line[5:].strip()
                if event == b"[DONE]":
                    done = True
                    break
                # Parse only what is needed: the first content chunk and the usage chunk.
                if "ttft_s" not in fields:
                    chunk = json.loads(event)
                    if isinstance(chunk, dict) and "error" in chunk:
                        fields["error"] = "stream-error"
                        return
                    if _has_content(chunk):
                        fields["ttft_s"] = time.monotonic() - start
                if b'"prompt_tokens"' in event:
                    fields.update(_usage_fields(json.loads(event).get("usage")))
                elif b'"error"' in event and "error" in json.loads(event):
                    fields["error"] = "stream-error"
                    return
        if not done:
            fields["error"] = "truncated"


def _error_name(exc: BaseException) -> str:
    """A transport failure's label in results: stable names for the common ones."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "ConnectError"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "ConnectTimeout"
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return "ReadTimeout"
    return type(exc).__name__


def _usage_fields(usage: Any) -> dict[str, Any]:
    prompt, cached, completion = _usage(usage)
    return {"prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": completion}


def _error_code(content: bytes) -> str | None:
    """The OpenAI error body's `code` (or `type`), else None: the status says enough."""
    try:
        err = json.loads(content).get("error")
    except (ValueError, AttributeError):
        return None
    if isinstance(err, dict):
        code = err.get("code") or err.get("type")
        return str(code) if code is not None else None
    return None


async def discover_model(client: aiohttp.ClientSession, base_url: str) -> str | None:
    """The first model `base_url/v1/models` lists, or None if it answers nothing usable."""
    try:
        async with client.get(base_url.rstrip("/") + "/v1/models", allow_redirects=False) as resp:
            if resp.status != 200:
                return None
            data = json.loads(await resp.read()).get("data")
        if data and isinstance(data[0], dict) and isinstance(data[0].get("id"), str):
            return str(data[0]["id"])
    except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError, KeyError, TypeError):
        pass
    return None


def _new_client(timeout_s: float, max_in_flight: int) -> aiohttp.ClientSession:
    """The HTTP client `run_load` makes when it is not given one (call on the running loop).

    At most `max_in_flight` connections; `timeout_s` for getting a connection
    and for any silence while reading (module docstring). No `Accept-Encoding`:
    a server that compresses would make the generator pay to decompress.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_in_flight),
        timeout=aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_read=timeout_s),
        skip_auto_headers=("Accept-Encoding",),
    )


def run_with_uvloop(main: Coroutine[Any, Any, _T]) -> _T:
    """`asyncio.run(main)` on a uvloop event loop when uvloop is installed (else asyncio's).

    uvloop roughly halves the event loop's own CPU per request, which the
    load generator shares with what it measures.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


_Job = tuple[WireRequest, SimRequest | None]
"""One request to send, and the simulated request it came from (None for plain wire requests)."""


async def run_load(
    base_url: str | Sequence[str],
    *,
    rate_rps: float | None = None,
    users: int | None = None,
    duration_s: float = 10.0,
    max_requests: int | None = None,
    stream: bool = True,
    seed: int = 0,
    process: str = "poisson",
    think_s: tuple[float, float] = (0.5, 2.0),
    ramp_s: float = 1.0,
    requests: Iterable[WireRequest] | None = None,
    source: Source | None = None,
    model: str | None = None,
    max_tokens: int | None = None,
    timeout_s: float = 30.0,
    max_in_flight: int = 4096,
    spread: str = "round-robin",
    on_result: Callable[[Result], None] | None = None,
    stop: asyncio.Event | None = None,
    client: aiohttp.ClientSession | None = None,
) -> LoadReport:
    """Send `requests` or `source`'s (default: `seed_requests(seed)`) to `base_url`; summarise.

    At most one of `rate_rps` (open loop, `process` poisson or constant) and
    `users` (closed loop, `think_s` between answers) is given; with neither,
    `source` is required and its own arrival times and follow-ups drive the
    run (scenario timing). See the module docstring. With a `source` and a
    rate or users, its arrivals are taken in order (their times ignored) and
    `follow_up` still hears of each answer (so open-loop chats continue):
    give an endless open-loop source (`scenario_source(..., timed=False)`).
    Several base URLs are shared as `spread` says. `model` replaces the
    seed requests' model (default: the first of the target's `/v1/models`,
    else `MODEL`); `max_tokens` overrides every request's. `on_result` is
    called for each result as it arrives (from the event loop); setting
    `stop` ends the run early (in-flight requests still finish). Runs at most
    `duration_s` + `timeout_s` + 1 seconds. A `client` passed in is used
    as it is (its own timeouts and connection limit) and left open; without
    one the run makes `_new_client(timeout_s, max_in_flight)` and closes it.
    ValueError for bad arguments.
    """
    if rate_rps is not None and users is not None:
        raise ValueError("give at most one of rate_rps (open loop) and users (closed loop)")
    if rate_rps is None and users is None and source is None:
        raise ValueError("give rate_rps (open loop), users (closed loop) or a timed source")
    if requests is not None and source is not None:
        raise ValueError("give requests or source, not both")
    if rate_rps is not None and not 0 < rate_rps < math.inf:
        raise ValueError(f"rate_rps must be > 0, got {rate_rps!r}")
    if users is not None and users < 1:
        raise ValueError(f"users must be >= 1, got {users!r}")
    if not 0 < duration_s < math.inf:
        raise ValueError(f"duration_s must be finite and > 0, got {duration_s!r}")
    if max_requests is not None and max_requests < 1:
        raise ValueError(f"max_requests must be >= 1, got {max_requests!r}")
    if process not in ("poisson", "constant"):
        raise ValueError(f"process must be poisson or constant, got {process!r}")
    if not 0 <= think_s[0] <= think_s[1]:
        raise ValueError(f"think_s must be [low, high] with 0 <= low <= high, got {think_s!r}")
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {', '.join(SPREADS)}, got {spread!r}")
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    if not urls:
        raise ValueError("base_url: at least one URL")
    own = client is None
    if client is None:
        client = _new_client(timeout_s, max_in_flight)
    try:
        if requests is None and source is None:
            if model is None:
                model = await discover_model(client, urls[0]) or MODEL
            requests = seed_requests(seed, model=model)
        jobs: Iterator[_Job]
        if source is not None:
            jobs = ((wire_request(sim), sim) for sim in source.arrivals())
        else:
            assert requests is not None
            jobs = ((wire, None) for wire in requests)
        if max_requests is not None:
            jobs = itertools.islice(jobs, max_requests)
        sender = _Sender(
            client,
            urls,
            stream=stream,
            max_tokens=max_tokens,
            t0=time.monotonic(),
            on_result=on_result,
            spread=spread,
        )
        stop = stop or asyncio.Event()
        if rate_rps is not None:
            await _open_loop(
                sender,
                jobs,
                source,
                rate_rps,
                process,
                seed,
                duration_s,
                timeout_s,
                stop,
                max_in_flight,
            )
        elif users is not None:
            await _closed_loop(
                sender, jobs, source, users, think_s, ramp_s, seed, duration_s, timeout_s, stop
            )
        else:
            assert source is not None
            await _timed_loop(
                sender, jobs, source, duration_s, max_requests, timeout_s, stop, max_in_flight
            )
        results = sender.results
        end = max((r.sent_s + r.latency_s for r in results), default=0.0)
        return summarise(results, duration_s=max(end, 1e-9), offered_rps=rate_rps)
    finally:
        if own:
            await client.close()


async def _drain(tasks: set[asyncio.Task[Any]], timeout_s: float) -> None:
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=1.0)


def _kind(job: _Job) -> str:
    wire, sim = job
    return sim.kind if sim is not None else request_kind(wire[0], wire[2])


async def _send_job(
    sender: _Sender, index: int, job: _Job, source: Source | None, lag: float = 0.0
) -> SimRequest | None:
    """Send `job`; tell `source` how it ended; the follow-up the source answers with, if any."""
    wire, sim = job
    result = await sender.send(index, wire, lag, _kind(job))
    if source is None or sim is None:
        return None
    return source.follow_up(sim, time.monotonic() - sender.t0, result.ok)


async def _open_loop(
    sender: _Sender,
    jobs: Iterator[_Job],
    source: Source | None,
    rate: float,
    process: str,
    seed: int,
    duration_s: float,
    timeout_s: float,
    stop: asyncio.Event,
    max_in_flight: int,
) -> None:
    rng = random.Random(f"prefixroute.loadgen/{seed}/arrivals")
    tasks: set[asyncio.Task[Any]] = set()
    due = 0.0
    for index, job in enumerate(jobs):
        if index > 0:
            due = due + rng.expovariate(rate) if process == "poisson" else index / rate
        if due >= duration_s:
            break
        while (delay := sender.t0 + due - time.monotonic()) > 0 and not stop.is_set():
            await asyncio.sleep(min(delay, 0.1))
        if stop.is_set():
            break
        lag = time.monotonic() - sender.t0 - due
        if len(tasks) >= max_in_flight:
            sender.refused(index, job[0], due, lag, _kind(job))
            if source is not None and job[1] is not None:
                source.follow_up(job[1], time.monotonic() - sender.t0, False)  # drop its chat
            continue
        task = asyncio.create_task(_send_job(sender, index, job, source, lag))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await _drain(tasks, timeout_s + 1.0)


async def _closed_loop(
    sender: _Sender,
    jobs: Iterator[_Job],
    source: Source | None,
    users: int,
    think_s: tuple[float, float],
    ramp_s: float,
    seed: int,
    duration_s: float,
    timeout_s: float,
    stop: asyncio.Event,
) -> None:
    counter = itertools.count()
    end = sender.t0 + duration_s

    async def pause(seconds: float) -> None:
        """Sleep `seconds`, waking early at the end of the run or on `stop`."""
        until = min(time.monotonic() + seconds, end)
        while (left := until - time.monotonic()) > 0 and not stop.is_set():
            await asyncio.sleep(min(left, 0.1))

    async def user(u: int) -> None:
        rng = random.Random(f"prefixroute.loadgen/{seed}/user/{u}")
        await pause(ramp_s * u / users)
        while time.monotonic() < end and not stop.is_set():
            job = next(jobs, None)
            if job is None:
                return
            await _send_job(sender, next(counter), job, source)
            low, high = think_s
            await pause(low if low == high else rng.uniform(low, high))

    tasks = {asyncio.create_task(user(u)) for u in range(users)}
    await _drain(tasks, max(0.0, end - time.monotonic()) + timeout_s + 1.0)


async def _timed_loop(
    sender: _Sender,
    jobs: Iterator[_Job],
    source: Source,
    duration_s: float,
    max_requests: int | None,
    timeout_s: float,
    stop: asyncio.Event,
    max_in_flight: int,
) -> None:
    """Scenario timing: each arrival at its `arrival_s`, each follow-up at its own.

    An arrival starts a chain: send, then, while the source answers with a
    follow-up (a closed-loop user's next request, a chat's next turn) due
    before the end, wait for it and send it. `max_requests` bounds the
    arrivals and follow-ups together.
    """
    counter = itertools.count()
    end = sender.t0 + duration_s
    budget = math.inf if max_requests is None else max_requests
    tasks: set[asyncio.Task[Any]] = set()

    async def until(at_s: float) -> float:
        """Sleep until `at_s` after the start (or the end, or `stop`); how late it woke."""
        target = sender.t0 + at_s
        while (left := min(target, end) - time.monotonic()) > 0 and not stop.is_set():
            await asyncio.sleep(min(left, 0.1))
        return max(0.0, time.monotonic() - target)

    async def chain(index: int, job: _Job, lag: float) -> None:
        nonlocal budget
        while True:
            follow = await _send_job(sender, index, job, source, lag)
            if follow is None or follow.arrival_s >= duration_s or budget <= 0:
                return
            lag = await until(follow.arrival_s)
            if stop.is_set() or time.monotonic() >= end:
                return
            budget -= 1
            index, job = next(counter), (wire_request(follow), follow)

    for job in jobs:
        sim = job[1]
        assert sim is not None
        if sim.arrival_s >= duration_s or budget <= 0:
            break
        lag = await until(sim.arrival_s)
        if stop.is_set() or time.monotonic() >= end:
            break
        budget -= 1
        index = next(counter)
        if sender.in_flight >= max_in_flight:
            sender.refused(index, job[0], sim.arrival_s, lag, sim.kind)
            source.follow_up(sim, time.monotonic() - sender.t0, False)  # its chat is dropped
            continue
        task = asyncio.create_task(chain(index, job, lag))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await _drain(tasks, max(0.0, end - time.monotonic()) + timeout_s + 1.0)


# --- command line ------------------------------------------------------------------------


class _Progress:
    """The progress line: elapsed time, requests answered, failures, req/s, hit rate so far.

    Results are counted as they arrive (O(1) each); `draw` writes one line,
    redrawn in place (carriage return) on a terminal, one line per call otherwise.
    """

    def __init__(self, out: TextIO, tty: bool) -> None:
        self.out = out
        self.tty = tty
        self.t0 = time.monotonic()
        self.done = self.failed = self.prompt = self.cached = 0

    def add(self, result: Result) -> None:
        self.done += 1
        if not result.ok:
            self.failed += 1
        elif result.prompt_tokens is not None and result.cached_tokens is not None:
            self.prompt += result.prompt_tokens
            self.cached += result.cached_tokens

    def draw(self, final: bool = False) -> None:
        elapsed = time.monotonic() - self.t0
        hit = _pct(self.cached / self.prompt if self.prompt else None)
        line = (
            f"bench {elapsed:6.1f} s  {self.done} done ({self.failed} failed),"
            f" {self.done / max(elapsed, 1e-9):.1f} req/s, hit rate {hit}"
        )
        if self.tty:
            self.out.write("\r\x1b[K" + line + ("\n" if final else ""))
        else:
            self.out.write(line + "\n")
        self.out.flush()


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `prefixroute bench`'s options to `parser`."""
    parser.add_argument(
        "--url",
        action="append",
        required=True,
        help="OpenAI base URL, e.g. http://127.0.0.1:8080 (repeat for several; see --spread)",
    )
    parser.add_argument(
        "--scenario",
        default="seed",
        help="a built-in scenario name, a scenario file (YAML/JSON), or a Mooncake trace "
        "(.jsonl or .jsonl.gz) (default: seed)",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        help="multiply a trace's timestamps by this (e.g. 0.1: ten times faster; default 1)",
    )
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--rate", type=float, help="open loop: arrivals per second, in the scenario's order"
    )
    load.add_argument(
        "--users",
        "--concurrency",
        dest="users",
        type=int,
        help="closed loop: concurrent users, each waiting for its answer",
    )
    parser.add_argument(
        "--process",
        choices=("poisson", "constant"),
        default="poisson",
        help="--rate arrivals: Poisson or evenly spaced (default poisson)",
    )
    parser.add_argument(
        "--think",
        type=float,
        nargs=2,
        default=(0.5, 2.0),
        metavar=("LOW", "HIGH"),
        help="--users: think time range in seconds (default 0.5 2.0)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument("--max-requests", type=int, help="stop after this many requests")
    parser.add_argument(
        "--spread",
        choices=SPREADS,
        default="round-robin",
        help="several URLs: round-robin per request, or sticky per session/tenant",
    )
    parser.add_argument("--no-stream", action="store_true", help="non-streaming requests")
    parser.add_argument("--seed", type=int, help="workload seed (default: the scenario's)")
    parser.add_argument("--model", help="model name (default: the first URL's first /v1/models)")
    parser.add_argument("--max-tokens", type=int, help="override every request's max_tokens")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout (s)")
    parser.add_argument("--json", metavar="PATH", help="write the summary as JSON ('-': stdout)")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress line on stderr, once a second (default: when stderr is a terminal)",
    )


class _BadInput(Exception):
    """A command-line input the run cannot start with (exit status 2)."""


async def _probe(client: aiohttp.ClientSession, url: str) -> None:
    """Check that `url` answers HTTP at all (any status): _BadInput if it does not."""
    try:
        async with client.get(url.rstrip("/") + "/v1/models", allow_redirects=False) as resp:
            await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _BadInput(f"cannot reach {url}: {_error_name(exc)} ({exc})") from exc


def _check(args: argparse.Namespace) -> None:
    """ValueError for an option out of range (or a --json file with no folder), before any URL
    is tried."""
    if args.rate is not None and not 0 < args.rate < math.inf:
        raise ValueError(f"--rate must be > 0, got {args.rate:g}")
    if args.users is not None and args.users < 1:
        raise ValueError(f"--users must be >= 1, got {args.users}")
    if not 0 < args.duration < math.inf:
        raise ValueError(f"--duration must be finite and > 0, got {args.duration:g}")
    if args.max_requests is not None and args.max_requests < 1:
        raise ValueError(f"--max-requests must be >= 1, got {args.max_requests}")
    if args.time_scale is not None and not 0 < args.time_scale < math.inf:
        raise ValueError(f"--time-scale must be finite and > 0, got {args.time_scale:g}")
    if args.json not in (None, "-") and not Path(args.json).resolve().parent.is_dir():
        raise ValueError(f"--json: no directory for {args.json}")


async def _bench(
    args: argparse.Namespace, progress: _Progress | None
) -> tuple[LoadReport, str, str]:
    """Probe the URLs, build the workload, run it; (report, a title line, the description)."""
    _check(args)
    timed = args.rate is None and args.users is None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as probe:
        for url in args.url:
            await _probe(probe, url)
        model = args.model or await discover_model(probe, args.url[0]) or MODEL
    try:
        workload = scenario_source(
            args.scenario,
            model=model,
            seed=args.seed,
            duration_s=args.duration,
            time_scale=args.time_scale,
            timed=timed,
        )
    except ValueError as exc:
        raise _BadInput(str(exc)) from exc
    if timed:
        how = "scenario timing"
    elif args.rate is not None:
        how = f"{args.rate:g} req/s open loop ({args.process})"
    else:
        how = f"{args.users} closed-loop users"
    title = f"{workload.name}: {how}, {args.duration:g} s, model {model}, {len(args.url)} URL(s)"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(
            signal.SIGINT, stop.set
        )  # SIGINT: finish what is in flight, then report
    run = asyncio.create_task(
        run_load(
            args.url,
            rate_rps=args.rate,
            users=args.users,
            duration_s=args.duration,
            max_requests=args.max_requests,
            stream=not args.no_stream,
            seed=0 if args.seed is None else args.seed,
            process=args.process,
            think_s=(args.think[0], args.think[1]),
            source=workload.source,
            model=model,
            max_tokens=args.max_tokens,
            timeout_s=args.timeout,
            spread=args.spread,
            on_result=None if progress is None else progress.add,
            stop=stop,
        )
    )
    try:
        while not run.done():
            await asyncio.wait({run}, timeout=1.0)
            if progress is not None:
                progress.draw(final=run.done())
        return run.result(), title, workload.description
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGINT)


def cli_main(args: argparse.Namespace) -> int:
    """Run the bench and print its report; 0 if every request succeeded, 1 otherwise, 2 for
    bad input (unknown scenario, unreadable file, unreachable URL, bad option)."""
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    progress = _Progress(sys.stderr, sys.stderr.isatty()) if show else None
    try:
        report, title, description = run_with_uvloop(_bench(args, progress))
    except (_BadInput, ValueError) as exc:
        print(f"prefixroute bench: {' '.join(str(exc).split())}", file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt:
        return 130
    print(title)
    for line in report.lines():
        print(line)
    if args.json:
        doc = {
            "run": title,
            "scenario": args.scenario,
            "description": description,
            "urls": args.url,
            **report.as_dict(),
        }
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            try:
                Path(args.json).write_text(text + "\n", encoding="utf-8")
            except OSError as exc:
                print(f"prefixroute bench: cannot write {args.json}: {exc}", file=sys.stderr)
                return 2
    return 0 if report.failures == 0 and report.ok > 0 else 1


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m prefixroute.devtools.bench")
    cli_arguments(_parser)
    sys.exit(cli_main(_parser.parse_args()))
