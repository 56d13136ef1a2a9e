"""Block events applied per second by the KV-event driver, and its CPU, on one core.

    python -m benchmarks.kvevents_throughput [--requests N] [--engine-block-size 16]
        [--shape array|map] [--rate BLOCKS_PER_S] [--no-zmq]

A realistic vLLM stream, generated up front as the engine would publish it
(`StreamModel`): requests of a few tenants (a shared system prompt, a
unique tail, a decode), eight at a time; each scheduler step is one
message. A request's prefill is one `BlockStored` of its blocks the cache
lacks (parent: its last cached block), its decode one single-block
`BlockStored` per filled block, and the engine's LRU cache (`--capacity`
blocks) evicts with one single-hash `BlockRemoved` per block, as vLLM's
block pool does. Three measurements:

1. applied in process: `_Stream.apply_payload` per message (msgpack decode,
   the mapper with `Blocker.hash_tokens`, `Router.observe` on a router
   whose index holds the endpoint): block events per second of CPU;
2. over ZMQ: a publisher process sends the stream as fast as it can to a
   subscriber (`KVEventsManager` on this process's event loop) over
   127.0.0.1; block events per second received and applied, and the
   subscriber process's CPU seconds per million block events;
3. with `--rate`, the same paced at that many block events per second:
   the subscriber's CPU as a share of one core;
4. with `--stretch`, the longest the subscriber holds its event loop while
   a burst of 10,000 single-block stores (or removals) arrives over ZMQ as
   fast as a publisher thread sends it, 1 to 10,000 events per message: a
   probe task measures every gap between two of its turns (wall clock, and
   the loop thread's CPU time, which leaves out the OS preempting the
   process on a shared machine), and how many full (generation 2) garbage
   collections ran meanwhile (they stop the whole process).

Block events = blocks stored + blocks removed. The machine is shared and
noisy: quote the best of a few runs, compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import random
import threading
import time
from collections import OrderedDict
from typing import Any

import msgpack
import zmq

from prefixroute.drivers.kvevents import KVEventsConfig, KVEventsManager, KVEventSource, _Stream
from prefixroute.drivers.pool import EndpointPool, EndpointSpec
from prefixroute.endpoint import EndpointId
from prefixroute.router import Router

EP = EndpointId("e1")
MODEL = "m"


class StreamModel:
    """The messages an engine with an LRU prefix cache publishes for a workload (module doc)."""

    def __init__(
        self,
        *,
        requests: int,
        block_size: int,
        capacity: int,
        shape: str,
        tenants: int = 20,
        system_blocks: int = 32,
        tail_blocks: tuple[int, int] = (4, 48),
        decode_blocks: tuple[int, int] = (1, 16),
        concurrency: int = 8,
        seed: int = 1,
    ) -> None:
        self.rng = random.Random(seed)
        self.bs = block_size
        self.capacity = capacity
        self.shape = shape
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.next_hash = 1
        self.systems = [self.tokens(system_blocks) for _ in range(tenants)]
        self.messages: list[bytes] = []
        self.stored = self.removed = 0
        self.prefill_blocks = self.decode_blocks_n = 0
        self.prefill_events = self.decode_events = self.remove_events = 0
        self.system_hashes: list[list[int | None]] = [
            [None] * system_blocks for _ in range(tenants)
        ]
        for start in range(0, requests, concurrency):
            group = range(start, min(start + concurrency, requests))
            step: list[Any] = []
            decodes: list[tuple[int, list[int]]] = []  # (last block hash, decode tokens)
            for _ in group:
                tenant = self.rng.randrange(tenants)
                last = self.prefill(tenant, self.tokens(self.rng.randint(*tail_blocks)), step)
                n = self.rng.randint(*decode_blocks)
                decodes.append((last, self.tokens(n)))
            self.emit(step)
            for i in range(max(len(d[1]) for d in decodes) // self.bs):
                step = []
                for d_i, (parent, toks) in enumerate(decodes):
                    if (i + 1) * self.bs <= len(toks):
                        block = toks[i * self.bs : (i + 1) * self.bs]
                        h = self.store([block], parent, step)[-1]
                        decodes[d_i] = (h, toks)
                        self.decode_blocks_n += 1
                        self.decode_events += 1
                self.emit(step)

    def tokens(self, n_blocks: int) -> list[int]:
        return [self.rng.randrange(150_000) for _ in range(n_blocks * self.bs)]

    def prefill(self, tenant: int, tail: list[int], step: list[Any]) -> int:
        """Store what the cache lacks of the tenant's system prompt, then the tail."""
        known = self.system_hashes[tenant]
        parent: int | None = None
        cached = 0
        for h in known:
            if h is None or h not in self.cache:
                break
            self.cache.move_to_end(h)
            parent, cached = h, cached + 1
        system = self.systems[tenant]
        new = system[cached * self.bs :] + tail
        hashes = self.store(
            [new[i : i + self.bs] for i in range(0, len(new), self.bs)], parent, step
        )
        known[cached:] = hashes[: len(known) - cached]
        self.prefill_blocks += len(hashes)
        self.prefill_events += 1
        return hashes[-1]

    def store(self, blocks: list[list[int]], parent: int | None, step: list[Any]) -> list[int]:
        hashes = list(range(self.next_hash, self.next_hash + len(blocks)))
        self.next_hash += len(blocks)
        for h in hashes:
            self.cache[h] = None
        self.stored += len(blocks)
        while len(self.cache) > self.capacity:
            old, _ = self.cache.popitem(last=False)
            step.append(self.event("BlockRemoved", [old]))
            self.removed += 1
            self.remove_events += 1
        tokens = [t for b in blocks for t in b]
        step.append(self.event("BlockStored", hashes, parent, tokens))
        return hashes

    def event(
        self,
        kind: str,
        hashes: list[int],
        parent: int | None = None,
        tokens: list[int] | None = None,
    ) -> Any:
        if self.shape == "map":
            if kind == "BlockRemoved":
                return {"type": kind, "block_hashes": hashes, "medium": "GPU"}
            return {
                "type": kind,
                "block_hashes": hashes,
                "parent_block_hash": parent,
                "token_ids": tokens,
                "block_size": self.bs,
                "lora_id": None,
                "medium": "GPU",
                "lora_name": None,
            }
        if kind == "BlockRemoved":
            return [kind, hashes, "GPU"]
        return [kind, hashes, parent, tokens, self.bs, None, "GPU"]

    def emit(self, events: list[Any]) -> None:
        if events:
            self.messages.append(msgpack.packb([time.time(), events, 0]))

    @property
    def block_events(self) -> int:
        return self.stored + self.removed


def subscriber_parts(capacity: int, endpoint: str = "tcp://127.0.0.1:1") -> tuple[Router, Any]:
    router = Router.default()
    router.index.set_capacity(EP, capacity)
    spec = EndpointSpec(
        address="127.0.0.1:9",
        id=EP,
        models=frozenset([MODEL]),
        kv_events=KVEventSource(endpoint=endpoint),
    )
    pool = EndpointPool([spec])
    manager = KVEventsManager(router, pool, KVEventsConfig(check_interval_s=3600))
    return router, manager


def in_process(model: StreamModel, capacity: int, rounds: int) -> float:
    """Best block events per CPU second over `rounds` replays of the stream."""

    async def once() -> float:
        _router, manager = subscriber_parts(capacity)
        stream = _Stream(manager, EP, KVEventSource("tcp://127.0.0.1:1"), MODEL, capacity * 2)
        stream.connected = True
        t0 = time.process_time()
        for seq, payload in enumerate(model.messages):
            stream.last_seq = seq
            stream.fresh_connection = False
            await stream.apply_payload(payload)
        cpu = time.process_time() - t0
        assert stream.stats.malformed == 0 and stream.stats.unmapped == 0, stream.snapshot()
        return model.block_events / cpu

    return max(asyncio.run(once()) for _ in range(rounds))


def publish(
    port: int, messages: list[bytes], rate: float, per_message: list[int], ready: Any, go: Any
) -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(f"tcp://127.0.0.1:{port}")
    pub.recv()  # the subscription
    ready.set()
    go.wait()
    start = time.perf_counter()
    sent_blocks = 0
    for seq, payload in enumerate(messages):
        pub.send_multipart([b"kv", seq.to_bytes(8, "big"), payload])
        if rate:
            sent_blocks += per_message[seq]
            ahead = sent_blocks / rate - (time.perf_counter() - start)
            if ahead > 0:
                time.sleep(ahead)
    time.sleep(0.5)
    pub.close(linger=1000)
    ctx.term()


def over_zmq(model: StreamModel, capacity: int, rate: float) -> tuple[float, float, float]:
    """(block events/s wall, CPU s per million block events, CPU share of one core)."""
    sock = zmq.Context.instance().socket(zmq.PUSH)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sock.close()
    per_message = []  # block events per message, for pacing
    for payload in model.messages:
        events = msgpack.unpackb(payload)[1]
        per_message.append(
            sum(len(e[1] if isinstance(e, list) else e["block_hashes"]) for e in events)
        )

    async def run() -> tuple[float, float, float]:
        _router, manager = subscriber_parts(capacity, f"tcp://127.0.0.1:{port}")
        ctx = multiprocessing.get_context("spawn")
        ready, go = ctx.Event(), ctx.Event()
        child = ctx.Process(
            target=publish, args=(port, model.messages, rate, per_message, ready, go)
        )
        child.start()
        await manager.start()
        stream = manager.streams[EP]
        while not ready.is_set():
            await asyncio.sleep(0.01)
        t0, c0 = time.perf_counter(), time.process_time()
        go.set()
        last = len(model.messages) - 1
        while stream.last_seq != last:
            await asyncio.sleep(0.05)
            if time.perf_counter() - t0 > 300:
                raise RuntimeError("the subscriber fell behind for good")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        snap = stream.snapshot()
        await manager.stop()
        child.join()
        assert snap.gaps == 0 and snap.malformed == 0, snap
        return model.block_events / wall, cpu / model.block_events * 1e6, cpu / wall

    return asyncio.run(run())


def longest_stretch(kind: str, per_message: int, n: int = 10_000) -> tuple[float, float, int]:
    """(longest wall s, longest loop-thread CPU s, full GCs) over one burst (module doc, 4)."""
    stores = [  # one chain of single-block stores
        {"type": "BlockStored", "block_hashes": [i], "parent_block_hash": i - 1 if i else None}
        | {"token_ids": list(range(16 * i, 16 * i + 16)), "block_size": 16, "medium": "GPU"}
        for i in range(n)
    ]
    events = stores
    if kind == "remove":
        events = [{"type": "BlockRemoved", "block_hashes": [i], "medium": "GPU"} for i in range(n)]
    messages = [
        msgpack.packb([time.time(), events[i : i + per_message], 0])
        for i in range(0, n, per_message)
    ]
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    full = [0]

    def count_full(phase: str, info: dict[str, int]) -> None:
        full[0] += phase == "start" and info["generation"] == 2

    async def run() -> tuple[float, float, int]:
        _router, manager = subscriber_parts(8192, f"tcp://127.0.0.1:{port}")
        await manager.start()
        stream = manager.streams[EP]
        await asyncio.to_thread(pub.recv)  # the subscription
        stats = stream.stats
        first = 0
        if kind == "remove":  # something to remove: the same blocks, stored beforehand
            pub.send_multipart([b"kv", bytes(8), msgpack.packb([time.time(), stores, 0])])
            while stats.blocks_stored < n:
                await asyncio.sleep(0.001)
            first = 1
        gaps: list[tuple[float, float]] = []
        done = False

        async def probe() -> None:
            while not done:
                t, c = time.perf_counter(), time.thread_time()
                await asyncio.sleep(0)
                gaps.append((time.perf_counter() - t, time.thread_time() - c))

        def send() -> None:
            for seq, payload in enumerate(messages, first):
                pub.send_multipart([b"kv", seq.to_bytes(8, "big"), payload])

        target = stats.blocks_stored + stats.blocks_removed + n
        gc.callbacks.append(count_full)
        prober = asyncio.create_task(probe())
        sender = threading.Thread(target=send)
        sender.start()
        while stats.blocks_stored + stats.blocks_removed < target:
            await asyncio.sleep(0.001)
        done = True
        await prober
        gc.callbacks.remove(count_full)
        sender.join()
        await manager.stop()
        assert stats.gaps == 0 and stats.malformed == 0 and stats.unmapped == 0
        return max(g[0] for g in gaps), max(g[1] for g in gaps), full[0]

    try:
        return asyncio.run(run())
    finally:
        pub.close(linger=0)
        ctx.term()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--engine-block-size", type=int, default=16)
    parser.add_argument("--capacity", type=int, default=8192, help="engine cache, blocks")
    parser.add_argument("--shape", choices=["array", "map"], default="map")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=0.0, help="paced run, block events/s")
    parser.add_argument("--no-zmq", action="store_true")
    parser.add_argument("--stretch", action="store_true", help="the event loop's longest stretch")
    args = parser.parse_args()
    if args.stretch:
        print(f"{'burst of 10,000':<16} {'per message':>11} {'wall ms':>8} {'CPU ms':>7} full GCs")
        for kind in ("store", "remove"):
            for per in (1, 10, 100, 1000, 10_000):
                runs = [longest_stretch(kind, per) for _ in range(args.rounds)]
                wall, cpu, full = min(runs, key=lambda r: r[1])
                print(f"{kind:<16} {per:>11,} {wall * 1e3:>8.1f} {cpu * 1e3:>7.1f} {full:>8}")
        return
    t0 = time.perf_counter()
    model = StreamModel(
        requests=args.requests,
        block_size=args.engine_block_size,
        capacity=args.capacity,
        shape=args.shape,
    )
    print(
        f"stream: {len(model.messages):,} messages, {model.block_events:,} block events "
        f"({model.prefill_blocks:,} prefill blocks in {model.prefill_events:,} events, "
        f"{model.decode_blocks_n:,} decode blocks, {model.removed:,} removals), "
        f"engine block size {args.engine_block_size}, {args.shape}-shaped events "
        f"(made in {time.perf_counter() - t0:.1f} s)"
    )
    print(f"{'measurement':<44} {'block events/s':>16} {'CPU us/event':>13} {'core':>6}")
    rate = in_process(model, args.capacity, args.rounds)
    print(
        f"{'applied in process (decode+map+observe)':<44} {rate:>16,.0f} "
        f"{1e6 / rate:>13.2f} {'1.00':>6}"
    )
    if not args.no_zmq:
        wall_rate, cpu_per, share = over_zmq(model, args.capacity, 0.0)
        print(
            f"{'over ZMQ, as fast as sent':<44} {wall_rate:>16,.0f} {cpu_per:>13.2f} {share:>6.2f}"
        )
        if args.rate:
            wall_rate, cpu_per, share = over_zmq(model, args.capacity, args.rate)
            print(
                f"{f'over ZMQ, paced at {args.rate:,.0f}/s':<44} {wall_rate:>16,.0f} "
                f"{cpu_per:>13.2f} {share:>6.2f}"
            )


if __name__ == "__main__":
    main()
