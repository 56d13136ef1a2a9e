"""The endpoint pool: metric parsing, scraping, health, file reloads (real HTTP on loopback)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from prefixroute.config import ConfigError
from prefixroute.drivers.pool import (
    MAX_LISTED_MODELS,
    EndpointPool,
    EndpointSpec,
    EngineMetrics,
    ScrapeConfig,
    parse_metrics,
    parse_model_names,
    read_endpoints,
)
from prefixroute.endpoint import MAX_COUNT, EndpointId, EndpointState
from tests.servers import free_port, serve_in_thread

# The shape of vLLM v1's exposition (vllm/v1/metrics/loggers.py), two data-parallel engines.
VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen3-0.6b"} 3.0
vllm:num_requests_running{engine="1",model_name="qwen3-0.6b"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="qwen3-0.6b"} 4.0
vllm:num_requests_waiting{engine="1",model_name="qwen3-0.6b"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="qwen3-0.6b"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="qwen3-0.6b"} 0.25
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="qwen3-0.6b"} 1234.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",num_gpu_blocks="2048"} 1.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="1",num_gpu_blocks="1024"} 1.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="qwen3-0.6b"} 0.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="qwen3-0.6b"} 0.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="qwen3-0.6b"} 0.0
"""


def test_parse_vllm_metrics() -> None:
    m = parse_metrics(VLLM_TEXT)
    assert m == EngineMetrics(
        waiting=4, running=5, kv_usage=0.375, kv_capacity_blocks=3072, block_size=16
    )


@pytest.mark.parametrize(
    "page",
    [
        "vllm:num_requests_waiting 1e300\nvllm:num_requests_running 1e308\n"
        "vllm:num_requests_running 1e308\n",
        'vllm:num_requests_waiting 1\nvllm:cache_config_info{num_gpu_blocks="'
        + "9" * 30
        + '",block_size="'
        + "9" * 30
        + '"} 1\n',
    ],
)
def test_absurd_engine_figures_saturate_and_still_make_an_endpoint_state(page: str) -> None:
    m = parse_metrics(page)
    assert 0 <= m.waiting <= MAX_COUNT and 0 <= m.running <= MAX_COUNT
    assert m.kv_capacity_blocks is None and m.block_size is None
    EndpointState(
        id=EndpointId("e"),
        address="127.0.0.1:1",
        waiting=m.waiting,
        running=m.running,
        kv_capacity_blocks=m.kv_capacity_blocks or 1,
    )


def test_parse_older_vllm_and_sglang_names() -> None:
    old = 'vllm:gpu_cache_usage_perc{model_name="m"} 0.9\nvllm:num_requests_waiting 2\n'
    assert parse_metrics(old) == EngineMetrics(waiting=2, kv_usage=0.9)
    sglang = (
        "# TYPE sglang:num_queue_reqs gauge\n"
        'sglang:num_queue_reqs{model_name="m"} 7\n'
        'sglang:num_running_reqs{model_name="m"} 1\n'
        'sglang:token_usage{model_name="m"} 1.5\n'
    )
    assert parse_metrics(sglang) == EngineMetrics(waiting=7, running=1, kv_usage=1.0)
    with pytest.raises(ValueError, match="no vLLM"):
        parse_metrics("# HELP up\nup 1\n")
    with pytest.raises(ValueError):
        parse_metrics("vllm:num_requests_waiting{engine=0 oops\n")


def test_read_endpoints_and_files(tmp_path: Path) -> None:
    (tmp_path / "pods.yaml").write_text(
        "- {address: '10.0.0.2:8000', id: b, models: [m]}\n", encoding="utf-8"
    )
    specs, files = read_endpoints(
        [{"address": "10.0.0.1:8000"}, {"file": "pods.yaml"}], base_dir=tmp_path
    )
    assert specs == (EndpointSpec("10.0.0.1:8000"),)
    assert specs[0].id == "10.0.0.1:8000"
    assert files == (tmp_path / "pods.yaml",)
    for bad, path in [
        ([{"address": "nohost"}], "endpoints[0].address"),
        ([{"address": "h:1", "port": 2}], "endpoints[0].port"),
        ([{"address": "h:1"}, {"address": "h:1"}], "endpoints[1]"),
        ([{"file": "missing.yaml"}], ""),
        ({"address": "h:1"}, "endpoints"),
    ]:
        with pytest.raises(ConfigError) as info:
            read_endpoints(bad, base_dir=tmp_path)
        assert info.value.path == path or (path == "" and "missing" in str(info.value))


class FakeUpstream:
    """A loopback server whose /metrics and /health answers the test controls."""

    def __init__(self) -> None:
        self.metrics = VLLM_TEXT
        self.health_status = 200
        self.delay_s = 0.0
        self.app = Starlette(
            routes=[Route("/metrics", self._metrics), Route("/health", self._health)]
        )

    async def _metrics(self, request: Request) -> Response:
        await asyncio.sleep(self.delay_s)
        return PlainTextResponse(self.metrics)

    async def _health(self, request: Request) -> Response:
        await asyncio.sleep(self.delay_s)
        return Response(status_code=self.health_status, headers={"location": "/metrics"})


def test_scrape_health_and_passive_marks() -> None:
    upstream = FakeUpstream()
    dead = f"127.0.0.1:{free_port()}"
    with serve_in_thread(upstream.app) as url:
        live = url.removeprefix("http://")
        clock = iter(range(100, 10_000))
        pool = EndpointPool(
            [EndpointSpec(live, id=EndpointId("live")), EndpointSpec(dead, id=EndpointId("dead"))],
            scrape=ScrapeConfig(unhealthy_after=2, timeout_s=0.5),
            clock=lambda: float(next(clock)),
        )

        async def run() -> None:
            first = pool.states()
            assert pool.states() is first  # cached while nothing changes
            assert [s.observed_at for s in first] == [None, None]
            await pool.scrape_once()
            states = {s.id: s for s in pool.states()}
            assert states["live"].running == 5 and states["live"].kv_capacity_blocks == 3072
            assert states["live"].block_size == 16  # the router sizes its capacity with it
            assert states["live"].observed_at is not None
            assert states["dead"].observed_at is None  # a failed scrape changes nothing
            # stale endpoints keep their last values and their old observed_at
            upstream.metrics = "not prometheus {{{"
            before = pool.states()
            await pool.scrape_once()
            assert pool.states() is before

            await pool.check_health_once()
            assert all(s.healthy for s in pool.states())  # one failure of two allowed
            await pool.check_health_once()
            health = {s.id: s.healthy for s in pool.states()}
            assert health == {"live": True, "dead": False}

            pool.mark_failed(EndpointId("live"))
            assert not {s.id: s.healthy for s in pool.states()}["live"]
            await pool.check_health_once()  # one good check heals a passive mark
            assert {s.id: s.healthy for s in pool.states()}["live"]

            upstream.health_status = 503
            await pool.check_health_once()
            await pool.check_health_once()
            assert not {s.id: s.healthy for s in pool.states()}["live"]
            await pool.stop()

        asyncio.run(run())


def test_timeouts_and_redirects_are_failures() -> None:
    upstream = FakeUpstream()
    upstream.delay_s = 0.5
    with serve_in_thread(upstream.app) as url:
        pool = EndpointPool(
            [EndpointSpec(url.removeprefix("http://"))],
            scrape=ScrapeConfig(unhealthy_after=1, timeout_s=0.2),
        )

        async def run() -> None:
            await pool.scrape_once()  # slower than timeout_s: nothing observed
            await pool.check_health_once()
            assert pool.states()[0].observed_at is None and not pool.states()[0].healthy
            upstream.delay_s = 0.0
            await pool.scrape_once()
            await pool.check_health_once()
            assert pool.states()[0].observed_at is not None and pool.states()[0].healthy
            upstream.health_status = 302  # to /metrics, which would answer 200: not followed
            await pool.check_health_once()
            assert not pool.states()[0].healthy
            await pool.stop()

        asyncio.run(run())


def test_reload_adds_and_removes_endpoints(tmp_path: Path) -> None:
    file = tmp_path / "pods.yaml"
    file.write_text("- {address: '127.0.0.1:9001', id: a}\n- {address: '127.0.0.1:9002', id: b}\n")
    removed: list[str] = []
    pool = EndpointPool(
        [EndpointSpec("127.0.0.1:9000", id=EndpointId("static"))],
        files=[file],
        on_removed=removed.append,
    )
    assert [s.id for s in pool.states()] == ["static", "a", "b"]
    assert not pool.reload_if_changed()

    file.write_text(
        "- {address: '127.0.0.1:9002', id: b, models: [m]}\n- {address: '127.0.0.1:9003', id: c}\n"
    )
    os.utime(file, ns=(1, 1))  # a distinct mtime even on coarse file systems
    assert not pool.reload_if_changed()  # maybe half-written: wait until it holds still
    assert pool.reload_if_changed()
    states = {s.id: s for s in pool.states()}
    assert sorted(states) == ["b", "c", "static"]
    assert states["b"].models == frozenset({"m"})
    assert removed == ["a"]
    assert pool.address(EndpointId("a")) is None

    file.write_text("- {address: nonsense}\n")  # a broken file keeps the endpoints
    os.utime(file, ns=(2, 2))
    assert not pool.reload_if_changed()
    assert not pool.reload_if_changed()
    assert sorted(s.id for s in pool.states()) == ["b", "c", "static"]

    file.write_text("- {address: '127.0.0.1:9009', id: b}\n")  # same id, another pod
    os.utime(file, ns=(3, 3))
    assert not pool.reload_if_changed()
    assert pool.reload_if_changed()
    assert removed == ["a", "b", "c"]
    assert pool.address(EndpointId("b")) == "127.0.0.1:9009"

    file.write_text("")  # truncated (a writer caught mid-way): keep the endpoints
    os.utime(file, ns=(4, 4))
    assert not pool.reload_if_changed()
    assert not pool.reload_if_changed()
    assert pool.address(EndpointId("b")) == "127.0.0.1:9009"


def test_scrape_config_from_document() -> None:
    assert ScrapeConfig.from_document({}) == ScrapeConfig()
    assert ScrapeConfig.from_document({"scrape": {"interval_s": 1}}).interval_s == 1.0
    for section, path in [
        ({"interval": 1}, "scrape.interval"),
        ({"interval_s": 0}, "scrape.interval_s"),
        ({"health_path": "health"}, "scrape.health_path"),
        ({"unhealthy_after": 0}, "scrape.unhealthy_after"),
    ]:
        with pytest.raises(ConfigError) as info:
            ScrapeConfig.from_document({"scrape": section})
        assert info.value.path == path


def test_background_loops_scrape_without_being_asked() -> None:
    upstream = FakeUpstream()
    with serve_in_thread(upstream.app) as url:
        pool = EndpointPool(
            [EndpointSpec(url.removeprefix("http://"))],
            scrape=ScrapeConfig(interval_s=0.02, health_interval_s=0.02),
        )

        async def run() -> None:
            await pool.start()
            first = pool.states()[0].observed_at
            assert first is not None
            for _ in range(100):
                await asyncio.sleep(0.02)
                if (pool.states()[0].observed_at or 0) > first:
                    break
            assert (pool.states()[0].observed_at or 0) > first
            await pool.stop()

        asyncio.run(run())


# -- models: configured, else listed by the engine --------------------------------------


def test_parse_model_names() -> None:
    listing = {"object": "list", "data": [{"id": "base"}, {"id": "lora-a"}, {"id": 7}, "x"]}
    assert parse_model_names(listing) == frozenset({"base", "lora-a"})
    assert parse_model_names({"data": []}) == frozenset()
    assert parse_model_names(None) is None
    assert parse_model_names({"models": []}) is None
    many = {"data": [{"id": f"m{i}"} for i in range(MAX_LISTED_MODELS + 10)]}
    assert len(parse_model_names(many) or ()) == MAX_LISTED_MODELS


def test_served_models_come_from_config_else_the_listing() -> None:
    class Listing:
        def __init__(self) -> None:
            self.names = ["listed-a"]
            self.app = Starlette(
                routes=[
                    Route("/health", lambda r: Response()),
                    Route("/v1/models", self.models),
                ]
            )

        async def models(self, request: Request) -> Response:
            return JSONResponse({"object": "list", "data": [{"id": n} for n in self.names]})

    listing = Listing()
    bare = FakeUpstream()  # no /v1/models route: serves any name
    with serve_in_thread(listing.app) as lister, serve_in_thread(bare.app) as other:
        configured = EndpointSpec(
            lister.removeprefix("http://"), EndpointId("c"), frozenset({"conf"})
        )
        listed = EndpointSpec(lister.removeprefix("http://"), EndpointId("l"))
        open_one = EndpointSpec(other.removeprefix("http://"), EndpointId("o"))

        async def run() -> None:
            closed = EndpointPool([configured, listed])
            assert closed.serves("listed-a") is None  # nothing listed yet: any name
            await closed.check_health_once()
            assert closed.served_models() == {"conf", "listed-a"}
            assert closed.serves("listed-a") is True and closed.serves("nope") is False
            models = {s.id: s.models for s in closed.states()}
            assert models == {"c": {"conf"}, "l": {"listed-a"}}  # the router's model-filter too
            listing.names = ["listed-b"]
            await closed.check_health_once()
            assert closed.serves("listed-a") is False and closed.serves("listed-b") is True
            await closed.stop()

            mixed = EndpointPool([configured, open_one])
            await mixed.check_health_once()
            assert mixed.serves("conf") is True
            assert mixed.serves("anything") is None  # an endpoint may serve any name
            await mixed.stop()
            assert EndpointPool([]).serves("m") is None  # no endpoints: the router says 503

        asyncio.run(run())
