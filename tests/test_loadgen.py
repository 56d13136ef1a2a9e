"""The load generator: the seed request sequence, and real runs against fake engines on loopback."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from prefixroute.devtools.fake_engine import FakeEngineConfig, create_app
from prefixroute.devtools.loadgen import (
    Result,
    WireRequest,
    cli_arguments,
    cli_main,
    messages_of,
    run_load,
    run_with_uvloop,
    seed_requests,
    summarise,
)
from prefixroute.openai import render_messages
from prefixroute.sim.workload import SEED_PERSONAS, SEED_QUESTIONS
from tests.servers import free_port, serve_in_thread


@contextlib.contextmanager
def engines(n: int, *, time_scale: float = 0.05) -> Iterator[list[str]]:
    """`n` fake engines in threads; their base URLs."""
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(
                serve_in_thread(
                    create_app(FakeEngineConfig(engine_id=f"fake-{i}", time_scale=time_scale))
                )
            )
            for i in range(n)
        ]


# --- the request sequence ----------------------------------------------------------------


def test_seed_requests_are_deterministic_per_seed() -> None:
    first = list(itertools.islice(seed_requests(7), 300))
    assert first == list(itertools.islice(seed_requests(7), 300))
    assert first != list(itertools.islice(seed_requests(8), 300))


def test_seed_requests_are_the_seed_experiments_mix() -> None:
    reqs = list(itertools.islice(seed_requests(0), 5000))
    kinds = Counter(path for path, _, _ in reqs)
    tenant_share = kinds["/v1/chat/completions"] / len(reqs)
    assert tenant_share == pytest.approx(0.8, abs=0.02)  # 4 tenant : 1 cold
    tenants: Counter[str] = Counter()
    for path, body, headers in reqs:
        assert body["model"] == "qwen3-0.6b"
        if path == "/v1/chat/completions":
            tenant = headers["x-tenant-id"]
            tenants[tenant] += 1
            system, user = body["messages"]
            assert system == {"role": "system", "content": SEED_PERSONAS[tenant]}
            assert user["role"] == "user" and user["content"] in SEED_QUESTIONS
            assert body["max_tokens"] == 80
        else:
            assert path == "/v1/completions" and headers == {}
            word, n = body["prompt"].split()
            assert word == "Question" and 1 <= int(n) <= 1000
            assert body["max_tokens"] == 50
    assert set(tenants) == set(SEED_PERSONAS)
    assert min(tenants.values()) / max(tenants.values()) > 0.85  # uniform popularity


@given(
    st.lists(
        st.fixed_dictionaries({"role": st.text(max_size=8), "content": st.text(max_size=40)}),
        max_size=5,
    )
)
def test_messages_of_inverts_render_messages(messages: list[dict[str, str]]) -> None:
    assert messages_of(render_messages(messages)) == messages


def test_messages_of_refuses_other_text() -> None:
    with pytest.raises(ValueError):
        messages_of("Question 5")
    with pytest.raises(ValueError):
        messages_of("<|user|10|>short")


def test_summarise_percentiles_and_hit_rate() -> None:
    results = [
        Result(
            i,
            "tenant",
            "a",
            "u",
            200,
            0.0,
            latency_s=i / 100,
            ttft_s=i / 1000,
            prompt_tokens=100,
            cached_tokens=50,
        )
        for i in range(1, 101)
    ]
    results.append(Result(101, "cold", None, "u", 503, 0.0, latency_s=9.0, error="busy"))
    report = summarise(results, duration_s=10.0, offered_rps=10.0)
    assert (report.requests, report.ok, report.failures) == (101, 100, 1)
    assert report.by_status == {"200": 100, "503:busy": 1}
    assert report.latency_p50_s == pytest.approx(0.505)
    assert report.latency_p99_s == pytest.approx(0.9901)
    assert report.ttft_p50_s == pytest.approx(0.0505)
    assert report.hit_rate == 0.5 and report.achieved_rps == 10.0
    assert report.tenants == {"a": (100, 0.5), "-": (1, None)}


# --- real runs ---------------------------------------------------------------------------


def test_open_loop_against_a_fake_engine() -> None:
    with engines(1) as urls:
        report = asyncio.run(run_load(urls[0], rate_rps=40, duration_s=2.0, seed=1, timeout_s=10))
    assert report.failures == 0, report.by_status
    assert 50 <= report.requests <= 115  # Poisson around 80
    assert report.hit_rate is not None and report.hit_rate > 0.3
    assert report.ttft_p50_s is not None and report.ttft_p99_s is not None
    assert report.ttft_p50_s <= report.latency_p50_s  # type: ignore[operator]
    assert report.engines == {"fake-0": report.requests}
    assert report.lag_p99_s is not None and report.lag_p99_s < 0.5
    tenant_rate = report.tenants["finance"][1]
    assert tenant_rate is not None and tenant_rate > 0.5  # a persona repeats its prompt
    assert report.tenants["-"][1] is not None and report.tenants["-"][1] < 0.5  # cold questions


def test_same_seed_sends_the_same_requests_in_the_same_order() -> None:
    with engines(1) as urls:
        runs = [
            asyncio.run(run_load(urls[0], rate_rps=200, duration_s=5.0, max_requests=30, seed=3))
            for _ in range(2)
        ]
    for report in runs:
        assert report.requests == 30 and report.failures == 0
    kinds = [
        [(r.index, r.kind, r.tenant) for r in sorted(rep.results, key=lambda r: r.index)]
        for rep in runs
    ]
    assert kinds[0] == kinds[1]


def test_several_urls_are_used_round_robin_and_non_streaming_reads_usage() -> None:
    with engines(2) as urls:
        report = asyncio.run(
            run_load(urls, rate_rps=100, duration_s=5.0, max_requests=40, stream=False)
        )
    assert report.failures == 0
    assert report.engines == {"fake-0": 20, "fake-1": 20}
    assert report.ttft_p50_s is None  # no stream, no first token
    assert report.prompt_tokens > 0 and report.hit_rate is not None


def test_closed_loop_users_wait_for_answers() -> None:
    users = 3
    with engines(1) as urls:
        report = asyncio.run(
            run_load(
                urls[0], users=users, duration_s=1.5, think_s=(0.05, 0.1), ramp_s=0.1, max_tokens=4
            )
        )
    assert report.failures == 0
    assert report.requests > 2 * users  # each user went round several times
    # never more than `users` requests outstanding at once
    starts = [(r.sent_s, 1) for r in report.results]
    events = sorted(starts + [(r.sent_s + r.latency_s, -1) for r in report.results])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert peak <= users
    assert report.duration_s < 1.5 + 1.0


def test_an_unreachable_target_fails_every_request_quickly() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    report = asyncio.run(
        run_load(url, rate_rps=50, duration_s=2.0, max_requests=5, model="m", timeout_s=2)
    )
    assert (report.requests, report.failures, report.ok) == (5, 5, 0)
    assert all(r.status == 0 and r.error == "ConnectError" for r in report.results)


def test_bad_arguments_are_value_errors() -> None:
    for kwargs in ({}, {"rate_rps": 1, "users": 1}, {"rate_rps": -1}, {"users": 0}):
        with pytest.raises(ValueError):
            asyncio.run(run_load("http://127.0.0.1:1", duration_s=1, **kwargs))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        asyncio.run(run_load("http://127.0.0.1:1", rate_rps=1, duration_s=float("inf")))


def test_cli_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    cli_arguments(parser)
    assert cli_main(parser.parse_args(["--url", "http://127.0.0.1:1", "--rate", "0"])) == 2
    assert "rate_rps must be > 0" in capsys.readouterr().err
    with engines(1) as urls:
        args = parser.parse_args(
            ["--url", urls[0], "--rate", "100", "--max-requests", "10", "--max-tokens", "2"]
        )
        assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "requests 10 (200: 10), failures 0" in out


class Scripted:
    """A loopback upstream whose completions answer as `mode` says (it may misbehave)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.app = Starlette(routes=[Route("/v1/completions", self.complete, methods=["POST"])])

    async def complete(self, request: Request) -> Response:
        if self.mode == "stall":
            await asyncio.sleep(0.6)
        if self.mode == "rate-limited":
            body = {"error": {"message": "slow down", "type": "x", "code": "rate-limited"}}
            return JSONResponse(body, status_code=429)
        return StreamingResponse(self.events(), media_type="text/event-stream")

    async def events(self) -> AsyncIterator[bytes]:
        pieces = [b'data: {"choices": [{"text": ""}]}\n\n']  # nothing yet: no TTFT
        if self.mode == "stream-error":
            pieces.append(b'data: {"error": {"message": "engine died"}}\n\n')
        # a content event cut mid-line, then a usage event longer than aiohttp's line limit
        pieces += [b'data: {"choices": [{"te', b'xt": "hi"}]}\n', b"\n"]
        usage = {"prompt_tokens": 7, "prompt_tokens_details": {"cached_tokens": 3}}
        pad = "x" * 200_000
        pieces.append(
            f"data: {json.dumps({'choices': [], 'usage': usage, 'pad': pad})}\n\n".encode()
        )
        if self.mode != "truncated":
            pieces.append(b"data: [DONE]\n\n")
        for piece in pieces:
            yield piece
            await asyncio.sleep(0.01)  # separate writes: the client sees the cuts


COMPLETION: WireRequest = ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 2}, {})


@pytest.mark.parametrize(
    ("mode", "status", "error"),
    [
        ("ok", 200, None),
        ("truncated", 200, "truncated"),
        ("stream-error", 200, "stream-error"),
        ("rate-limited", 429, "rate-limited"),
        ("stall", 0, "ReadTimeout"),
    ],
)
def test_what_each_answer_is_recorded_as(mode: str, status: int, error: str | None) -> None:
    with serve_in_thread(Scripted(mode).app) as url:
        report = asyncio.run(
            run_load(url, rate_rps=100, duration_s=5, requests=[COMPLETION] * 2, timeout_s=0.2)
        )
    assert [(r.status, r.error) for r in report.results] == [(status, error)] * 2
    if mode == "ok":
        assert report.failures == 0 and report.ttft_p50_s is not None
        assert report.ttft_p50_s < report.latency_p50_s  # type: ignore[operator]
        assert (report.prompt_tokens, report.cached_tokens) == (14, 6)
    else:
        assert report.ok == 0 and report.failures == 2


def test_run_with_uvloop_runs_on_uvloop() -> None:
    pytest.importorskip("uvloop")

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run_with_uvloop(loop_module()).startswith("uvloop")


# --- the side-by-side harness, restricted to what `make test` can run ---------------------


@pytest.mark.slow
def test_side_by_side_quick_smoke(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.side_by_side",
            "--quick",
            "--routers",
            "direct,ours",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=Path(__file__).resolve().parent.parent,  # the repository root: `benchmarks` imports
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| direct |" in proc.stdout and "| ours |" in proc.stdout
    doc = json.loads(out.read_text())
    for router in ("direct", "ours"):
        seed = doc["routers"][router]["seed"]
        assert seed["failures"] == 0 and seed["engine_hit_rate"] > 0


@pytest.mark.slow
def test_side_by_side_quick_smoke_envoy(tmp_path: Path) -> None:
    """The `envoy` router: the shipped Envoy config + `prefixroute extproc`, every phase."""
    from tests.envoy import envoy_binary

    envoy_binary()  # make test installs Envoy: a missing one fails with the install command
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.side_by_side",
            "--quick",
            "--routers",
            "envoy",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| envoy |" in proc.stdout
    envoy = json.loads(out.read_text())["routers"]["envoy"]
    seed = envoy["seed"]
    assert seed["failures"] == 0 and seed["engine_hit_rate"] > 0
    # the picker chose: the engines served every request Envoy answered
    assert sum(seed["engine_requests"]) == seed["ok"] == seed["requests"]
    assert envoy["burst"]["failures"] == 0 and envoy["ramp"][0]["sustained"]
