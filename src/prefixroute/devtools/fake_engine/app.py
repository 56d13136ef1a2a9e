"""`create_app`: a fake engine's HTTP surface, a Starlette app whose lifespan runs the step loop.

Wire formats reproduced (sources):

- OpenAI chat completions and completions (`usage.prompt_tokens_details.cached_tokens`
  included): the OpenAI API reference and vLLM
  `vllm/entrypoints/openai/serving_chat.py`, `serving_completion.py`,
  `protocol.py`; streamed replies are `streaming.py`'s.
- `/metrics`: vLLM v1's Prometheus names (`metrics.py`).
- `/model_info`, `/server_info` (and the `/get_*` aliases): the shape of sglang's
  `python/sglang/srt/entrypoints/http_server.py` answers, whose fields
  sglang-router reads at worker registration
  (`sgl-router/src/core/workflow/steps/worker_registration.rs`: `model_path`,
  `dp_size`, `max_total_tokens`, ...).

Bodies are validated by the shared parser `prefixroute.openai.parse_openai`;
a bad one is an OpenAI error object, never a traceback. Prompt tokens: chat
messages are tokenised with `prefixroute.sim.tokenizer.encode_chat` (content
reduced to text by `prefixroute.openai.message_text`), completions text with
`encode`, token-id prompts used as given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from prefixroute import __version__
from prefixroute.devtools.fake_engine.config import FakeEngineConfig
from prefixroute.devtools.fake_engine.engine import FakeEngine, TokenIds
from prefixroute.devtools.fake_engine.streaming import (
    CHAT_CHUNKS,
    COMPLETION_CHUNKS,
    stream,
    usage_body,
)
from prefixroute.drivers.gateway.responses import error_response
from prefixroute.openai import message_text, parse_openai
from prefixroute.request import Request, RequestError
from prefixroute.sim.tokenizer import encode, encode_chat

__all__ = ["ENGINE_ID_HEADER", "create_app"]

ENGINE_ID_HEADER = "x-fake-engine-id"


class _BadRequest(Exception):
    """A client error found while reading a body: answered with `response`."""

    def __init__(self, response: Response) -> None:
        super().__init__()
        self.response = response


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
            shape = CHAT_CHUNKS if chat else COMPLETION_CHUNKS
            return StreamingResponse(
                stream(fake, job, shape, rid, created, usage),
                media_type="text/event-stream",
                headers=self.headers,
            )
        try:
            done = await fake.wait_done(job)
        except asyncio.CancelledError:
            if fake.stopped:  # the engine stopped under us
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
            "usage": usage_body(job, done.cached_tokens),
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
        metrics = self.fake.metrics
        return Response(metrics.exposition(), media_type=metrics.media_type)

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
    app.router.redirect_slashes = False  # no 307 to a Host-header URL: a trailing slash is a 404
    app.state.fake_engine = fake
    return app
