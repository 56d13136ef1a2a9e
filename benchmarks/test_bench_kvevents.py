"""pytest-benchmark suite for the KV-event driver: decoding, mapping, one message end to end.

Messages are shaped as vLLM publishes them (map-shaped events in an array
batch, vLLM 0.32): a prefill `BlockStored` of 64 blocks of 16 tokens (a
1,024-token prompt); a decode step of eight single-block `BlockStored`s of
eight running requests, each after one single-hash `BlockRemoved` (the
eviction that made room); and a batch of 64 removals. The mapper is warm:
every parent is known. `benchmarks/kvevents_throughput.py` measures a whole
stream (and over ZMQ); the figures are in docs/kv-events.md.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import msgpack
import pytest

from prefixroute.drivers.kvevents import BlockMapper, decode_batch
from prefixroute.endpoint import EndpointId
from prefixroute.router import Router

EP = EndpointId("e1")
BS = 16


def _stored(hashes: list[int], parent: int | None, tokens: list[int]) -> dict[str, Any]:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": BS,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }


class Warm:
    """A router and a mapper holding 64 chains the messages extend (fresh hashes each round)."""

    def __init__(self) -> None:
        self.rng = random.Random(5)
        self.router = Router.default()
        self.mapper = BlockMapper(EP, self.router.blocker, model="m", max_blocks=1 << 20)
        self.hashes = itertools.count(1)
        self.tips: list[int] = []
        for _ in range(64):
            h = next(self.hashes)
            self.apply([_stored([h], None, self.tokens(1))])
            self.tips.append(h)

    def tokens(self, blocks: int) -> list[int]:
        return [self.rng.randrange(150_000) for _ in range(blocks * BS)]

    def apply(self, events: list[Any]) -> None:
        for event in self.mapper.apply(events):
            self.router.observe(event)

    def prefill(self) -> list[Any]:
        hashes = [next(self.hashes) for _ in range(64)]
        return [_stored(hashes, self.tips[0], self.tokens(64))]

    def decode_step(self) -> list[Any]:
        events: list[Any] = []
        for i in range(8):
            h = next(self.hashes)
            events.append({"type": "BlockRemoved", "block_hashes": [h + 10**9], "medium": "GPU"})
            events.append(_stored([h], self.tips[i], self.tokens(1)))
        return events


@pytest.fixture(scope="module")
def warm() -> Warm:
    return Warm()


def test_decode_a_prefill_message(benchmark: Any, warm: Warm) -> None:
    payload = msgpack.packb([1.0, warm.prefill(), 0])
    _, events = benchmark(decode_batch, payload)
    assert len(events) == 1


def test_map_and_apply_a_prefill(benchmark: Any, warm: Warm) -> None:
    """One `BlockStored` of 64 blocks: decode-free mapping, `hash_tokens`, `Router.observe`."""
    rounds = [warm.prefill() for _ in range(200)]
    it = iter(rounds)
    benchmark.pedantic(lambda: warm.apply(next(it)), rounds=len(rounds), iterations=1)


def test_map_and_apply_a_decode_step(benchmark: Any, warm: Warm) -> None:
    """Eight single-block stores, each after a removal: one message of a busy engine's step."""
    rounds = [warm.decode_step() for _ in range(500)]
    it = iter(rounds)
    benchmark.pedantic(lambda: warm.apply(next(it)), rounds=len(rounds), iterations=1)


def test_map_and_apply_64_removals(benchmark: Any, warm: Warm) -> None:
    def setup() -> tuple[tuple[list[Any]], dict[str, Any]]:
        hashes = [next(warm.hashes) for _ in range(64)]
        warm.apply([_stored(hashes, warm.tips[1], warm.tokens(64))])
        removals = [{"type": "BlockRemoved", "block_hashes": [h], "medium": "GPU"} for h in hashes]
        return (removals,), {}

    benchmark.pedantic(warm.apply, setup=setup, rounds=200, iterations=1)
    assert warm.mapper.stats.malformed == 0
