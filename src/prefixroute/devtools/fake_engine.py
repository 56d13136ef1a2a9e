"""`prefixroute fake-engine`: a stand-in vLLM server driven in real time by the simulator's engine.

One `FakeEngine` owns a `prefixroute.sim.engine.Engine` (paged KV pool,
automatic prefix caching, chunked-prefill scheduler) and an asyncio task that
steps it against the clock: `begin_step` gives the step's modelled duration,
the task sleeps until the step's deadline, `end_step` completes it, and the
streams whose requests produced tokens send them. Latency, batching, queueing,
cache hits and evictions are therefore those of the cost profile, while the
HTTP surface is a real server that gateways, routers and load generators can
talk to. See `docs/fake-engine.md`.

Wire formats reproduced (sources):

- OpenAI chat completions and completions, streamed as SSE `data:` chunks
  ending with `data: [DONE]`, the `stream_options.include_usage` usage chunk
  (`choices: []`), `usage.prompt_tokens_details.cached_tokens`: the OpenAI API
  reference and vLLM `vllm/entrypoints/openai/serving_chat.py`,
  `serving_completion.py`, `protocol.py`.
- `/metrics`: vLLM v1 Prometheus names and histogram buckets, `vllm/v1/metrics/loggers.py`
  (`vllm:num_requests_running`, `vllm:kv_cache_usage_perc`, `vllm:prefix_cache_*`, ...).
- `/model_info`, `/server_info` (and the `/get_*` aliases): the shape of sglang's
  `python/sglang/srt/entrypoints/http_server.py` answers, whose fields
  sglang-router reads at worker registration
  (`sgl-router/src/core/workflow/steps/worker_registration.rs`: `model_path`,
  `dp_size`, `max_total_tokens`, ...).

Tokens: chat messages are tokenised with `prefixroute.sim.tokenizer.encode_chat`
(content reduced to text by `prefixroute.openai.message_text`), completions
text with `encode`, token-id prompts used as given. The reply is
`max_tokens` lexicon words, one token each, chosen by a keyed hash of
(seed, prompt tokens), so it is deterministic; its token ids are handed to the
engine so the reply's blocks are cached as vLLM caches them, and a next chat
turn that resends the reply verbatim hits them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt
import uvicorn
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from prefixroute import __version__
from prefixroute.blocks import Blocker
from prefixroute.drivers.errors import error_response
from prefixroute.openai import message_text, parse_openai
from prefixroute.request import Request, RequestError
from prefixroute.sim.cost import PROFILES, CostModel, cost_profile
from prefixroute.sim.engine import Completion, Engine, EngineConfig, SeqHandle
from prefixroute.sim.tokenizer import (
    LEXICON_SIZE,
    encode,
    encode_chat,
    lexicon_text,
    lexicon_tokens,
    synthetic_tokens,
)
from prefixroute.sim.workload import SimRequest

__all__ = [
    "FakeEngine",
    "FakeEngineConfig",
    "cli_arguments",
    "cli_main",
    "create_app",
    "default_model_path",
]

_log = logging.getLogger(__name__)
TokenIds = npt.NDArray[np.uint32]

ENGINE_ID_HEADER = "x-fake-engine-id"
_SLACK_S = 0.002  # a step that wakes this late still starts at its deadline
_WORD_CHARS = 5  # every lexicon word is " " + four ASCII letters: one token
# vLLM v1 histogram buckets (vllm/v1/metrics/loggers.py)
_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


def _positive(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be an integer >= 1, got {value!r}")


def _check_time_scale(_: object, __: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"time_scale must be a number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"time_scale must be a finite number >= 0, got {value!r}")


def _check_profile(_: object, __: attrs.Attribute[str], value: str) -> None:
    if value not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {value!r}")


def _nonempty(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty string")


def default_model_path(model: str) -> str:
    """The default `model_path`: the local directory `<tmp>/prefixroute-fake-engine/<model>`.

    Created on demand with a small `config.json` (Qwen3's architecture), so it
    looks like a model directory; it holds no weights and no tokenizer. Its
    last component is the served model name ("/" becomes "--"), because
    sglang-router derives a worker's model id from the path's last component.
    Idempotent and shared by every fake engine of the same model. O(1).
    """
    path = Path(tempfile.gettempdir()) / "prefixroute-fake-engine" / model.replace("/", "--")
    config = path / "config.json"
    if not config.exists():
        path.mkdir(parents=True, exist_ok=True)
        doc = {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "_comment": "prefixroute fake-engine stand-in: no weights, no tokenizer",
        }
        tmp = path / f".config.{os.getpid()}.json"
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, config)
    return str(path)


@attrs.frozen(slots=True)
class FakeEngineConfig:
    """One fake engine: what it serves, its modelled hardware, its scheduler limits.

    `model` is the one model name served (others get 404, as vLLM answers);
    `profile` names a `prefixroute.sim.cost` profile; `kv_capacity_tokens`
    defaults to the profile's; `default_max_tokens` (16, the OpenAI
    completions default) is the reply length when the body gives neither
    `max_tokens` nor `max_completion_tokens`; `seed` keys the block hashes and
    the reply words; `time_scale` multiplies every step duration (1.0: real
    time; 0: as fast as possible, for overhead benchmarks); `model_path` is the
    local directory `/model_info` and `/server_info` report (default
    `default_model_path(model)`). Invalid values raise ValueError naming the field.
    """

    engine_id: str = attrs.field(default="fake-0", validator=_nonempty)
    model: str = attrs.field(default="qwen3-0.6b", validator=_nonempty)
    profile: str = attrs.field(default="qwen3-0.6b-h100", validator=_check_profile)
    kv_capacity_tokens: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive)
    )
    block_size: int = attrs.field(default=16, validator=_positive)
    max_num_seqs: int = attrs.field(default=1024, validator=_positive)
    max_num_batched_tokens: int = attrs.field(default=8192, validator=_positive)
    default_max_tokens: int = attrs.field(default=16, validator=_positive)
    seed: int = attrs.field(default=0)
    time_scale: float = attrs.field(default=1.0, validator=_check_time_scale)
    model_path: str | None = None

    def __attrs_post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be within [0, 2**64), got {self.seed}")
        if self.model_path is not None and not Path(self.model_path).is_absolute():
            raise ValueError(f"model_path must be an absolute local path, got {self.model_path!r}")
        self.engine_config()  # EngineConfig's own checks, with their field names

    @property
    def cost(self) -> CostModel:
        """The cost profile."""
        return cost_profile(self.profile)

    def engine_config(self) -> EngineConfig:
        """The simulator engine's shape."""
        kv = self.kv_capacity_tokens
        return EngineConfig(
            kv_capacity_tokens=self.cost.kv_capacity_tokens if kv is None else kv,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
        )


@attrs.frozen(slots=True)
class _Job:
    """One accepted request: its tokens, its reply and its handle in the engine."""

    handle: SeqHandle
    sim: SimRequest
    prompt_tokens: int
    output_tokens: int
    text: str  # the whole reply: output_tokens words of _WORD_CHARS characters


class _BadRequest(Exception):
    """A client error found while reading a body: answered with `response`."""

    def __init__(self, response: Response) -> None:
        super().__init__()
        self.response = response


class FakeEngine:
    """One modelled vLLM engine behind an HTTP app (see the module docstring).

    `start` (from the app's lifespan) runs the step loop; `stop` ends it. The
    request handlers call `submit`, then await `wait_done` (non-streamed) or
    iterate `tokens` (streamed). Everything runs on one event loop, so the
    engine needs no lock. Per step the loop does O(1) work plus O(1) per
    finished request and wakes each open stream once (one shared future).
    """

    def __init__(self, config: FakeEngineConfig) -> None:
        self.config = config
        self.cost = config.cost
        self.engine = Engine(config.engine_config(), self.cost)
        self.blocker = Blocker(block_size=config.block_size, seed=config.seed)
        self.model_path = config.model_path or default_model_path(config.model)
        self.started_at = int(time.time())
        self._ids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future[Completion]] = {}  # id(sim) -> non-streamed
        self._aborts: list[SeqHandle] = []
        self._wake: asyncio.Event | None = None
        self._tick: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("model_name", "engine")
        self._labels = (config.model, "0")
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            registry=self.registry,
            buckets=_TTFT_BUCKETS,
        ).labels(*self._labels)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            labels,
            registry=self.registry,
            buckets=_E2E_BUCKETS,
        ).labels(*self._labels)
        self.success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            (*labels, "finished_reason"),
            registry=self.registry,
        ).labels(*self._labels, "length")
        self.registry.register(_EngineCollector(self))

    # -- the step loop ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the step loop on the running event loop."""
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._tick = loop.create_future()
        self._task = asyncio.create_task(self._run(), name=f"fake-engine-{self.config.engine_id}")

    async def stop(self) -> None:
        """Stop the step loop; pending requests fail with 503 (their futures are cancelled)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for fut in self._waiters.values():
            fut.cancel()
        self._waiters.clear()
        if self._tick is not None:
            self._tick.cancel()

    @property
    def alive(self) -> bool:
        """Whether the step loop is running (`/health` answers 503 otherwise)."""
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        """The step loop (`_steps`); a crash is logged, and `/health` then fails."""
        try:
            await self._steps()
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.exception("fake engine %s: the step loop failed", self.config.engine_id)
            raise

    async def _steps(self) -> None:
        """Step while there is work; wait on `_wake` when idle.

        Deadline based: a step begun at `start` ends at `start + duration x
        time_scale`, and the next one begins at that deadline when the loop
        wakes within `_SLACK_S` of it (timer granularity: epoll rounds sleeps
        up to whole milliseconds, which would otherwise add up to 1 ms to
        every 4 ms step), else at the time it woke: a long stall delays the
        steps after it and is never caught up in a burst.
        """
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        engine = self.engine
        scale = self.config.time_scale
        wake = self._wake
        deadline = loop.time()
        while True:
            self._apply_aborts()
            if not engine.has_work():
                wake.clear()
                await wake.wait()
                deadline = loop.time()
                continue
            now = loop.time()
            start = deadline if now - deadline <= _SLACK_S else now
            dt = engine.begin_step(start)
            if dt is None:  # nothing schedulable (cannot happen for requests that fit)
                wake.clear()
                await wake.wait()
                continue
            deadline = start + dt * scale
            delay = deadline - loop.time()
            await asyncio.sleep(delay if delay > 0 else 0)
            now = loop.time()
            for done in engine.end_step(now):
                self._completed(done)
            tick, self._tick = self._tick, loop.create_future()
            assert tick is not None
            if not tick.done():
                tick.set_result(None)

    def _apply_aborts(self) -> None:
        """Aborts queued by disconnected streams: applied between steps, as the engine requires."""
        if self._aborts:
            for handle in self._aborts:
                self.engine.abort(handle)
            self._aborts.clear()

    def _completed(self, done: Completion) -> None:
        arrival = done.sim.arrival_s
        self.ttft.observe(max(0.0, done.first_token_s - arrival))
        self.e2e.observe(max(0.0, done.finished_s - arrival))
        self.success.inc()
        fut = self._waiters.pop(id(done.sim), None)
        if fut is not None and not fut.done():
            fut.set_result(done)

    # -- requests ----------------------------------------------------------------------

    def reply(self, prompt: TokenIds, n: int) -> tuple[str, TokenIds]:
        """The deterministic reply to `prompt`: `n` lexicon words (text, token ids). O(prompt + n).

        Word `j` is entry `j` of `synthetic_tokens(k, n)` modulo the lexicon
        size, where `k` is a 32-bit BLAKE2b of the prompt's ids keyed by the seed.
        """
        digest = hashlib.blake2b(
            np.ascontiguousarray(prompt, dtype=np.uint32).tobytes(),
            digest_size=4,
            key=self.config.seed.to_bytes(8, "little"),
        ).digest()
        words = synthetic_tokens(int.from_bytes(digest, "little"), n) % LEXICON_SIZE
        return lexicon_text(words), lexicon_tokens(words)

    async def submit(
        self, prompt: TokenIds, max_tokens: int, cache_salt: str | None, arrival_s: float
    ) -> _Job:
        """Queue a request in the engine (after the profile's frontend latency). O(prompt + output).

        The caller has checked `fits`. The engine's keys cover the prompt and
        the reply (vLLM caches the blocks of generated tokens too).
        """
        text, out_ids = self.reply(prompt, max_tokens)
        request = Request(model=self.config.model, token_ids=prompt, cache_salt=cache_salt)
        blocker = self.blocker
        tokens = np.concatenate((prompt, out_ids))
        keys = blocker.hash_tokens(tokens, blocker.namespace(request), self.config.block_size)
        sim = SimRequest(
            arrival_s=arrival_s,
            request=request,
            output_tokens=max_tokens,
            kind="live",
            output_token_ids=out_ids,
        )
        frontend = self.cost.frontend_latency_s * self.config.time_scale
        if frontend > 0:
            await asyncio.sleep(frontend)
        loop = asyncio.get_running_loop()
        handle = self.engine.add(sim, keys.tolist(), loop.time())
        if self._wake is not None:
            self._wake.set()
        return _Job(handle, sim, len(prompt), max_tokens, text)

    def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether prompt + reply fit in the KV pool at all (vLLM refuses such a request). O(1)."""
        cfg = self.engine.config
        return -(-(prompt_tokens + max_tokens) // cfg.block_size) <= cfg.num_blocks

    async def wait_done(self, job: _Job) -> Completion:
        """Wait until `job` finishes; its completion."""
        fut: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        self._waiters[id(job.sim)] = fut
        try:
            return await fut
        finally:
            if not fut.done():  # cancelled: the client went away
                self._waiters.pop(id(job.sim), None)
                self._aborts.append(job.handle)

    async def tokens(self, job: _Job) -> AsyncIterator[int]:
        """Yield the count of tokens generated so far each time it grows, until all are out.

        A stream that falls behind skips counts (it gets several tokens at
        once); a stream closed early aborts its request in the engine.
        """
        engine = self.engine
        handle = job.handle
        sent = 0
        try:
            while True:
                n = engine.emitted(handle)
                if n > sent:
                    sent = n
                    yield n
                if sent >= job.output_tokens or engine.finished(handle):
                    return
                tick = self._tick
                assert tick is not None
                # shielded: a cancelled stream must not cancel the tick every stream shares
                await asyncio.shield(tick)
        finally:
            if not engine.finished(handle):
                self._aborts.append(handle)
                if self._wake is not None:
                    self._wake.set()

    def cached_tokens(self, job: _Job) -> int:
        """`job`'s prefix-cache hit in tokens (0 before it was scheduled)."""
        cached = self.engine.cached_tokens(job.handle)
        return 0 if cached is None else cached

    def next_id(self, prefix: str) -> str:
        """A response id, unique in this engine: `prefix-<engine id>-<n>`."""
        return f"{prefix}-{self.config.engine_id}-{next(self._ids)}"


class _EngineCollector(Collector):
    """vLLM's gauges and token counters, read from the engine at scrape time (O(1))."""

    def __init__(self, fake: FakeEngine) -> None:
        self.fake = fake

    def describe(self) -> Iterable[Metric]:
        return list(self.collect())

    def collect(self) -> Iterable[Metric]:
        fake = self.fake
        engine = fake.engine
        stats = engine.stats
        names = ["model_name", "engine"]
        values = list(fake._labels)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, value)
            return c

        yield gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            engine.running,
        )
        yield gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            engine.waiting,
        )
        yield gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            engine.kv_usage,
        )
        cfg = engine.config
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=[
                "block_size",
                "cache_dtype",
                "enable_prefix_caching",
                "engine",
                "gpu_memory_utilization",
                "num_gpu_blocks",
                "prefix_caching_hash_algo",
            ],
        )
        info.add_metric(
            [str(cfg.block_size), "auto", "True", "0", "0.9", str(cfg.num_blocks), "sha256"], 1.0
        )
        yield info
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            stats.prefix_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            stats.prefix_hits,
        )
        yield counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens
        )
        yield counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            stats.generated_tokens,
        )
        yield counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            stats.preemptions,
        )


# -- HTTP ------------------------------------------------------------------------------


async def _read_json(request: HTTPRequest) -> dict[str, Any]:
    body = await request.body()
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _BadRequest(error_response(400, "request body is not valid JSON")) from None
    if not isinstance(doc, dict):
        raise _BadRequest(error_response(400, "request body must be a JSON object"))
    return doc


def _chat_tokens(body: Mapping[str, Any]) -> TokenIds:
    """`encode_chat` of a validated chat body: tools first, then messages as text."""
    messages: list[dict[str, str]] = []
    tools = body.get("tools")
    if tools:
        messages.append({"role": "tools", "content": _canonical(tools)})
    for i, message in enumerate(body["messages"]):
        text = message_text(message.get("content"), index=i)
        calls = message.get("tool_calls")
        if message["role"] == "assistant" and calls:
            text += _canonical(calls)
        messages.append({"role": message["role"], "content": text})
    return encode_chat(messages)


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


class _Handlers:
    """The HTTP endpoints of one fake engine."""

    def __init__(self, fake: FakeEngine) -> None:
        self.fake = fake
        self.headers = {ENGINE_ID_HEADER: fake.config.engine_id}

    async def chat(self, request: HTTPRequest) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._complete(request, chat=False)

    async def _complete(self, request: HTTPRequest, *, chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        arrival = loop.time()
        fake = self.fake
        try:
            body = await _read_json(request)
            parsed, prompt = self._parse(body, chat=chat)
        except _BadRequest as bad:
            bad.response.headers[ENGINE_ID_HEADER] = fake.config.engine_id
            return bad.response
        max_tokens = (
            fake.config.default_max_tokens if parsed.max_tokens is None else parsed.max_tokens
        )
        if max_tokens < 1:
            return self._error(400, "max_tokens must be at least 1, got 0.", param="max_tokens")
        if not fake.fits(len(prompt), max_tokens):
            cap = fake.engine.config.num_blocks * fake.engine.config.block_size
            return self._error(
                400,
                f"This model's KV cache holds {cap} tokens. However, you requested "
                f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} "
                "in the completion). Please reduce the length of the prompt or completion.",
                param="max_tokens",
            )
        job = await fake.submit(prompt, max_tokens, parsed.cache_salt, arrival)
        rid = fake.next_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        if parsed.stream:
            options = body.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            stream = _stream_chat if chat else _stream_completion
            return StreamingResponse(
                stream(fake, job, rid, created, usage),
                media_type="text/event-stream",
                headers=self.headers,
            )
        try:
            done = await fake.wait_done(job)
        except asyncio.CancelledError:
            if fake._task is None:  # the engine stopped under us
                return self._error(503, "the engine is shutting down")
            raise
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": job.text, "tool_calls": []}
        else:
            choice["text"] = job.text
        doc = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": fake.config.model,
            "choices": [choice],
            "usage": _usage(job, done.cached_tokens),
        }
        return JSONResponse(doc, headers=self.headers)

    def _parse(self, body: Mapping[str, Any], *, chat: bool) -> tuple[Request, TokenIds]:
        """Validate a body with the shared parser; the request and its prompt tokens."""
        wanted, other = ("messages", "prompt") if chat else ("prompt", "messages")
        if body.get(wanted) is None:
            what = "chat completions need" if chat else "completions need"
            raise _BadRequest(self._error(400, f"{what} `{wanted}`", param=wanted))
        if other in body:
            raise _BadRequest(
                self._error(400, f"`{other}` is not accepted on this endpoint", param=other)
            )
        try:
            parsed = parse_openai(
                body,
                {},
                tenant_header=None,
                session_header=None,
                priority_header=None,
                request_id_header=None,
                tenant_from_user=False,
            )
        except RequestError as e:
            raise _BadRequest(self._error(e.status, str(e), param=e.field)) from None
        if parsed.model != self.fake.config.model:
            raise _BadRequest(
                self._error(
                    404, f"The model `{parsed.model}` does not exist.", code="model_not_found"
                )
            )
        try:
            if chat:
                prompt = _chat_tokens(body)
            elif parsed.token_ids is not None:
                prompt = parsed.token_ids
            else:
                assert parsed.prompt is not None
                prompt = encode(parsed.prompt)
        except UnicodeEncodeError:  # a lone surrogate ("\ud800") that JSON let through
            raise _BadRequest(
                self._error(400, "the prompt is not valid Unicode text", param=wanted)
            ) from None
        if len(prompt) == 0:
            raise _BadRequest(self._error(400, "the prompt is empty", param="prompt"))
        return parsed, prompt

    def _error(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> Response:
        return error_response(status, message, param=param, code=code, headers=self.headers)

    # -- informational endpoints ----------------------------------------------------------

    async def health(self, request: HTTPRequest) -> Response:
        return Response(status_code=200 if self.fake.alive else 503)

    async def version(self, request: HTTPRequest) -> Response:
        return JSONResponse({"version": f"prefixroute-fake-engine {__version__}"})

    async def models(self, request: HTTPRequest) -> Response:
        fake = self.fake
        cfg = fake.engine.config
        card = {
            "id": fake.config.model,
            "object": "model",
            "created": fake.started_at,
            "owned_by": "prefixroute-fake-engine",
            "root": fake.model_path,
            "parent": None,
            "max_model_len": cfg.num_blocks * cfg.block_size,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def metrics(self, request: HTTPRequest) -> Response:
        return Response(generate_latest(self.fake.registry), media_type=CONTENT_TYPE_LATEST)

    async def model_info(self, request: HTTPRequest) -> Response:
        fake = self.fake
        return JSONResponse(
            {
                "model_path": fake.model_path,
                "tokenizer_path": fake.model_path,
                "served_model_name": fake.config.model,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": "default",
                "has_chat_template": True,
                "model_type": "qwen3",
                "architectures": ["Qwen3ForCausalLM"],
            }
        )

    async def server_info(self, request: HTTPRequest) -> Response:
        fake = self.fake
        cfg = fake.config
        ecfg = fake.engine.config
        total = ecfg.num_blocks * ecfg.block_size
        return JSONResponse(
            {
                "model_path": fake.model_path,
                "tokenizer_path": fake.model_path,
                "served_model_name": cfg.model,
                "engine_id": cfg.engine_id,
                "profile": cfg.profile,
                "page_size": ecfg.block_size,
                "max_running_requests": ecfg.max_num_seqs,
                "max_total_tokens": total,
                "max_prefill_tokens": ecfg.max_num_batched_tokens,
                "chunked_prefill_size": ecfg.max_num_batched_tokens,
                "context_length": total,
                "dp_size": 1,
                "tp_size": 1,
                "random_seed": cfg.seed,
                "disable_radix_cache": False,
                "time_scale": cfg.time_scale,
                "version": f"prefixroute-fake-engine {__version__}",
                "internal_states": [
                    {
                        "max_total_num_tokens": total,
                        "max_req_input_len": total - 1,
                        "num_running_reqs": fake.engine.running,
                        "num_waiting_reqs": fake.engine.waiting,
                        "token_usage": fake.engine.kv_usage,
                    }
                ],
            }
        )

    async def get_load(self, request: HTTPRequest) -> Response:
        """sglang's `/get_load`: per data-parallel rank, its requests and tokens in use."""
        engine = self.fake.engine
        cfg = engine.config
        used = round(engine.kv_usage * cfg.num_blocks) * cfg.block_size
        return JSONResponse(
            [
                {
                    "dp_rank": 0,
                    "num_reqs": engine.running + engine.waiting,
                    "num_waiting_reqs": engine.waiting,
                    "num_tokens": used,
                }
            ]
        )

    async def flush_cache(self, request: HTTPRequest) -> Response:
        """sglang's `/flush_cache` and vLLM's `/reset_prefix_cache`: forget the prefix cache.

        Refused with 400 while requests are queued or running, as both servers refuse.
        """
        if self.fake.engine.reset_prefix_cache():
            return Response("Cache flushed.\n", status_code=200)
        return Response("Cache not flushed: requests are queued or running.\n", status_code=400)


def _usage(job: _Job, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": job.output_tokens,
        "total_tokens": job.prompt_tokens + job.output_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _chunk_head(fake: FakeEngine, rid: str, created: int, kind: str) -> str:
    return (
        f'data: {{"id":{json.dumps(rid)},"object":"{kind}","created":{created},'
        f'"model":{json.dumps(fake.config.model)},"choices":'
    )


async def _stream_chat(
    fake: FakeEngine, job: _Job, rid: str, created: int, include_usage: bool
) -> AsyncIterator[str]:
    """SSE chunks of a chat completion, as vLLM sends them: a role chunk with the first
    token, then one chunk per token (the last carries finish_reason), then the usage chunk
    when asked, then `[DONE]`."""
    head = _chunk_head(fake, rid, created, "chat.completion.chunk")
    role = (
        f'{head}[{{"index":0,"delta":{{"role":"assistant","content":""}},'
        '"logprobs":null,"finish_reason":null}]}\n\n'
    )
    sent = 0
    text = job.text
    last = job.output_tokens
    async for n in fake.tokens(job):
        parts = [role] if sent == 0 else []
        for j in range(sent, n):
            word = text[j * _WORD_CHARS : (j + 1) * _WORD_CHARS]
            reason = '"length"' if j + 1 == last else "null"
            parts.append(
                f'{head}[{{"index":0,"delta":{{"content":"{word}"}},"logprobs":null,'
                f'"finish_reason":{reason}}}]}}\n\n'
            )
        sent = n
        yield "".join(parts)
    yield _tail(head, job, fake, include_usage)


async def _stream_completion(
    fake: FakeEngine, job: _Job, rid: str, created: int, include_usage: bool
) -> AsyncIterator[str]:
    """SSE chunks of a completion: one per token (the last carries finish_reason)."""
    head = _chunk_head(fake, rid, created, "text_completion")
    sent = 0
    text = job.text
    last = job.output_tokens
    async for n in fake.tokens(job):
        parts = []
        for j in range(sent, n):
            word = text[j * _WORD_CHARS : (j + 1) * _WORD_CHARS]
            reason = '"length"' if j + 1 == last else "null"
            parts.append(
                f'{head}[{{"index":0,"text":"{word}","logprobs":null,'
                f'"finish_reason":{reason},"stop_reason":null}}]}}\n\n'
            )
        sent = n
        yield "".join(parts)
    yield _tail(head, job, fake, include_usage)


def _tail(head: str, job: _Job, fake: FakeEngine, include_usage: bool) -> str:
    if not include_usage:
        return "data: [DONE]\n\n"
    usage = json.dumps(_usage(job, fake.cached_tokens(job)), separators=(",", ":"))
    return f'{head}[],"usage":{usage}}}\n\ndata: [DONE]\n\n'


def create_app(config: FakeEngineConfig) -> Starlette:
    """The fake engine's Starlette app; its lifespan runs the step loop.

    `app.state.fake_engine` is the `FakeEngine` (for tests and in-process drivers).
    """
    fake = FakeEngine(config)
    h = _Handlers(fake)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await fake.start()
        try:
            yield
        finally:
            await fake.stop()

    routes = [
        Route("/v1/chat/completions", h.chat, methods=["POST"]),
        Route("/v1/completions", h.completions, methods=["POST"]),
        Route("/v1/models", h.models, methods=["GET"]),
        Route("/health", h.health, methods=["GET"]),
        Route("/version", h.version, methods=["GET"]),
        Route("/metrics", h.metrics, methods=["GET"]),
        Route("/model_info", h.model_info, methods=["GET"]),
        Route("/get_model_info", h.model_info, methods=["GET"]),
        Route("/server_info", h.server_info, methods=["GET"]),
        Route("/get_server_info", h.server_info, methods=["GET"]),
        Route("/get_load", h.get_load, methods=["GET"]),
        Route("/flush_cache", h.flush_cache, methods=["GET", "POST"]),
        Route("/reset_prefix_cache", h.flush_cache, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.fake_engine = fake
    return app


# -- CLI --------------------------------------------------------------------------------


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `prefixroute fake-engine`'s options to `parser`."""
    d = FakeEngineConfig()
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="first port (8000)")
    parser.add_argument(
        "--engines", type=int, default=1, help="engines on consecutive ports, one process (1)"
    )
    parser.add_argument(
        "--profile", default=d.profile, help=f"cost profile: {', '.join(PROFILES)} ({d.profile})"
    )
    parser.add_argument("--model", default=d.model, help=f"served model name ({d.model})")
    parser.add_argument("--model-path", default=None, help="local directory reported as model_path")
    parser.add_argument(
        "--kv-tokens", type=int, default=None, help="KV pool size in tokens (the profile's)"
    )
    parser.add_argument("--block-size", type=int, default=d.block_size, help="KV block size (16)")
    parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="(1024)")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens, help="(8192)"
    )
    parser.add_argument("--seed", type=int, default=0, help="engine i uses seed + i (0)")
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="step-time multiplier; 0 = no waiting (1.0)"
    )
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=d.default_max_tokens,
        help="reply length when a body gives no max_tokens (16)",
    )
    parser.add_argument(
        "--log-level", default="warning", help="uvicorn log level (warning; info logs requests)"
    )


def configs_from_args(args: argparse.Namespace) -> list[tuple[int, FakeEngineConfig]]:
    """(port, config) per engine; ValueError naming the bad option."""
    if args.engines < 1:
        raise ValueError(f"--engines must be >= 1, got {args.engines}")
    if args.port < 1 or args.port + args.engines - 1 > 65535:
        raise ValueError(f"--port must leave room for {args.engines} ports below 65536")
    out = []
    for i in range(args.engines):
        port = args.port + i
        out.append(
            (
                port,
                FakeEngineConfig(
                    engine_id=f"fake-{port}",
                    model=args.model,
                    profile=args.profile,
                    kv_capacity_tokens=args.kv_tokens,
                    block_size=args.block_size,
                    max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens,
                    default_max_tokens=args.default_max_tokens,
                    seed=args.seed + i,
                    time_scale=args.time_scale,
                    model_path=args.model_path,
                ),
            )
        )
    return out


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to `cli_main` (several share one loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listening_socket(host: str) -> socket.socket:
    """An unbound TCP socket for `host`, ready for uvicorn's `serve(sockets=...)`.

    Its proto is IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted
    connections only when the listener's proto says TCP, and without it Nagle's
    algorithm and the client's delayed ACK add ~40 ms to every response written
    in two pieces on a kept-alive connection.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def cli_main(args: argparse.Namespace) -> int:
    """Run the engines until SIGINT or SIGTERM; 2 for bad options, 1 if a port is taken."""
    try:
        configs = configs_from_args(args)
    except ValueError as e:
        print(f"prefixroute fake-engine: {e}", file=sys.stderr)
        return 2
    sockets: list[socket.socket] = []
    try:
        for port, _ in configs:
            sock = listening_socket(args.host)
            sockets.append(sock)
            sock.bind((args.host, port))
    except OSError as e:
        for s in sockets:
            s.close()
        print(f"prefixroute fake-engine: cannot bind {args.host}:{port}: {e}", file=sys.stderr)
        return 1
    servers = [
        _Server(
            uvicorn.Config(
                create_app(cfg),
                host=args.host,
                port=port,
                log_level=args.log_level,
                lifespan="on",
                timeout_graceful_shutdown=5,
            )
        )
        for port, cfg in configs
    ]

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def stop() -> None:
            for server in servers:
                if server.should_exit:
                    server.force_exit = True
                server.should_exit = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        urls = ", ".join(f"http://{args.host}:{port}" for port, _ in configs)
        print(f"prefixroute fake-engine: serving {args.model} on {urls}", file=sys.stderr)
        await asyncio.gather(*(s.serve(sockets=[k]) for s, k in zip(servers, sockets, strict=True)))

    try:
        asyncio.run(main())
    finally:
        for s in sockets:
            s.close()
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(
        prog="prefixroute fake-engine", description=__doc__.split("\n", 1)[0]
    )
    cli_arguments(_parser)
    sys.exit(cli_main(_parser.parse_args()))
