"""The KV-event driver: decoding, the key mapper, and live subscribers on real ZMQ sockets.

Publishers here are real pyzmq sockets on 127.0.0.1 sending vLLM's frames
(`[topic, seq, payload]`, msgpack batches in both encodings; two payloads
are the bytes vLLM 0.32's own encoder and the array-shaped msgspec structs
produce). They are XPUB sockets, which subscribers cannot tell from vLLM's
PUB, so a test can wait for the subscription instead of sleeping. The
replay server answers as vLLM's ROUTER does (both reply layouts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from prefixroute.config import ConfigError, load_config
from prefixroute.drivers.gateway import GatewayConfig, create_app
from prefixroute.drivers.kvevents import (
    BlockMapper,
    KVEventsConfig,
    KVEventsManager,
    KVEventSource,
    Malformed,
    decode_batch,
    medium_tier,
)
from prefixroute.drivers.pool import EndpointPool, EndpointSpec, read_endpoints
from prefixroute.drivers.service import RoutingService
from prefixroute.drivers.settings import DriverConfig
from prefixroute.endpoint import EndpointId
from prefixroute.events import EndpointRemoved
from prefixroute.index import Tier
from prefixroute.request import Request
from prefixroute.router import Router
from tests.servers import serve_in_thread, wait_until, wait_until_async

FIXTURES = Path("/work/shared/data/vllm-kv-events")
MODEL = "m"
E1 = EndpointId("e1")

# Bytes of `KVEventBatch(ts=1.5, events=[BlockStored(block_hashes=[1, 2**64 - 1],
# parent_block_hash=None, token_ids=[1, 2, 3], block_size=32, lora_id=None, medium="GPU",
# lora_name=None), BlockRemoved(block_hashes=[5], medium="GPU"), AllBlocksCleared()],
# data_parallel_rank=0)` from vLLM 0.32.0's own `msgspec.msgpack.encode`.
VLLM_032 = bytes.fromhex(
    "93cb3ff80000000000009388a474797065ab426c6f636b53746f726564ac626c6f636b5f686173686573"
    "9201cfffffffffffffffffb1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f6964739301"
    "0203aa626c6f636b5f73697a6520a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e61"
    "6d65c083a474797065ac426c6f636b52656d6f766564ac626c6f636b5f6861736865739105a66d656469"
    "756da347505581a474797065b0416c6c426c6f636b73436c656172656400"
)
# The same kind of batch from the array-shaped structs of older vLLM (and SGLang):
# `EventBatch(ts=1.5, events=[BlockStored([1, 2**64 - 1], None, [1, 2, 3, 4], 2, None),
# BlockRemoved([5]), AllBlocksCleared()])`, msgspec `array_like=True, tag=True`.
ARRAY_SHAPED = bytes.fromhex(
    "92cb3ff80000000000009396ab426c6f636b53746f7265649201cfffffffffffffffffc0940102030402"
    "c092ac426c6f636b52656d6f766564910591b0416c6c426c6f636b73436c6561726564"
)


# -- building vLLM messages ---------------------------------------------------------------


def stored(
    hashes: Sequence[int],
    tokens: Sequence[int],
    *,
    parent: int | None = None,
    block_size: int = 16,
    medium: str | None = "GPU",
    lora_name: str | None = None,
    shape: str = "map",
) -> Any:
    lora_id = 1 if lora_name else None
    if shape == "map":
        return {
            "type": "BlockStored",
            "block_hashes": list(hashes),
            "parent_block_hash": parent,
            "token_ids": list(tokens),
            "block_size": block_size,
            "lora_id": lora_id,
            "medium": medium,
            "lora_name": lora_name,
        }
    return ["BlockStored", list(hashes), parent, list(tokens), block_size, lora_id, medium]


def removed(hashes: Sequence[int], *, medium: str | None = "GPU", shape: str = "map") -> Any:
    if shape == "map":
        return {"type": "BlockRemoved", "block_hashes": list(hashes), "medium": medium}
    return ["BlockRemoved", list(hashes), medium]


def cleared(shape: str = "map") -> Any:
    return {"type": "AllBlocksCleared"} if shape == "map" else ["AllBlocksCleared"]


def batch(events: Sequence[Any], *, ts: float | None = None, shape: str = "array") -> bytes:
    stamp = time.time() if ts is None else ts
    doc: Any = [stamp, list(events), 0] if shape == "array" else {"ts": stamp, "events": events}
    return msgpack.packb(doc)


def tokens(n_blocks: int, *, start: int = 1000, block_size: int = 16) -> list[int]:
    return list(range(start, start + n_blocks * block_size))


def request_keys(router: Router, token_ids: Sequence[int], model: str = MODEL) -> list[int]:
    return [int(k) for k in router.blocker.keys(Request(model=model, token_ids=list(token_ids)))]


def matched(router: Router, token_ids: Sequence[int], endpoint: str = E1) -> int:
    m = router.index.match(request_keys(router, token_ids)).get(EndpointId(endpoint))
    return 0 if m is None else m.blocks


def mapper(router: Router, *, max_blocks: int = 10_000) -> BlockMapper:
    return BlockMapper(E1, router.blocker, model=MODEL, max_blocks=max_blocks)


def apply(router: Router, m: BlockMapper, events: Sequence[Any]) -> None:
    for event in m.apply(events):
        router.observe(event)


# -- decoding -----------------------------------------------------------------------------


def test_decodes_vllm_032_bytes_and_the_array_shape() -> None:
    ts, events = decode_batch(VLLM_032)
    assert ts == 1.5 and [e["type"] for e in events] == [
        "BlockStored",
        "BlockRemoved",
        "AllBlocksCleared",
    ]
    router = Router.default()
    m = mapper(router)
    out = m.apply(events)
    # block_size 32 with 3 token ids: malformed (2 hashes need 64 ids); the rest applies
    assert m.stats.malformed == 1
    assert [type(e).__name__ for e in out] == ["AllBlocksCleared"]
    ts, events = decode_batch(ARRAY_SHAPED)
    out = mapper(router).apply(events)  # block_size 2 does not divide into 16: unmapped
    assert ts == 1.5 and [type(e).__name__ for e in out] == ["AllBlocksCleared"]


@pytest.mark.parametrize("shape", ["map", "array"])
def test_both_encodings_map_to_the_same_keys(shape: str) -> None:
    router = Router.default()
    m = mapper(router)
    ids = tokens(3)
    _, events = decode_batch(batch([stored([11, 12, 13], ids, shape=shape)], shape="map"))
    apply(router, m, events)
    assert matched(router, ids) == 3


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1garbage",
        msgpack.packb("a string"),
        msgpack.packb([1.0]),
        msgpack.packb(["ts", []]),
        msgpack.packb([1.0, {"not": "a list"}]),
        msgpack.packb({"ts": 1.0}),
        b"",
        msgpack.packb([1.0, []]) + b"trailing",
    ],
)
def test_a_malformed_batch_is_a_value_error(payload: bytes) -> None:
    with pytest.raises(Malformed):
        decode_batch(payload)


def test_malformed_events_are_counted_and_skipped() -> None:
    router = Router.default()
    m = mapper(router)
    good = stored([1], tokens(1))
    bad = [
        {"type": "Unknown"},
        ["BlockStored", [1]],
        {"type": "BlockStored", "block_hashes": "x", "token_ids": [], "block_size": 16},
        stored([2], tokens(1)) | {"token_ids": [1, 2]},  # not block_size ids per hash
        stored([3], tokens(1)) | {"block_size": 0},
        stored([4], [2**40] * 16),  # a token id beyond 32 bits
        stored([5], tokens(1)) | {"parent_block_hash": 1.5},
        {"type": "BlockRemoved", "block_hashes": [None]},
        ["BlockRemoved"],
        42,
        [],
    ]
    out = m.apply([*bad, good])
    assert m.stats.malformed == len(bad)
    assert [len(e.keys) for e in out] == [1]  # type: ignore[union-attr]


_WIRE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "GPU", "cpu"]),
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(
            st.sampled_from(
                [
                    "type",
                    "block_hashes",
                    "parent_block_hash",
                    "token_ids",
                    "block_size",
                    "medium",
                    "lora_id",
                    "lora_name",
                ]
            ),
            inner,
            max_size=8,
        )
    ),
    max_leaves=20,
)


@given(st.lists(_WIRE, max_size=8))
@settings(
    max_examples=200, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
def test_any_decoded_garbage_is_counted_never_raised(events: list[Any]) -> None:
    router = Router.default()
    m = mapper(router)
    for event in m.apply(events):
        router.observe(event)
    assert m.stats.events + m.stats.malformed == len(events)


def test_media_become_tiers() -> None:
    assert medium_tier(None) is Tier.GPU
    assert medium_tier("gpu") is Tier.GPU
    assert medium_tier("CPU") is Tier.CPU
    assert medium_tier("Disk") is Tier.DISK
    assert medium_tier("STORAGE") is Tier.DISK
    assert medium_tier("NVLINK") is None


# -- mapping ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["base", "lora"])
def test_real_vllm_fixtures_match_every_block(name: str) -> None:
    """BlockStored captured from vLLM (Qwen3-0.6B, block size 16) maps onto request keys."""
    doc = json.loads((FIXTURES / f"kv_event_{name}.json").read_text())
    router = Router.default()
    m = BlockMapper(E1, router.blocker, model=doc["model_name"], max_blocks=1000)
    event = stored(
        doc["block_hashes"],
        doc["token_ids"],
        parent=doc["parent_block_hash"],
        block_size=doc["block_size"],
        medium=doc["medium"],
        lora_name=doc["lora_name"],
    )
    apply(router, m, [event])
    model = doc["lora_name"] or doc["model_name"]  # vLLM serves an adapter by its name
    keys = request_keys(router, doc["token_ids"], model)
    assert len(keys) == len(doc["block_hashes"]) == 25
    assert router.index.match(keys)[E1].blocks == 25
    assert m.stats.unmapped == 0
    if doc["lora_name"]:  # the adapter's blocks are not the base model's
        assert router.index.match(request_keys(router, doc["token_ids"], doc["model_name"])) == {}
        nameless = dict(event, lora_name=None)  # a LoRA block without a name cannot map
        m2 = BlockMapper(E1, router.blocker, model=doc["model_name"], max_blocks=1000)
        assert m2.apply([nameless]) == [] and m2.stats.unmapped == 25


def test_a_chain_split_over_events_and_engine_blocks_of_32() -> None:
    router = Router.default()
    m = mapper(router)
    ids = tokens(6)  # 6 index blocks = 3 engine blocks of 32
    apply(router, m, [stored([1], ids[:32], block_size=32)])
    apply(router, m, [stored([2, 3], ids[32:], parent=1, block_size=32)])
    assert matched(router, ids) == 6
    assert router.index.match(request_keys(router, ids[:40]))[E1].blocks == 2
    apply(router, m, [removed([3])])  # both index blocks of engine block 3 go
    assert matched(router, ids) == 4
    apply(router, m, [stored([9], tokens(2, start=5), parent=777, block_size=32)])
    assert m.stats.unmapped == 1  # unknown parent: its engine block is skipped, counted
    apply(router, m, [removed([12345])])
    assert m.stats.unmapped == 2


def test_an_engine_block_size_the_index_cannot_split_leaves_the_endpoint_approximate() -> None:
    router = Router.default()
    m = mapper(router)
    assert m.problem is None
    assert m.apply([stored([1], tokens(1, block_size=24), block_size=24)]) == []
    assert m.problem is not None and "24" in m.problem


def test_with_isolated_tenants_events_cannot_map() -> None:
    """Requests hash under their tenant; an engine's block names no tenant, so the keys made
    from events would match no tenant's request: the endpoint stays approximate."""
    router = load_config({"hashing": {"isolate_tenants": True}})
    m = mapper(router)
    assert m.problem is not None and "isolate_tenants" in m.problem
    assert m.apply([stored([1], tokens(1))]) == [] and m.stats.unmapped == 1
    m.note_block_size(16)  # a scraped block size does not lift it
    assert m.problem is not None


def test_tiers_follow_the_medium() -> None:
    router = Router.default()
    m = mapper(router)
    ids = tokens(2)
    apply(router, m, [stored([1, 2], ids, medium="GPU"), stored([1, 2], ids, medium="CPU")])
    apply(router, m, [removed([1, 2], medium="GPU")])
    assert router.index.match(request_keys(router, ids))[E1].weighted == pytest.approx(1.6)
    apply(router, m, [removed([1, 2], medium="cpu")])
    assert matched(router, ids) == 0 and not m.blocks
    apply(router, m, [stored([7], tokens(1), medium="HBM3")])
    assert m.stats.unmapped == 1


def test_runs_are_merged_in_order() -> None:
    router = Router.default()
    m = mapper(router)
    ids = tokens(3)
    out = m.apply(
        [
            stored([1], ids[:16]),
            stored([2], ids[16:32], parent=1),
            removed([2]),
            removed([1]),
            stored([1], ids[:16]),
            cleared(),
            stored([3], ids[:16]),
        ]
    )
    assert [type(e).__name__ for e in out] == [
        "BlockStored",
        "BlockRemoved",
        "BlockStored",
        "AllBlocksCleared",
        "BlockStored",
    ]
    assert [len(getattr(e, "keys", ())) for e in out] == [2, 2, 1, 0, 1]
    assert list(m.blocks) == [3]


@pytest.mark.parametrize("seed", range(20))
def test_grouping_a_message_ends_where_one_event_at_a_time_does(seed: int) -> None:
    """`apply` gathers removals and stores; the index must end as if applied one by one,
    and hold what a naive model of the engine's copies says."""
    rng = random.Random(seed)
    grouped, single = Router.default(), Router.default()
    mg, ms = mapper(grouped), mapper(single)
    roots = [tokens(1, start=100 * i) for i in range(4)]
    held: list[int] = []
    copies = {(h, tier): 0 for h in range(8) for tier in ("GPU", "CPU")}  # the engine's
    for _ in range(30):
        events: list[Any] = []
        for _ in range(rng.randint(1, 8)):
            roll = rng.random()
            if roll < 0.45 or not held:
                h = rng.randrange(8)  # h and h + 4: two engine hashes with the same keys
                tier = rng.choice(["GPU", "CPU"])
                events.append(stored([h], roots[h % 4], medium=tier))
                held.append(h)
                copies[h, tier] += 1
            elif roll < 0.9:
                h, medium = rng.choice(held), rng.choice(["GPU", "CPU", None])
                events.append(removed([h], medium=medium))
                tier = medium or "GPU"
                copies[h, tier] = max(0, copies[h, tier] - 1)
            else:
                events.append(cleared())
                copies = dict.fromkeys(copies, 0)
        apply(grouped, mg, events)
        for event in events:
            apply(single, ms, [event])
        for r, root in enumerate(roots):
            keys = request_keys(grouped, root)
            got = grouped.index.match(keys)
            assert got == single.index.match(keys)
            in_gpu = copies[r, "GPU"] + copies[r + 4, "GPU"] > 0
            in_cpu = copies[r, "CPU"] + copies[r + 4, "CPU"] > 0
            if in_gpu or in_cpu:
                assert got[E1].weighted == pytest.approx(1.0 if in_gpu else 0.8)
            else:
                assert E1 not in got
        assert mg.blocks == ms.blocks and mg.refs == ms.refs
        mg.check_invariants()


def test_the_hash_map_is_bounded() -> None:
    router = Router.default()
    m = mapper(router, max_blocks=100)
    parent = None
    for i in range(2000):
        apply(router, m, [stored([i], tokens(1, start=i), parent=parent)])
        parent = i
        assert len(m.blocks) <= 100 + 64
    m.check_invariants()
    assert m.stats.map_evicted >= 2000 - 164
    assert 1999 in m.blocks and 0 not in m.blocks


def test_the_bounded_map_keeps_a_prefix_that_is_still_extended() -> None:
    """A system prompt stored first and extended by every request (its offloaded copies, its
    held children) is the last the map forgets, not the first."""
    router = Router.default()
    m = mapper(router, max_blocks=100)
    apply(router, m, [stored([0], tokens(1))])
    for i in range(1, 2000):
        apply(router, m, [stored([i], tokens(1, start=16 * i), parent=0, medium="CPU")])
    assert m.stats.unmapped == 0 and 0 in m.blocks and m.stats.map_evicted > 0
    m.check_invariants()


# -- live subscribers ---------------------------------------------------------------------


class Publisher:
    """vLLM's publisher on real sockets: XPUB (a PUB to subscribers) and an optional replay ROUTER.

    `replay_layout` 032 answers as vLLM 0.32 (`[id, "", topic, seq, payload]`,
    end `[id, "", "", -1, ""]`), "old" as older releases (`[id, "", seq, payload]`).
    `buffer` holds what the replay socket can resend.
    """

    def __init__(
        self, ctx: zmq.asyncio.Context, *, replay: bool = False, replay_layout: str = "032"
    ) -> None:
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, repeated ones too
        self.port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.seq = 0
        self.topic = b"kv"
        self.buffer: list[tuple[int, bytes]] = []
        self.layout = replay_layout
        self.router: Any = None
        self.replay_task: asyncio.Task[None] | None = None
        self.replay_requests = 0
        self.drop_once: set[int] = set()  # seqs (-1: the end) the next reply loses, as a
        # ROUTER whose send queue is full drops them
        if replay:
            self.router = ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.replay_port = self.router.bind_to_random_port("tcp://127.0.0.1")
            self.replay_task = asyncio.ensure_future(self._serve_replay())

    def source(self, **extra: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {"endpoint": f"tcp://127.0.0.1:{self.port}", "topic": "kv"}
        if self.router is not None:
            doc["replay_endpoint"] = f"tcp://127.0.0.1:{self.replay_port}"
        return doc | extra

    async def subscribed(self) -> None:
        """Wait for a subscriber's subscription to reach this socket."""
        while (await asyncio.wait_for(self.pub.recv(), 10))[:1] != b"\x01":
            pass  # an earlier subscriber's unsubscription

    async def send(self, payload: bytes, *, seq: int | None = None, lost: bool = False) -> int:
        """Publish `payload` at `seq` (default: the next); `lost` keeps it for replay only."""
        if seq is None:
            seq = self.seq
        self.seq = seq + 1
        self.buffer.append((seq, payload))
        if not lost:
            await self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    async def _serve_replay(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            self.replay_requests += 1
            first = int.from_bytes(start, "big")
            lost, self.drop_once = self.drop_once, set()
            for seq, payload in self.buffer:
                if seq >= first and seq not in lost:
                    head = [client, b""] + ([self.topic] if self.layout == "032" else [])
                    await self.router.send_multipart([*head, seq.to_bytes(8, "big"), payload])
            end = (-1).to_bytes(8, "big", signed=True)
            tail = [b"", end, b""] if self.layout == "032" else [end, b""]
            if -1 not in lost:
                await self.router.send_multipart([client, b"", *tail])

    async def close(self) -> None:
        if self.replay_task is not None:
            self.replay_task.cancel()
            await asyncio.gather(self.replay_task, return_exceptions=True)
            self.router.close(linger=0)
        self.pub.close(linger=0)


@contextlib.asynccontextmanager
async def subscribed(
    pub: Publisher, *, config: KVEventsConfig | None = None, **source: Any
) -> AsyncIterator[tuple[Router, KVEventsManager]]:
    """A router, a one-endpoint pool (e1 serving MODEL) and a started manager on `pub`."""
    router = Router.default()
    spec = EndpointSpec(
        address="127.0.0.1:9",
        id=E1,
        models=frozenset([MODEL]),
        kv_events=KVEventSource.from_document(pub.source(**source), "kv_events"),
    )
    pool = EndpointPool([spec])
    manager = KVEventsManager(router, pool, config or KVEventsConfig(check_interval_s=60))
    await manager.start()
    try:
        await pub.subscribed()
        if pub.router is not None:  # the catch-up replay on connecting (an empty buffer here)
            stream = manager.streams[E1]
            await wait_until_async(lambda: stream.stats.replays == 1 and not stream._lock.locked())
        yield router, manager
    finally:
        await manager.stop()


@contextlib.asynccontextmanager
async def publisher(**kwargs: Any) -> AsyncIterator[Publisher]:
    ctx = zmq.asyncio.Context()
    pub = Publisher(ctx, **kwargs)
    try:
        yield pub
    finally:
        await pub.close()
        ctx.term()


def stream_of(manager: KVEventsManager) -> Any:
    return manager.streams[E1]


def run(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


def test_live_events_make_the_endpoint_precise() -> None:
    async def main() -> None:
        async with publisher() as pub, subscribed(pub) as (router, manager):
            stream = stream_of(manager)
            assert (
                not router.is_precise(E1)
                and stream.reason == "no event received on this connection yet"
            )
            ids = tokens(4)
            await pub.send(batch([stored([1, 2, 3, 4], ids)]))
            await wait_until_async(lambda: matched(router, ids) == 4)
            assert router.is_precise(E1)
            snap = manager.snapshots()[0]
            assert (snap.messages, snap.events, snap.blocks_stored, snap.lag_count) == (1, 1, 4, 1)
            assert manager.modes() == {E1: {"mode": "precise", "reason": "events live"}}
            await pub.send(batch([removed([3, 4])], shape="map"))
            await wait_until_async(lambda: matched(router, ids) == 2)

    run(main())


def test_a_burst_of_messages_is_applied_without_a_loss() -> None:
    async def main() -> None:
        async with publisher() as pub, subscribed(pub) as (router, manager):
            ids = tokens(300)
            parent = None
            for i in range(300):  # queued faster than applied: drained without a wake-up each
                await pub.send(batch([stored([i], ids[16 * i : 16 * i + 16], parent=parent)]))
                parent = i
            await wait_until_async(lambda: stream_of(manager).last_seq == 299)
            snap = manager.snapshots()[0]
            assert (snap.messages, snap.gaps, snap.blocks_stored) == (300, 0, 300)
            assert matched(router, ids) == 300

    run(main())


def test_a_large_batch_lets_the_event_loop_run_while_it_is_applied() -> None:
    """One message of 2,000 stores (tens of ms of work) is applied in slices: other tasks
    (requests) run in between and see it partly applied."""

    async def main() -> None:
        async with publisher() as pub, subscribed(pub) as (_router, manager):
            stats = stream_of(manager).stats
            n = 2000
            seen: set[int] = set()

            async def watch() -> None:
                while stats.blocks_stored < n:
                    seen.add(stats.blocks_stored)
                    await asyncio.sleep(0)

            watcher = asyncio.create_task(watch())
            events = [
                stored([i], tokens(1, start=i), parent=i - 1 if i else None) for i in range(n)
            ]
            await pub.send(batch(events))
            await watcher
            assert stats.blocks_stored == n and stats.unmapped == 0
            assert seen - {0}, "the event loop was held for the whole message"

    run(main())


def test_a_gap_without_replay_clears_and_relearns() -> None:
    async def main() -> None:
        async with publisher() as pub, subscribed(pub) as (router, manager):
            first, second = tokens(2), tokens(2, start=5000)
            await pub.send(batch([stored([1, 2], first)]))
            await wait_until_async(lambda: matched(router, first) == 2)
            await pub.send(batch([stored([8], tokens(1, start=9))]), lost=True)
            await pub.send(batch([stored([3, 4], second)]))
            await wait_until_async(lambda: matched(router, second) == 2)
            assert matched(router, first) == 0  # dropped: the lost message may have evicted it
            snap = manager.snapshots()[0]
            # resets: the first message (seq 0: a fresh engine), then the gap
            assert (snap.gaps, snap.missing, snap.resets, snap.replays) == (1, 1, 2, 0)
            assert router.is_precise(E1)

    run(main())


def test_on_gap_keep_applies_on_top() -> None:
    config = KVEventsConfig(check_interval_s=60, on_gap="keep")

    async def main() -> None:
        async with publisher() as pub, subscribed(pub, config=config) as (router, manager):
            first, second = tokens(2), tokens(2, start=5000)
            await pub.send(batch([stored([1, 2], first)]))
            await pub.send(batch([removed([2])]), lost=True)
            await pub.send(batch([stored([3, 4], second)]))
            await wait_until_async(lambda: matched(router, second) == 2)
            assert matched(router, first) == 2  # the lost removal: stale until evicted
            snap = manager.snapshots()[0]
            assert (snap.gaps, snap.missing, snap.resets) == (1, 1, 1)  # the reset: seq 0

    run(main())


def test_a_block_stored_twice_is_held_until_removed_twice() -> None:
    """vLLM does not deduplicate blocks: one hash can be cached in two blocks."""
    router = Router.default()
    m = mapper(router)
    ids = tokens(2)
    apply(router, m, [stored([1, 2], ids)])
    apply(router, m, [stored([2], ids[16:], parent=1)])  # the last block, recomputed
    apply(router, m, [removed([2])])
    assert matched(router, ids) == 2
    apply(router, m, [removed([2])])
    assert matched(router, ids) == 1
    apply(router, m, [removed([2])])  # one removal too many: counted
    assert m.stats.unmapped == 1


def test_a_router_key_shared_by_two_engine_blocks_stays_until_both_are_removed() -> None:
    """Engine blocks of 32 under one parent whose first 16 tokens agree (a prompt's last block
    completed by different output tokens, as recorded on vLLM) share their first index key;
    so do a salted and an unsalted copy of one block at index block 32."""
    router = Router.default()
    m = mapper(router)
    root = tokens(2)  # one engine block of 32
    head = tokens(1, start=5000)
    left, right = head + tokens(1, start=7000), head + tokens(1, start=9000)
    apply(router, m, [stored([1], root, block_size=32)])
    apply(router, m, [stored([2], left, parent=1, block_size=32)])
    apply(router, m, [stored([3], right, parent=1, block_size=32)])
    apply(router, m, [removed([2])])
    assert matched(router, root + right) == 4
    assert matched(router, root + left) == 3  # the shared first half is still held
    apply(router, m, [removed([3])])
    assert matched(router, root + left) == 2 and matched(router, root + right) == 2
    apply(router, m, [stored([4], root, block_size=32)])  # another hash, the same keys
    apply(router, m, [removed([1])])
    assert matched(router, root) == 2
    apply(router, m, [removed([4])])
    assert matched(router, root) == 0 and not m.blocks
    m.check_invariants()


@pytest.mark.parametrize("layout", ["032", "old"])
def test_a_gap_is_repaired_by_replay(layout: str) -> None:
    async def main() -> None:
        async with (
            publisher(replay=True, replay_layout=layout) as pub,
            subscribed(pub) as (router, manager),
        ):
            ids = tokens(3)
            await pub.send(batch([stored([1], ids[:16])]))
            await pub.send(batch([stored([2], ids[16:32], parent=1)]), lost=True)
            await pub.send(batch([stored([3], ids[32:], parent=2)], shape="map"), lost=True)
            await pub.send(batch([removed([1])]), lost=True)
            await pub.send(batch([stored([1], ids[:16])]))
            await wait_until_async(lambda: stream_of(manager).last_seq == 4)
            assert matched(router, ids) == 3  # the replayed chain, then the re-store
            snap = manager.snapshots()[0]
            # replays: the catch-up on connecting, then the gap
            assert (snap.gaps, snap.missing, snap.replays, snap.replay_failures) == (1, 3, 2, 0)
            assert snap.resets == 1 and pub.replay_requests == 2  # resets: seq 0 only

    run(main())


@pytest.mark.parametrize("buffered_from", [0, 2])
def test_joining_mid_stream_learns_from_the_replay_buffer(buffered_from: int) -> None:
    async def main() -> None:
        async with publisher(replay=True) as pub:
            ids = tokens(4)
            for i in range(4):  # published before the subscriber came
                await pub.send(
                    batch([stored([i], ids[16 * i : 16 * i + 16], parent=i - 1 if i else None)]),
                    lost=True,
                )
            del pub.buffer[:buffered_from]  # the engine's buffer may have moved on
            async with subscribed(pub) as (router, manager):
                # learned on connecting, before any live message: an idle engine is precise
                assert router.is_precise(E1) and stream_of(manager).last_seq == 3
                await pub.send(batch([]))
                await wait_until_async(lambda: stream_of(manager).last_seq == 4)
                snap = manager.snapshots()[0]
                # from the start: the history replaces whatever the index held (a reset)
                resets = 1 if buffered_from == 0 else 0
                assert (snap.replays, snap.replay_failures, snap.resets) == (1, 0, resets)
                # from the start: the whole chain; else the blocks after unknown parents are lost
                assert matched(router, ids) == (4 if buffered_from == 0 else 0)
                assert snap.unmapped == (0 if buffered_from == 0 else 2)
                assert router.is_precise(E1)

    run(main())


@pytest.mark.parametrize("lost", [{3}, {3, 4, -1}, {-1}])
def test_a_replay_that_stops_short_is_asked_again_from_the_first_missing_batch(
    lost: set[int],
) -> None:
    """vLLM's replay ROUTER sends its whole buffer at once and drops what overflows its send
    queue (measured: 4,500 of a 10,000-batch buffer arrived): a hole or a missing end marker."""
    config = KVEventsConfig(check_interval_s=60, replay_timeout_s=0.2)

    async def main() -> None:
        async with publisher(replay=True) as pub:
            ids = tokens(6)
            for i in range(6):  # published before the subscriber came
                parent = i - 1 if i else None
                await pub.send(
                    batch([stored([i], ids[16 * i : 16 * i + 16], parent=parent)]), lost=True
                )
            pub.drop_once = set(lost)
            async with subscribed(pub, config=config) as (router, manager):
                assert router.is_precise(E1) and stream_of(manager).last_seq == 5
                assert matched(router, ids) == 6
                snap = manager.snapshots()[0]
                assert (snap.replays, snap.replay_failures, pub.replay_requests) == (1, 0, 2)

    run(main())


def test_stop_ends_a_replay_in_flight() -> None:
    """An engine that takes a replay request and never answers: stopping does not wait for
    `replay_timeout_s`, and leaves no task or socket behind."""
    config = KVEventsConfig(check_interval_s=60, replay_timeout_s=60)

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        mute = ctx.socket(zmq.ROUTER)
        mute.setsockopt(zmq.LINGER, 0)
        port = mute.bind_to_random_port("tcp://127.0.0.1")
        try:
            async with publisher() as pub:
                router = Router.default()
                replay = f"tcp://127.0.0.1:{port}"
                kv = KVEventSource.from_document(pub.source(replay_endpoint=replay), "kv")
                pool = EndpointPool([EndpointSpec("127.0.0.1:9", E1, frozenset([MODEL]), kv)])
                manager = KVEventsManager(router, pool, config)
                await manager.start()
                stream = stream_of(manager)
                await asyncio.wait_for(mute.recv_multipart(), 10)  # the catch-up's request
                assert stream._lock.locked() and stream.stats.replays == 1
                started = time.monotonic()
                await manager.stop()
                assert time.monotonic() - started < 5
                assert stream.sub is None and manager.ctx is None
                assert all(task.done() for task in stream.tasks)
                assert not router.is_precise(E1)
        finally:
            mute.close(linger=0)
            ctx.term()

    run(main())


def test_a_replay_that_cannot_fill_the_gap_clears() -> None:
    async def main() -> None:
        async with publisher(replay=True) as pub, subscribed(pub) as (router, manager):
            ids = tokens(2)
            await pub.send(batch([stored([1, 2], ids)]))
            await wait_until_async(lambda: matched(router, ids) == 2)
            await pub.send(batch([cleared()]), lost=True)
            pub.buffer.clear()  # the engine's replay buffer no longer holds it
            await pub.send(batch([stored([5], tokens(1, start=77))]))
            await wait_until_async(lambda: stream_of(manager).last_seq == 2)
            snap = manager.snapshots()[0]
            assert (snap.replays, snap.replay_failures, snap.resets) == (2, 1, 2)
            assert matched(router, ids) == 0

    run(main())


def test_an_engine_restart_clears_the_endpoint() -> None:
    async def main() -> None:
        async with publisher() as pub, subscribed(pub) as (router, manager):
            ids = tokens(2)
            for _ in range(3):
                await pub.send(batch([]))
            await pub.send(batch([stored([1, 2], ids)]))
            await wait_until_async(lambda: matched(router, ids) == 2)
            await pub.send(batch([]), seq=0)  # the sequence starts again
            await wait_until_async(lambda: stream_of(manager).stats.resets == 2)
            assert matched(router, ids) == 0 and not stream_of(manager).mapper.blocks
            assert router.is_precise(E1)

    run(main())


def test_malformed_frames_are_counted_and_the_subscriber_carries_on() -> None:
    config = KVEventsConfig(check_interval_s=60, max_message_bytes=4096)

    async def main() -> None:
        async with publisher() as pub, subscribed(pub, config=config) as (router, manager):
            await pub.pub.send_multipart([b"kv", b"\x00" * 8])  # two frames
            await pub.pub.send_multipart([b"kv", b"\x01", batch([])])  # a short seq
            await pub.send(b"\xc1 not msgpack")
            await pub.send(msgpack.packb({"ts": "then", "events": []}))
            await pub.send(batch([["BlockStored", list(range(500))]]))  # wrong shape
            await pub.send(batch([stored(list(range(400)), [0] * 6400)]))  # over 4 KiB
            ids = tokens(2)
            await pub.send(batch([stored([1, 2], ids)]))
            await wait_until_async(lambda: matched(router, ids) == 2)
            snap = manager.snapshots()[0]
            assert (snap.dropped, snap.malformed) == (3, 3)
            assert snap.resets == 2  # seq 0, then the oversized message's content is lost
            assert router.is_precise(E1)

    run(main())


def test_a_disconnect_demotes_and_a_reconnect_promotes_with_the_next_message() -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        pub = Publisher(ctx)
        port = pub.port
        try:
            async with subscribed(pub) as (router, manager):
                await pub.send(batch([stored([1], tokens(1))]))
                await wait_until_async(lambda: router.is_precise(E1))
                pub.pub.close(linger=0)
                await wait_until_async(lambda: not router.is_precise(E1))
                assert stream_of(manager).reason == "event stream disconnected"
                # unhealthy and back while the stream is down: maybe restarted, so cleared
                manager.on_health(E1, False)
                manager.on_health(E1, True)
                assert matched(router, tokens(1)) == 0 and stream_of(manager).stats.resets == 2
                pub.pub = ctx.socket(zmq.XPUB)
                pub.pub.setsockopt(zmq.XPUB_VERBOSE, 1)
                pub.pub.bind(f"tcp://127.0.0.1:{port}")
                await pub.subscribed()
                await wait_until_async(lambda: stream_of(manager).connected)
                assert not router.is_precise(E1)  # an idle engine: no message yet
                await pub.send(batch([]))
                await wait_until_async(lambda: router.is_precise(E1))
        finally:
            await pub.close()
            ctx.term()

    run(main())


class FreezingProxy:
    """A TCP relay on 127.0.0.1 that can stop relaying without closing anything: what a
    subscriber sees of an engine whose host vanished (no FIN, no RST: a half-open link)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if not self.frozen:
                    dst.write(data)
                    await dst.drain()

        with contextlib.suppress(OSError):
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()


def test_a_half_open_connection_is_dropped_by_heartbeats() -> None:
    """Without heartbeats a SUB socket never learns that a silent link is dead (it sends
    nothing the kernel could fail to deliver): the endpoint would stay precise for good."""
    config = KVEventsConfig(check_interval_s=0.1, silence_s=0.6)

    async def main() -> None:
        async with publisher() as pub:
            proxy = FreezingProxy(pub.port)
            await proxy.start()
            try:
                source = {"endpoint": f"tcp://127.0.0.1:{proxy.port}"}
                async with subscribed(pub, config=config, **source) as (router, manager):
                    await pub.send(batch([stored([1], tokens(1))]))
                    await wait_until_async(lambda: router.is_precise(E1))
                    proxy.frozen = True
                    await wait_until_async(lambda: not router.is_precise(E1), timeout_s=5)
                    assert stream_of(manager).reason == "event stream disconnected"
            finally:
                await proxy.close()

    run(main())


def test_health_and_silence_rules() -> None:
    now = [100.0]

    async def main() -> None:
        async with publisher() as pub, subscribed(pub) as (router, manager):
            manager.clock = lambda: now[0]
            stream = stream_of(manager)
            ids = tokens(1)
            await pub.send(batch([stored([1], ids)]))
            await wait_until_async(lambda: router.is_precise(E1))
            stream.check(now[0], busy=False)
            now[0] += 60  # idle and silent: an idle engine publishes nothing
            stream.check(now[0], busy=False)
            assert router.is_precise(E1)
            stream.check(now[0], busy=True)
            now[0] += 4.9
            stream.check(now[0], busy=True)
            assert router.is_precise(E1)
            now[0] += 0.2
            stream.check(now[0], busy=True)
            assert not router.is_precise(E1) and "silent" in stream.reason
            await pub.send(batch([]))
            await wait_until_async(lambda: router.is_precise(E1))
            manager.on_health(E1, False)
            assert not router.is_precise(E1) and stream.reason == "endpoint unhealthy"
            assert matched(router, ids) == 1  # kept while down (the router filters it)
            # back, and its event stream stayed connected all along: not a restart (a new
            # process drops the connection), e.g. a health check that timed out under load
            manager.on_health(E1, True)
            assert matched(router, ids) == 1 and stream.stats.resets == 1
            assert router.is_precise(E1)

    run(main())


def test_an_endpoint_serving_several_models_needs_kv_events_model() -> None:
    async def main() -> None:
        async with publisher() as pub:
            router = Router.default()

            def pool_of(**source: Any) -> EndpointPool:
                kv = KVEventSource.from_document(pub.source(**source), "kv_events")
                return EndpointPool(
                    [EndpointSpec("127.0.0.1:9", E1, frozenset(["a", "b"]), kv_events=kv)]
                )

            manager = KVEventsManager(router, pool_of(), KVEventsConfig(check_interval_s=60))
            await manager.start()
            try:
                await pub.subscribed()
                await pub.send(batch([stored([1], tokens(1))]))
                await wait_until_async(lambda: stream_of(manager).stats.messages == 1)
                assert not router.is_precise(E1)
                assert manager.modes()[E1]["reason"].startswith("model unknown")
                assert stream_of(manager).stats.unmapped == 1
            finally:
                await manager.stop()
            manager = KVEventsManager(router, pool_of(model="b"), KVEventsConfig())
            await manager.start()
            try:
                await pub.subscribed()
                await pub.send(batch([stored([1], tokens(1))]))
                await wait_until_async(lambda: router.is_precise(E1))
                keys = request_keys(router, tokens(1), "b")
                assert router.index.match(keys)[E1].blocks == 1
            finally:
                await manager.stop()

    run(main())


def test_a_removed_endpoint_is_unsubscribed_and_its_events_ignored(tmp_path: Path) -> None:
    async def main() -> None:
        async with publisher() as pub:
            file = tmp_path / "endpoints.yaml"
            entry = {"id": "e1", "address": "127.0.0.1:9", "models": [MODEL]}
            file.write_text(json.dumps([entry | {"kv_events": pub.source()}]))
            specs, files = read_endpoints([{"file": str(file)}])
            router = Router.default()
            pool = EndpointPool(
                specs, files=files, on_removed=lambda e: router.observe(EndpointRemoved(e))
            )
            manager = KVEventsManager(router, pool, KVEventsConfig(check_interval_s=60))
            await manager.start()
            try:
                await pub.subscribed()
                stream = stream_of(manager)
                ids = tokens(1)
                await pub.send(batch([stored([1], ids)]))
                await wait_until_async(lambda: matched(router, ids) == 1)
                file.write_text("[]")
                pool.reload_if_changed()
                assert pool.reload_if_changed() and len(pool) == 0
                await stream.apply_payload(batch([stored([2], tokens(1, start=3))]))  # a late one
                assert stream.stats.blocks_stored == 1
                manager.check_once()
                assert manager.streams == {} and manager.snapshots() == []
                await wait_until_async(lambda: stream.sub is None)
                assert matched(router, ids) == 0
            finally:
                await manager.stop()

    run(main())


def test_a_reloaded_endpoint_with_another_kv_events_address_starts_over(tmp_path: Path) -> None:
    """The old subscriber stops at once (a message it already holds is not applied, so it
    cannot make the endpoint precise again) and the entries it learned are dropped."""

    async def main() -> None:
        async with publisher() as old, publisher() as new:
            file = tmp_path / "endpoints.yaml"
            entry = {"id": "e1", "address": "127.0.0.1:9", "models": [MODEL]}
            file.write_text(json.dumps([entry | {"kv_events": old.source()}]))
            specs, files = read_endpoints([{"file": str(file)}])
            router = Router.default()
            pool = EndpointPool(specs, files=files)
            manager = KVEventsManager(router, pool, KVEventsConfig(check_interval_s=60))
            await manager.start()
            try:
                await old.subscribed()
                stream = stream_of(manager)
                ids = tokens(2)
                await old.send(batch([stored([1, 2], ids)]))
                await wait_until_async(lambda: router.is_precise(E1))
                file.write_text(json.dumps([entry | {"kv_events": new.source()}]))
                assert not pool.reload_if_changed() and pool.reload_if_changed()
                await stream._lock.acquire()  # the old subscriber: holding the next message
                await old.send(batch([stored([3], tokens(1, start=9))]))
                await wait_until_async(lambda: bool(stream._lock._waiters))
                stream._lock.release()  # it would go on with that message ...
                manager.check_once()  # ... but the source changed first
                await wait_until_async(lambda: stream.sub is None)  # the old one closed
                assert stream.stats.messages == 1 and not router.is_precise(E1)
                assert matched(router, ids) == 0 and stream_of(manager) is not stream
                await new.subscribed()
                await new.send(batch([stored([1, 2], ids)]))
                await wait_until_async(lambda: router.is_precise(E1))
                assert matched(router, ids) == 2
            finally:
                await manager.stop()

    run(main())


# -- through the drivers ------------------------------------------------------------------


def test_routing_service_health_and_metrics_show_the_mode(engines: list[str]) -> None:
    async def main() -> None:
        async with publisher() as pub:
            doc = {
                "endpoints": [
                    {"id": "e1", "address": engines[0], "kv_events": pub.source()},
                    {"id": "e2", "address": engines[1]},
                ],
                "kv_events": {"silence_s": 2.0},
            }
            service = RoutingService(DriverConfig.from_document(doc))
            await service.start_service(0.05)
            try:
                await pub.subscribed()
                status, body = service.health_report()
                assert status == 200
                assert body["kv_events"]["e1"]["mode"] == "approximate"
                # the fake engine lists one model: the blocks hash under it
                model = next(iter(service.pool.states()[0].models))
                ids = tokens(2)
                await pub.send(batch([stored([1, 2], ids)]))
                router = service.router
                await wait_until_async(lambda: router.is_precise(E1))
                keys = request_keys(router, ids, model)
                assert router.index.match(keys)[E1].blocks == 2
                _, body = service.health_report()
                assert body["kv_events"] == {"e1": {"mode": "precise", "reason": "events live"}}
                text = service.metrics.render()[0].decode()
                families = {f.name: f for f in text_string_to_metric_families(text)}
                assert [s.value for s in families["prefixroute_kv_events_precise"].samples] == [1]
                stored_ = families["prefixroute_kv_events_blocks_stored"].samples
                assert [(s.labels["endpoint"], s.value) for s in stored_] == [("e1", 2)]
                lag = families["prefixroute_kv_events_lag_seconds"].samples
                assert [s.value for s in lag if s.name.endswith("_count")] == [1]
            finally:
                await service.stop_service("test over")

    run(main())


def test_the_gateway_reports_precise_mode_in_health(engines: list[str]) -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    kv = {"endpoint": f"tcp://127.0.0.1:{port}", "topic": "kv"}
    doc = {"endpoints": [{"id": "e1", "address": engines[0], "kv_events": kv}]}
    try:
        with serve_in_thread(create_app(GatewayConfig.from_document(doc))) as url:
            assert pub.poll(10_000) and pub.recv()[:1] == b"\x01"
            before = httpx.get(f"{url}/health").json()
            assert before["kv_events"]["e1"]["mode"] == "approximate"
            pub.send_multipart([b"kv", (0).to_bytes(8, "big"), batch([])])
            wait_until(
                lambda: httpx.get(f"{url}/health").json()["kv_events"]["e1"]["mode"] == "precise",
                message="precise mode in /health",
            )
    finally:
        pub.close(linger=0)
        ctx.term()


def test_config_shape_and_errors() -> None:
    specs, _ = read_endpoints(
        [
            {
                "id": "e1",
                "address": "127.0.0.1:8001",
                "kv_events": {
                    "endpoint": "tcp://127.0.0.1:5557",
                    "topic": "kv",
                    "replay_endpoint": None,
                    "model": "tiny",
                },
            }
        ]
    )
    assert specs[0].kv_events == KVEventSource("tcp://127.0.0.1:5557", "kv", None, "tiny")
    for bad, path in [
        ({"endpoint": "http://x"}, "endpoints[0].kv_events.endpoint"),
        ({"endpoint": "tcp://*:5557"}, "endpoints[0].kv_events.endpoint"),
        ({"endpoint": "tcp://h:1", "colour": 1}, "endpoints[0].kv_events.colour"),
        ({"endpoint": "tcp://h:1", "replay_endpoint": 5}, "endpoints[0].kv_events.replay_endpoint"),
        ("tcp://h:1", "endpoints[0].kv_events"),
    ]:
        with pytest.raises(ConfigError) as info:
            read_endpoints([{"address": "127.0.0.1:8001", "kv_events": bad}])
        assert info.value.path == path
    for field, value in (("silence_s", 0), ("on_gap", "ignore"), ("receive_hwm", 0)):
        with pytest.raises(ConfigError) as info:
            DriverConfig.from_document({"kv_events": {field: value}})
        assert info.value.path == f"kv_events.{field}"
    assert DriverConfig.from_document({"kv_events": {"replay_timeout_s": 2}}).kv_events == (
        KVEventsConfig(replay_timeout_s=2.0)
    )


_WITHOUT_EVENTS = """
import sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("zmq", "msgpack"):
            raise ImportError(f"{name} is not installed in this test")

sys.meta_path.insert(0, Blocker())
"""


def test_the_drivers_run_without_the_events_extra(tmp_path: Path) -> None:
    """Without pyzmq and msgpack both drivers import and run; a config with `kv_events` is
    refused when it is read, with a one-line error (exit 2), not a traceback at start-up."""
    (tmp_path / "sitecustomize.py").write_text(_WITHOUT_EVENTS)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    script = textwrap.dedent(
        """
        import asyncio, sys
        import prefixroute.drivers.extproc, prefixroute.drivers.gateway
        from prefixroute.drivers.service import RoutingService
        from prefixroute.drivers.settings import DriverConfig

        async def main():
            plain = RoutingService(DriverConfig.from_document({"endpoints": []}))
            await plain.start_service(0.05)
            await plain.stop_service("done")

        asyncio.run(main())
        assert "zmq" not in sys.modules and "msgpack" not in sys.modules
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    config = tmp_path / "gateway.yaml"
    kv = {"endpoint": "tcp://127.0.0.1:9"}
    config.write_text(json.dumps({"endpoints": [{"address": "127.0.0.1:9", "kv_events": kv}]}))
    for driver in ("serve", "extproc"):
        result = subprocess.run(
            [sys.executable, "-m", "prefixroute.cli", driver, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == (
            f"prefixroute {driver}: endpoints[0].kv_events: needs the `events` extra: "
            "pip install 'prefixroute[events]' (pyzmq, msgpack)"
        )
