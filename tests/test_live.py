"""The live demo: fake-engine and gateway subprocesses on loopback, the seed load, a summary."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket

import aiohttp
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from prefixroute.devtools.live import (
    EngineSample,
    cli_arguments,
    cli_main,
    free_port_block,
    metric_sums,
    run_live,
    sample_fleet,
    wait_ready,
)
from tests.servers import free_port, serve_in_thread


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_metric_sums_adds_label_sets_and_ignores_the_rest() -> None:
    text = "\n".join(
        [
            "# HELP vllm:prefix_cache_hits_total Hits.",
            "# TYPE vllm:prefix_cache_hits_total counter",
            'vllm:prefix_cache_hits_total{engine="0",model_name="a b"} 10.0',
            'vllm:prefix_cache_hits_total{engine="1",model_name="x"} 5',
            'vllm:prefix_cache_hits_created{engine="0"} 1.7e9',
            "vllm:num_requests_running 3 1700000000000",
            "vllm:num_requests_running_extra 99",
            "vllm:num_requests_waiting NaN",
        ]
    )
    names = ["vllm:prefix_cache_hits_total", "vllm:num_requests_running"]
    sums = metric_sums(text, [*names, "vllm:num_requests_waiting"])
    assert sums == {
        "vllm:prefix_cache_hits_total": 15.0,
        "vllm:num_requests_running": 3.0,
        "vllm:num_requests_waiting": 0.0,
    }


def test_engine_sample_deltas() -> None:
    before = EngineSample("a", ok=True, requests=10, queries=100, hits=50, running=4)
    after = EngineSample("a", ok=True, requests=30, queries=300, hits=200, running=1)
    d = after.minus(before)
    assert (d.requests, d.queries, d.hits, d.running) == (20, 200, 150, 1)
    assert d.hit_rate == 0.75
    assert EngineSample("b", ok=False).hit_rate is None


class Engine:
    """A loopback stand-in for an engine: /health fails `fail` times, /metrics has counters."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.app = Starlette(
            routes=[Route("/health", self.health), Route("/metrics", self.metrics)]
        )

    async def health(self, request: Request) -> Response:
        self.fail -= 1
        return Response(status_code=503 if self.fail >= 0 else 200)

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(
            'vllm:request_success_total{finished_reason="stop"} 4\n'
            'vllm:request_success_total{finished_reason="length"} 2\n'
            "vllm:prefix_cache_queries_total 10\nvllm:prefix_cache_hits_total 5\n"
        )


def test_wait_ready_polls_until_200_and_gives_up_in_time() -> None:
    engine = Engine(fail=3)
    with serve_in_thread(engine.app) as url:
        wait_ready([f"{url}/health"], [], timeout_s=5.0)
        assert engine.fail < 0  # three 503s were waited out
    with pytest.raises(RuntimeError, match="did not answer 200"):
        wait_ready([f"http://127.0.0.1:{free_port()}/health"], [], timeout_s=0.3)


def test_sample_fleet_reads_counters_and_marks_the_silent() -> None:
    dead = f"127.0.0.1:{free_port()}"
    with serve_in_thread(Engine(fail=0).app) as url:

        async def sample() -> list[EngineSample]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as client:
                return await sample_fleet(client, [url.removeprefix("http://"), dead])

        live, down = asyncio.run(sample())
    assert live.ok and (live.requests, live.queries, live.hits) == (6, 10, 5)
    assert down == EngineSample(dead, ok=False)


@pytest.mark.slow
def test_live_demo_serves_the_seed_traffic_and_cleans_up() -> None:
    out = io.StringIO()
    result = run_live(engines=2, duration_s=4.0, out=out, tty=False)
    text = out.getvalue()
    assert result.exit_code == 0, text
    report = result.report
    assert report is not None
    assert report.ok > 50 and report.failures == 0
    assert report.hit_rate is not None and report.hit_rate > 0.3
    assert len(result.engines) == 2
    assert sum(e.requests for e in result.engines) == report.ok  # engines saw every request
    assert all(e.requests > 0 for e in result.engines)
    assert "summary:" in text and "failures 0" in text
    assert text.count(" req/s ") >= 3  # a plain line per second, no terminal redraws
    assert "\x1b[" not in text
    assert len(result.pids) == 2 and all(_gone(pid) for pid in result.pids)


@pytest.mark.slow
def test_live_demo_reports_a_gateway_that_cannot_start(capsys: pytest.CaptureFixture[str]) -> None:
    base = free_port_block(3)
    with socket.socket() as taken:  # the gateway's port is in use
        taken.bind(("127.0.0.1", base))
        taken.listen()
        result = run_live(engines=2, duration_s=2.0, port_base=base, out=io.StringIO(), tty=False)
    assert result.exit_code == 1 and result.report is None
    assert "prefixroute demo --live:" in capsys.readouterr().err
    assert result.pids and all(_gone(pid) for pid in result.pids)


def test_cli_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    cli_arguments(parser)
    assert cli_main(parser.parse_args(["--engines", "0"])) == 2
    assert "engines must be >= 1" in capsys.readouterr().err
    assert cli_main(parser.parse_args(["--duration", "-1"])) == 2
