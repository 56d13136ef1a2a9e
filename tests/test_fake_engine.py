"""The fake engine over real HTTP on loopback: OpenAI formats, prefix caching, metrics, errors."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from prefixroute.devtools.fake_engine import (
    ENGINE_ID_HEADER,
    FakeEngine,
    FakeEngineConfig,
    create_app,
)
from prefixroute.devtools.fake_engine.engine import Job
from prefixroute.devtools.fake_engine.streaming import (
    CHAT_CHUNKS,
    COMPLETION_CHUNKS,
    ChunkShape,
    stream,
)
from prefixroute.sim.engine import Engine, EngineConfig
from prefixroute.sim.tokenizer import encode
from tests.servers import free_port_block, run_process, serve_in_thread

MODEL = "qwen3-0.6b"
SYSTEM = "You are a financial analyst assistant specializing in market data. " * 5


def chat_body(question: str = "Summarize the key points.", **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
        ],
        "max_tokens": 8,
        **extra,
    }


@pytest.fixture(scope="module")
def fast() -> Iterator[str]:
    """A fake engine running as fast as possible (time_scale 0)."""
    with serve_in_thread(create_app(FakeEngineConfig(engine_id="fast", time_scale=0))) as url:
        yield url


def post(url: str, path: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=10, **kw)


def sse(response_text: str) -> list[Any]:
    """The decoded `data:` events of an SSE body; "[DONE]" kept as a string."""
    events: list[Any] = []
    for block in response_text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_chat_completion_has_openai_shape_and_usage(fast: str) -> None:
    r = post(fast, "/v1/chat/completions", chat_body("What is new today?"))
    assert r.status_code == 200
    assert r.headers[ENGINE_ID_HEADER] == "fast"
    doc = r.json()
    assert doc["object"] == "chat.completion" and doc["model"] == MODEL
    choice = doc["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 8
    usage = doc["usage"]
    assert usage["completion_tokens"] == 8
    assert usage["prompt_tokens"] > 60
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0


def test_repeated_prompt_hits_the_prefix_cache_and_salt_isolates(fast: str) -> None:
    body = chat_body()
    body["messages"][0]["content"] = "A system prompt seen by no other test. " * 8
    first = post(fast, "/v1/chat/completions", body).json()["usage"]
    again = post(fast, "/v1/chat/completions", body).json()["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    cached = again["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < again["prompt_tokens"]
    assert cached % 16 == 0
    assert cached == (again["prompt_tokens"] - 1) // 16 * 16  # all full blocks but the last token
    salted = post(fast, "/v1/chat/completions", {**body, "cache_salt": "s1"})
    assert salted.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    salted = post(fast, "/v1/chat/completions", {**body, "cache_salt": "s1"})
    assert salted.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == cached


def test_next_chat_turn_resending_the_reply_hits_the_reply_blocks(fast: str) -> None:
    body = chat_body("A conversation starts here.", max_tokens=40)
    doc = post(fast, "/v1/chat/completions", body).json()
    prompt_tokens = doc["usage"]["prompt_tokens"]
    reply = doc["choices"][0]["message"]["content"]
    turn2 = chat_body("A conversation starts here.")
    turn2["messages"] += [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "Go on."},
    ]
    cached = post(fast, "/v1/chat/completions", turn2).json()["usage"]["prompt_tokens_details"]
    # the prompt and the reply's full blocks (its last token's KV is never computed)
    assert cached["cached_tokens"] == (prompt_tokens + 40 - 1) // 16 * 16


def test_completions_text_and_token_prompts(fast: str) -> None:
    text = post(fast, "/v1/completions", {"model": MODEL, "prompt": "Once upon a time"}).json()
    assert text["object"] == "text_completion"
    assert text["usage"]["completion_tokens"] == 16  # default_max_tokens
    assert len(text["choices"][0]["text"].split()) == 16
    ids = list(range(100, 140))
    doc = post(fast, "/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 2}).json()
    assert doc["usage"]["prompt_tokens"] == 40
    doc = post(fast, "/v1/completions", {"model": MODEL, "prompt": [ids], "max_tokens": 2}).json()
    assert doc["usage"]["prompt_tokens_details"]["cached_tokens"] == 32


def test_streaming_chat_sends_one_chunk_per_token(fast: str) -> None:
    r = post(fast, "/v1/chat/completions", chat_body("Stream it.", max_tokens=12, stream=True))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers[ENGINE_ID_HEADER] == "fast"
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content) == 12
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert not any("usage" in c for c in chunks)
    # the streamed text equals the non-streamed reply to the same prompt
    whole = post(fast, "/v1/chat/completions", chat_body("Stream it.", max_tokens=12)).json()
    text = "".join(c["choices"][0]["delta"]["content"] for c in content)
    assert text == whole["choices"][0]["message"]["content"]


class _StubEngine:
    """What `stream` reads from a `FakeEngine`: the model, token counts as they grow, the hit."""

    def __init__(self, counts: list[int]) -> None:
        self.config = FakeEngineConfig(model='org/"quoted"')
        self.counts = counts

    async def tokens(self, job: Job) -> AsyncIterator[int]:
        for n in self.counts:
            yield n

    def cached_tokens(self, job: Job) -> int:
        return 32


@pytest.mark.parametrize("shape", [CHAT_CHUNKS, COMPLETION_CHUNKS], ids=["chat", "completion"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_one_streamer_spells_both_shapes_and_batches_late_tokens(
    shape: ChunkShape, include_usage: bool
) -> None:
    """Tokens that arrive together go out in one write, still one chunk per token."""
    words = [" abcd", " efgh", " ijkl", " mnop", " qrst"]
    job = Job(handle=None, sim=None, prompt_tokens=40, output_tokens=5, text="".join(words))  # type: ignore[arg-type]
    fake = _StubEngine([2, 3, 5])  # a stream that fell behind: 2 tokens, then 1, then 2

    async def collect() -> list[str]:
        writes = stream(fake, job, shape, "rid-1", 7, include_usage)  # type: ignore[arg-type]
        return [w async for w in writes]

    writes = asyncio.run(collect())
    chat = shape is CHAT_CHUNKS
    per_write = [len(sse(w)) for w in writes[:3]]
    assert per_write == ([3, 1, 2] if chat else [2, 1, 2])  # chat's role chunk rides with token 1
    events = sse("".join(writes))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    if include_usage:
        usage = chunks.pop()
        assert usage["choices"] == [] and usage["usage"] == {
            "prompt_tokens": 40,
            "completion_tokens": 5,
            "total_tokens": 45,
            "prompt_tokens_details": {"cached_tokens": 32},
        }
    assert all(c["id"] == "rid-1" and c["created"] == 7 for c in chunks)
    assert all(c["model"] == 'org/"quoted"' and c["object"] == shape.kind for c in chunks)
    choices = [c["choices"][0] for c in chunks]
    if chat:
        assert choices.pop(0)["delta"] == {"role": "assistant", "content": ""}
        assert [c["delta"]["content"] for c in choices] == words
    else:
        assert [c["text"] for c in choices] == words
        assert all(c["stop_reason"] is None for c in choices)
    assert [c["finish_reason"] for c in choices] == [None] * 4 + ["length"]


def test_streaming_usage_chunk_only_with_include_usage(fast: str) -> None:
    body = chat_body("Usage please.", stream=True, stream_options={"include_usage": True})
    events = sse(post(fast, "/v1/chat/completions", body).text)
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 8
    assert "cached_tokens" in last["usage"]["prompt_tokens_details"]
    assert sum("usage" in e for e in events[:-1]) == 1
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 5, "stream": True}
    events = sse(post(fast, "/v1/completions", body).text)
    assert [e["choices"][0]["text"] != "" for e in events[:-1]] == [True] * 5
    assert events[-1] == "[DONE]"
    body["stream_options"] = {"include_usage": True}
    events = sse(post(fast, "/v1/completions", body).text)
    assert events[-2]["choices"] == [] and events[-2]["usage"]["prompt_tokens"] > 0


def test_metrics_expose_vllm_names(fast: str) -> None:
    body = chat_body("Metrics warm-up.")
    post(fast, "/v1/chat/completions", body)
    post(fast, "/v1/chat/completions", body)
    r = httpx.get(fast + "/metrics", timeout=10)
    assert r.status_code == 200
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)

    def value(name: str) -> float:
        (sample,) = samples[name]
        return float(sample.value)

    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert value(name) >= 0
        assert samples[name][0].labels == {"model_name": MODEL, "engine": "0"}
    assert 0 <= value("vllm:kv_cache_usage_perc") <= 1
    (info,) = samples["vllm:cache_config_info"]
    assert info.value == 1 and info.labels["block_size"] == "16"
    assert int(info.labels["num_gpu_blocks"]) > 0
    assert value("vllm:prefix_cache_hits_total") > 0
    assert value("vllm:prefix_cache_queries_total") > value("vllm:prefix_cache_hits_total")
    assert value("vllm:prompt_tokens_total") == value("vllm:prefix_cache_queries_total")
    assert value("vllm:generation_tokens_total") >= 16
    assert value("vllm:num_preemptions_total") == 0
    (ok,) = samples["vllm:request_success_total"]
    assert ok.labels["finished_reason"] == "length" and ok.value >= 2
    assert value("vllm:time_to_first_token_seconds_count") >= 2
    assert value("vllm:e2e_request_latency_seconds_count") >= 2


def test_model_and_server_info_carry_a_local_path(fast: str) -> None:
    for path in ("/model_info", "/get_model_info", "/server_info", "/get_server_info"):
        doc = httpx.get(fast + path, timeout=10).json()
        assert Path(doc["model_path"]).is_absolute()
        assert Path(doc["model_path"]).is_dir()
        assert Path(doc["model_path"]).name == MODEL
    info = httpx.get(fast + "/server_info", timeout=10).json()
    assert info["dp_size"] == 1 and info["max_total_tokens"] > 0
    models = httpx.get(fast + "/v1/models", timeout=10).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    health = httpx.get(fast + "/health", timeout=10)
    assert health.status_code == 200 and health.content == b""
    assert "version" in httpx.get(fast + "/version", timeout=10).json()
    load = httpx.get(fast + "/get_load", timeout=10).json()
    assert load[0]["num_reqs"] >= 0


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "x"}]


def body(**fields: Any) -> str:
    return json.dumps(fields)


@pytest.mark.parametrize(
    ("path", "content", "status", "param"),
    [
        (CHAT, b'{"model": "qwen3-0.6b", ', 400, None),
        (CHAT, b"[1, 2]", 400, None),
        (CHAT, b"\xff\xfe", 400, None),
        (CHAT, body(messages=USER), 400, "model"),
        (CHAT, body(model="", messages=USER), 400, "model"),
        (CHAT, body(model=MODEL), 400, "messages"),
        (CHAT, body(model=MODEL, messages=[]), 400, "messages"),
        (CHAT, body(model=MODEL, prompt="x"), 400, "messages"),
        (CHAT, body(model=MODEL, messages=USER, cache_salt=""), 400, "cache_salt"),
        (COMPLETIONS, body(model=MODEL), 400, "prompt"),
        (COMPLETIONS, body(model=MODEL, prompt=""), 400, "prompt"),
        (COMPLETIONS, body(model=MODEL, prompt="x", max_tokens=-1), 400, "max_tokens"),
        (COMPLETIONS, body(model=MODEL, prompt="x", max_tokens="9"), 400, "max_tokens"),
        (COMPLETIONS, body(model=MODEL, prompt="x", max_tokens=0), 400, "max_tokens"),
        (COMPLETIONS, body(model=MODEL, prompt="x", max_tokens=10**9), 400, "max_tokens"),
        (COMPLETIONS, body(model="Qwen/Qwen3-0.6B", prompt="x"), 404, None),
    ],
)
def test_errors_are_openai_bodies(
    fast: str, path: str, content: bytes | str, status: int, param: str | None
) -> None:
    r = httpx.post(
        fast + path, content=content, headers={"content-type": "application/json"}, timeout=10
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    assert error["param"] == param
    if status == 404:
        assert error["code"] == "model_not_found"
        assert error["message"] == "The model `Qwen/Qwen3-0.6B` does not exist."


def test_same_seed_same_requests_give_same_replies() -> None:
    def run() -> list[tuple[str, int]]:
        out = []
        config = FakeEngineConfig(engine_id="det", seed=7, time_scale=0)
        with serve_in_thread(create_app(config)) as url:
            for question in ("one", "two", "one", "three", "two"):
                doc = post(url, "/v1/chat/completions", chat_body(question)).json()
                out.append(
                    (
                        doc["choices"][0]["message"]["content"],
                        doc["usage"]["prompt_tokens_details"]["cached_tokens"],
                    )
                )
        return out

    first = run()
    assert first == run()
    assert first[0][0] == first[2][0] and first[0][0] != first[1][0]


def test_reply_is_keyed_by_seed_and_prompt_and_tokenises_back() -> None:
    prompt = np.arange(40, 80, dtype=np.uint32)
    a = FakeEngine(FakeEngineConfig(seed=7))
    text, ids = a.reply(prompt, 6)
    assert len(text.split()) == 6 and encode(text).tolist() == ids.tolist()
    assert a.reply(prompt, 6)[0] == text
    assert FakeEngine(FakeEngineConfig(seed=8)).reply(prompt, 6)[0] != text
    assert a.reply(prompt[1:], 6)[0] != text


def test_first_token_streams_before_the_last() -> None:
    """In real time (time_scale 1), 60 tokens take about 60 steps of about 4 ms each."""
    config = FakeEngineConfig(engine_id="rt", time_scale=1.0)
    with serve_in_thread(create_app(config)) as url:
        body = chat_body("Take your time.", max_tokens=60, stream=True)
        arrivals: list[float] = []
        start = time.monotonic()
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=10) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content":" ' in line:
                    arrivals.append(time.monotonic() - start)
        assert len(arrivals) == 60
        assert arrivals[-1] - arrivals[0] > 0.1
        assert arrivals[0] < arrivals[-1] / 2


def test_multi_engine_process_answers_on_every_port() -> None:
    port = free_port_block(2)
    second = port + 1
    args = ["-m", "prefixroute.devtools.fake_engine", "--port", str(port), "--engines", "2"]
    args += ["--time-scale", "0"]
    with run_process(args, ready_url=f"http://127.0.0.1:{second}/health"):
        ids = set()
        texts = []
        for p in (port, second):
            r = post(f"http://127.0.0.1:{p}", "/v1/chat/completions", chat_body())
            assert r.status_code == 200
            ids.add(r.headers[ENGINE_ID_HEADER])
            texts.append(r.json()["choices"][0]["message"]["content"])
        assert ids == {f"fake-{port}", f"fake-{second}"}
        assert texts[0] != texts[1]  # seeds seed + i


def test_bad_cli_options_exit_2() -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "prefixroute.devtools.fake_engine", "--engines", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "--engines" in proc.stderr and "Traceback" not in proc.stderr


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="time_scale"):
        FakeEngineConfig(time_scale=-1)
    with pytest.raises(ValueError, match="profile"):
        FakeEngineConfig(profile="nope")
    with pytest.raises(ValueError, match="model_path"):
        FakeEngineConfig(model_path="Qwen/Qwen3-0.6B")
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        FakeEngineConfig(max_num_batched_tokens=8, max_num_seqs=16)


def test_engine_follow_and_abort_api() -> None:
    """`Engine.emitted` counts a decoding request's tokens step by step; `abort` frees it."""
    from prefixroute.request import Request
    from prefixroute.sim.cost import cost_profile
    from prefixroute.sim.source import SimRequest

    engine = Engine(
        EngineConfig(kv_capacity_tokens=4096, max_num_batched_tokens=64, max_num_seqs=8),
        cost_profile("qwen3-0.6b-h100"),
    )

    def sim(n: int, out: int) -> SimRequest:
        return SimRequest(0.0, Request(model="m", token_ids=list(range(1, n + 1))), out, "t")

    a = engine.add(sim(100, 5), [], 0.0)
    b = engine.add(sim(20, 3), [], 0.0)
    assert engine.emitted(a) == 0 and engine.first_token_s(a) is None
    assert engine.cached_tokens(a) is None
    t = 0.0
    seen = []
    while not engine.finished(a):
        dt = engine.begin_step(t)
        assert dt is not None
        t += dt
        engine.end_step(t)
        seen.append(engine.emitted(a))
        engine.check_invariants()
        if engine.emitted(b) == 1 and not engine.finished(b):
            assert engine.abort(b)
            assert engine.finished(b)
            engine.check_invariants()
    assert seen == sorted(seen) and seen[-1] == 5 and seen.count(0) == 1  # chunked prefill
    assert engine.first_token_s(a) is not None and engine.cached_tokens(a) == 0
    assert not engine.abort(a)
    assert engine.finished(b) and engine.emitted(b) == 1  # aborted after its first token
    assert engine.running == 0 and engine.kv_usage == 0


def test_flush_cache_forgets_the_prefix_cache() -> None:
    with serve_in_thread(create_app(FakeEngineConfig(engine_id="flush", time_scale=0))) as url:
        post(url, "/v1/chat/completions", chat_body())
        hit = post(url, "/v1/chat/completions", chat_body()).json()["usage"]
        assert hit["prompt_tokens_details"]["cached_tokens"] > 0
        assert httpx.post(url + "/flush_cache", timeout=10).status_code == 200
        cold = post(url, "/v1/chat/completions", chat_body()).json()["usage"]
        assert cold["prompt_tokens_details"]["cached_tokens"] == 0
        assert httpx.post(url + "/reset_prefix_cache", timeout=10).status_code == 200


def test_a_stream_cut_mid_way_does_not_stop_the_engine() -> None:
    """A disconnected stream is aborted; later and concurrent requests still complete."""
    fake_config = FakeEngineConfig(engine_id="cut", time_scale=0.2)
    app = create_app(fake_config)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        body = {
            "model": "qwen3-0.6b",
            "max_tokens": 200,
            "stream": True,
            "messages": [{"role": "user", "content": "cut me off"}],
        }
        for _ in range(3):
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()
                for _ in range(4):
                    next(lines)
            # leaving the block closes the connection mid-stream
        plain = {
            "model": "qwen3-0.6b",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "still there?"}],
        }
        r = client.post("/v1/chat/completions", json=plain)
        assert r.status_code == 200
        assert r.json()["usage"]["completion_tokens"] == 4
        assert client.get("/health").status_code == 200
        engine = app.state.fake_engine.engine
        deadline = time.monotonic() + 5
        while engine.running or engine.waiting:  # the aborts land between steps
            assert time.monotonic() < deadline
            time.sleep(0.01)
        engine.check_invariants()


def test_a_lone_surrogate_is_a_400() -> None:
    raw = b'{"model":"qwen3-0.6b","max_tokens":2,"messages":[{"role":"user","content":"\\ud800x"}]}'
    with serve_in_thread(create_app(FakeEngineConfig())) as url:
        r = httpx.post(f"{url}/v1/chat/completions", content=raw, timeout=10)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_listening_sockets_say_tcp_so_asyncio_disables_nagle() -> None:
    from prefixroute.devtools.fake_engine import listening_socket

    with listening_socket("127.0.0.1") as sock:
        assert sock.proto == socket.IPPROTO_TCP
