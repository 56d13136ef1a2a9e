"""`prefixroute.drivers.shared` against a real Redis (Debian's redis-server on 127.0.0.1).

No mock and no fakeredis: every test talks to a `redis-server` process
started by `prefixroute.devtools.redis` (`make redis` installs it). Tests
that pause, stop or restart the server get their own; the others share one
per module and keep apart by key prefix.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from prefixroute.admission import TokenBucketAdmission
from prefixroute.config import ConfigError
from prefixroute.decision import Rejection
from prefixroute.devtools.redis import RedisServer, require_redis, start_redis
from prefixroute.drivers.shared import SharedState, SharedStateConfig
from prefixroute.load import LoadTracker
from prefixroute.plugins import AdmissionContext
from prefixroute.request import Request

require_redis()  # a clear error naming `make redis` rather than a skip


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    srv = start_redis()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A server this test may pause, stop and restart."""
    srv = start_redis()
    try:
        yield srv
    finally:
        srv.close()


def config(url: str, **options: Any) -> SharedStateConfig:
    options.setdefault("key_prefix", f"t-{uuid.uuid4().hex[:8]}")
    return SharedStateConfig.for_url(url, **options)


async def started(cfg: SharedStateConfig, **kwargs: Any) -> SharedState:
    state = SharedState(cfg, **kwargs)
    assert await state.start(), state.reason
    return state


# -- (a) configuration ------------------------------------------------------------------


def test_absent_section_and_defaults() -> None:
    assert SharedStateConfig.from_document({}) is None
    cfg = SharedStateConfig.from_document({"shared_state": {"url": "redis://10.0.0.7/2"}})
    assert cfg is not None
    assert (cfg.host, cfg.port, cfg.db, cfg.tls_enabled) == ("10.0.0.7", 6379, 2, False)
    assert cfg.timeout_ms == 50 and cfg.sync_interval_ms == 100
    assert cfg.contribution_ttl_ms == 3000 and cfg.key_prefix == "prefixroute"
    assert cfg.share == {"load", "rate_limits", "fair_queue", "decisions"}
    assert cfg.replica_id  # hostname-pid


@pytest.mark.parametrize(
    ("section", "path", "words"),
    [
        ({}, "shared_state.url", "required"),
        ({"url": "http://h:1"}, "shared_state.url", "redis://"),
        ({"url": "redis://h/99"}, "shared_state.url", "0-15"),
        ({"url": "redis://h:1", "colour": 1}, "shared_state.colour", "unknown key"),
        ({"url": "redis://h:1", "timeout_ms": 0}, "shared_state.timeout_ms", "> 0"),
        ({"url": "redis://h:1", "timeout_ms": "fast"}, "shared_state.timeout_ms", "number"),
        (
            {"url": "redis://h:1", "sync_interval_ms": 500, "contribution_ttl_ms": 600},
            "shared_state.contribution_ttl_ms",
            ">= 1000",
        ),
        ({"url": "redis://h:1", "share": ["load", "cache"]}, "shared_state.share[1]", "one of"),
        ({"url": "redis://h:1", "share": ["load", "load"]}, "shared_state.share", "twice"),
        (
            {"url": "redis://h:1", "password_env": "A", "password_file": "b"},
            "shared_state.password_file",
            "not both",
        ),
        ({"url": "redis://h:1", "username": "app"}, "shared_state.username", "password_env"),
        ({"url": "redis://h:1", "tls": {}}, "shared_state.tls", "rediss://"),
        (
            {"url": "rediss://h:1", "tls": {"ca_file": "nope.pem"}},
            "shared_state.tls.ca_file",
            "no such",
        ),
        ({"url": "rediss://h:1", "tls": {"colour": 1}}, "shared_state.tls.colour", "unknown key"),
        ({"url": "redis://h:1", "replica_id": "a b"}, "shared_state.replica_id", "no spaces"),
        ({"url": "redis://h:1", "decisions_maxlen": 5}, "shared_state.decisions_maxlen", ">= 100"),
    ],
)
def test_config_errors_name_the_field(section: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        SharedStateConfig.from_document({"shared_state": section})
    assert info.value.path == path
    assert words in info.value.message


def test_a_password_in_the_url_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as info:
        SharedStateConfig.from_document({"shared_state": {"url": "redis://u:hunter2@h:1/0"}})
    assert info.value.path == "shared_state.url"
    assert "password_env" in info.value.message
    assert "hunter2" not in str(info.value)


def test_tls_files_are_relative_to_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    doc = {"shared_state": {"url": "rediss://h:1", "tls": {"ca_file": "ca.pem"}}}
    cfg = SharedStateConfig.from_document(doc, base_dir=tmp_path)
    assert cfg is not None and cfg.tls is not None
    assert cfg.tls.ca_file == tmp_path / "ca.pem"
    bad = {"shared_state": {"url": "rediss://h:1", "tls": {"cert_file": "ca.pem"}}}
    with pytest.raises(ConfigError, match="cert_file and key_file go together"):
        SharedStateConfig.from_document(bad, base_dir=tmp_path)


# -- (b) token buckets --------------------------------------------------------------------


def test_four_replicas_share_one_bucket_under_concurrent_load(server: RedisServer) -> None:
    """4 SharedStates x 4 tasks hammer two tenants for 1.5 s; each tenant is admitted at
    most burst + rate x window (Redis times), and close to it (the buckets were kept full)."""
    req_limits = (40.0, 10.0, None, 1.0)  # 40 req/s, burst 10
    tok_limits = (None, 1.0, 3000.0, 600.0)  # 3000 tokens/s, burst 600; 100 tokens a request
    cfg = config(server.url, timeout_ms=1000)

    async def run() -> dict[str, Any]:
        states = [
            await started(SharedStateConfig.for_url(server.url, **_same(cfg, replica_id=f"r{i}")))
            for i in range(4)
        ]
        stop = time.monotonic() + 1.5
        results: dict[str, list[tuple[int, float, bool]]] = {"r": [], "t": []}

        async def hammer(i: int, state: SharedState) -> None:
            while time.monotonic() < stop:
                for tenant, limits, cost in (("r", req_limits, 1.0), ("t", tok_limits, 100.0)):
                    got = await state.take_timed(tenant, 1.0, cost, limits)
                    assert got is not None, state.reason
                    results[tenant].append((i, got[2], got[0] == 0.0 and got[1] == 0.0))

        await asyncio.gather(*(hammer(i, s) for i, s in enumerate(states) for _ in range(4)))
        for s in states:
            await s.close()
        return results

    results = asyncio.run(run())
    for tenant, rate, burst, unit in (("r", 40.0, 10.0, 1.0), ("t", 3000.0, 600.0, 100.0)):
        calls = results[tenant]
        times = [t for _, t, _ in calls]
        window = max(times) - min(times)
        admitted = sum(ok for _, _, ok in calls) * unit
        bound = burst + rate * (window + 1e-6)
        print(
            f"tenant {tenant}: {len(calls)} calls over {window:.3f} s, admitted {admitted:g} "
            f"(bound {bound:.1f}, {admitted / bound:.3f} of it); beyond the burst "
            f"{(admitted - burst) / window / rate:.3f} x the limit"
        )
        assert admitted <= bound
        assert admitted >= 0.9 * bound - unit
        assert {i for i, _, ok in calls if ok} == {0, 1, 2, 3}  # every replica got a share


def _same(cfg: SharedStateConfig, **changes: Any) -> dict[str, Any]:
    """`cfg`'s section options (for `for_url`), with `changes`."""
    return {
        "key_prefix": cfg.key_prefix,
        "timeout_ms": cfg.timeout_ms,
        "sync_interval_ms": cfg.sync_interval_ms,
        "contribution_ttl_ms": cfg.contribution_ttl_ms,
        "decisions_maxlen": cfg.decisions_maxlen,
        **changes,
    }


def test_script_verdicts_agree_with_the_core_bucket(server: RedisServer) -> None:
    """The same requests at the same (Redis) times: the script and
    `TokenBucketAdmission.admit` admit the same ones and give the same waits."""
    policy = TokenBucketAdmission(
        requests_per_s=20.0, request_burst=3.0, tokens_per_s=400.0, token_burst=120.0
    )
    limits = policy.limits("acme")
    rng = random.Random(7)
    costs = [rng.choice([1, 10, 30, 60, 90, 121]) for _ in range(60)]  # 121 > the burst: 400

    async def run() -> list[tuple[float, float, float]]:
        state = await started(config(server.url, timeout_ms=1000))
        out = []
        for cost in costs:
            got = await state.take_timed("acme", 1.0, float(cost), limits)
            assert got is not None
            out.append(got)
            await asyncio.sleep(rng.choice([0.0, 0.002, 0.02, 0.06]))
        await state.close()
        return out

    verdicts = asyncio.run(run())
    admitted = refused = too_large = 0
    for cost, (wait_r, wait_t, now) in zip(costs, verdicts, strict=True):
        ctx = AdmissionContext(
            request=Request(model="m", prompt="x", tenant="acme", max_tokens=0),
            endpoints=(),
            now=now,
            prompt_tokens=cost,
            load=LoadTracker(),
            tenants=_NoTenants(),
        )
        core = policy.admit(ctx)
        if wait_r == 0.0 and wait_t == 0.0:
            assert core is None, (cost, now)
            admitted += 1
            continue
        assert isinstance(core, Rejection), (cost, now, wait_r, wait_t)
        if core.status == 400:
            too_large += 1
            assert wait_t == pytest.approx(120.0 / 400.0)
        else:
            refused += 1
            assert core.retry_after_s == pytest.approx(max(wait_r, wait_t), abs=1e-9)
    print(
        f"agreement on {len(costs)} requests: {admitted} admitted, {refused} 429, {too_large} 400"
    )
    assert admitted and refused and too_large


class _NoTenants:
    def in_flight(self, tenant: str) -> int:
        return 0


def test_unlimited_tenants_cost_no_round_trip(server: RedisServer) -> None:
    async def run() -> None:
        state = SharedState(config(server.url))  # never started: no client at all
        assert await state.take("free", 1.0, 500.0, (None, 1.0, None, 1.0)) == (0.0, 0.0)

    asyncio.run(run())


def test_bucket_key_expires_at_its_full_refill_time(server: RedisServer) -> None:
    cfg = config(server.url)

    async def run() -> None:
        state = await started(cfg)
        assert await state.take("x", 1.0, 0.0, (1.0, 5.0, None, 1.0)) == (0.0, 0.0)
        await state.close()

    asyncio.run(run())
    ttl_ms = redis.Redis(port=server.port).pttl(f"{cfg.key_prefix}:bucket:x")
    assert 500 < ttl_ms <= 1001  # one request of a 1/s bucket: 1 s to refill


# -- (c) load contributions, (d) VTC counters ---------------------------------------------


def test_contributions_are_seen_by_peers_and_expire(server: RedisServer) -> None:
    base = config(server.url, sync_interval_ms=50, contribution_ttl_ms=400)

    def replica(name: str) -> SharedState:
        return SharedState(SharedStateConfig.for_url(server.url, **_same(base, replica_id=name)))

    async def run() -> None:
        a, b, c = replica("a"), replica("b"), replica("c")
        for s in (a, b, c):
            assert await s.start()
        got_a = await a.sync({"e1": 3, "e2": 1, "e3": 0}, {"e1": 300, "e2": 40}, {})
        assert got_a is not None and got_a.peer_requests == {} and got_a.replicas == 1
        assert await c.sync({"e1": 1}, {"e1": 10}, {}) is not None
        got_b = await b.sync({"e1": 5}, {"e1": 500}, {})
        assert got_b is not None
        assert got_b.peer_requests == {"e1": 4, "e2": 1}  # a + c, b's own excluded
        assert got_b.peer_tokens == {"e1": 310, "e2": 40}
        assert got_b.replicas == 3
        # c leaves cleanly: gone at once; a just stops syncing (a crash): gone within the ttl
        await c.close()
        got_b = await b.sync({"e1": 5}, {"e1": 500}, {})
        assert got_b is not None and got_b.peer_requests == {"e1": 3, "e2": 1}
        stopped = time.monotonic()
        last: dict[str, Any] = {}

        async def poll() -> None:
            while True:
                got = await b.sync({"e1": 5}, {"e1": 500}, {})
                assert got is not None
                last["r"] = got
                if not got.peer_requests:
                    return
                await asyncio.sleep(0.02)

        await asyncio.wait_for(poll(), 3.0)
        gone_after = time.monotonic() - stopped
        print(
            f"a crashed replica's contribution vanished after {gone_after * 1000:.0f} ms (ttl 400)"
        )
        # not at once (the lower bound is loose: `stopped` is read a few awaits after a's
        # last sync), and within the TTL plus a busy machine's slack
        assert 0.1 < gone_after < 0.4 + 1.0
        assert last["r"].replicas == 1
        await a.close()
        await b.close()

    asyncio.run(run())


def test_vtc_charges_sum_across_replicas(server: RedisServer) -> None:
    base = config(server.url)

    async def run() -> None:
        a = await started(SharedStateConfig.for_url(server.url, **_same(base, replica_id="a")))
        b = await started(SharedStateConfig.for_url(server.url, **_same(base, replica_id="b")))
        got = await a.sync({}, {}, {"t1": 1.5})
        assert got is not None and got.vtc_counters == {"t1": 1.5}
        got = await b.sync({}, {}, {"t1": 2.25, "t2": 1.0, "t3": 0.0})
        assert got is not None and got.vtc_counters == {"t1": 3.75, "t2": 1.0}
        got = await a.sync({}, {}, {})
        assert got is not None and got.vtc_counters == {"t1": 3.75, "t2": 1.0}
        await a.close()
        await b.close()

    asyncio.run(run())


def test_parts_not_shared_are_neither_sent_nor_read(server: RedisServer) -> None:
    base = config(server.url)

    async def run() -> None:
        a = await started(SharedStateConfig.for_url(server.url, **_same(base, replica_id="a")))
        only = _same(base, replica_id="b", share=["rate_limits"])
        b = await started(SharedStateConfig.for_url(server.url, **only))
        assert await a.sync({"e1": 2}, {"e1": 9}, {"t": 1.0}) is not None
        got = await b.sync({"e1": 7}, {"e1": 70}, {"t": 5.0})
        assert got is not None and got.replicas == 2
        assert got.peer_requests == {} and got.vtc_counters == {}
        got = await a.sync({"e1": 2}, {"e1": 9}, {})
        assert got is not None and got.peer_requests == {} and got.vtc_counters == {"t": 1.0}
        assert await b.publish([b.record("e1", b"\0" * 8, 1.0)]) is None
        await a.close()
        await b.close()

    asyncio.run(run())


# -- (e) the decision stream ----------------------------------------------------------------


def test_decisions_reach_peers_not_their_author_and_the_stream_is_bounded(
    server: RedisServer,
) -> None:
    base = config(server.url, decisions_maxlen=100)

    async def run() -> None:
        a = await started(SharedStateConfig.for_url(server.url, **_same(base, replica_id="a")))
        b = await started(SharedStateConfig.for_url(server.url, **_same(base, replica_id="b")))
        assert await b.read_decisions() == []  # starts at the end of the stream
        keys = [bytes(range(i, i + 16)) for i in range(3)]
        assert await a.publish([a.record(f"e{i}", k, 30.0) for i, k in enumerate(keys)]) == 3
        assert await b.publish([b.record("e9", b"\1" * 8, 5.0)]) == 1
        got = await b.read_decisions()
        assert got is not None
        assert [(d.replica, d.endpoint, d.keys, d.ttl_s) for d in got] == [
            ("a", f"e{i}", k, 30.0) for i, k in enumerate(keys)
        ]
        assert got[1].key_array().tolist() == [
            int.from_bytes(keys[1][:8], "little"),
            int.from_bytes(keys[1][8:], "little"),
        ]
        assert await b.read_decisions() == []  # nothing new
        mine = await a.read_decisions()
        assert mine is not None and [d.replica for d in mine] == ["b"]
        for _ in range(10):
            await a.publish([a.record("e1", b"\0" * 8, 1.0) for _ in range(100)])
        assert len(await b.read_decisions() or []) <= 1000
        await a.close()
        await b.close()

    asyncio.run(run())
    length = redis.Redis(port=server.port).xlen(f"{base.key_prefix}:decisions")
    print(f"stream length after 1004 appends with decisions_maxlen 100: {length}")
    assert 100 <= length <= 300  # MAXLEN ~ trims whole nodes (100 entries each by default)


# -- (f) faults -------------------------------------------------------------------------------


LIMITS = (1000.0, 1000.0, None, 1.0)


async def _timed(coro: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    result = await coro
    return result, time.perf_counter() - t


def test_a_paused_redis_costs_at_most_the_timeout_then_nothing(own_server: RedisServer) -> None:
    cfg = config(own_server.url, timeout_ms=50, sync_interval_ms=100)

    async def run() -> None:
        state = await started(cfg)
        assert await state.sync({"e1": 1}, {"e1": 1}, {}) is not None
        own_server.pause()
        # concurrent calls in flight when Redis hangs: each bounded by the timeout
        firsts = await asyncio.gather(*(_timed(state.take("t", 1, 1, LIMITS)) for _ in range(20)))
        assert all(r is None for r, _ in firsts)
        worst = max(s for _, s in firsts)
        assert not state.up and state.down_since is not None
        assert state.reason == "no answer within 50 ms"
        # while down: answered locally at once, until the next probe
        fallbacks = state.fallbacks
        local, local_s = await _timed(state.take("t", 1, 1, LIMITS))
        synced, sync_s = await _timed(state.sync({"e1": 1}, {"e1": 1}, {"t": 2.0}))
        assert local is None and synced is None and state.fallbacks == fallbacks + 2
        await asyncio.sleep(0.12)  # past the retry interval: one probe, bounded again
        probe, probe_s = await _timed(state.take("t", 1, 1, LIMITS))
        assert probe is None
        print(
            f"paused Redis, timeout 50 ms: 20 concurrent calls returned None within "
            f"{worst * 1000:.1f} ms; while down {local_s * 1e6:.0f} us (take), "
            f"{sync_s * 1e6:.0f} us (sync); a probe {probe_s * 1000:.1f} ms"
        )
        assert worst < 0.05 + 0.25 and probe_s < 0.05 + 0.25  # a busy machine's slack
        assert local_s < 0.05 and sync_s < 0.05
        own_server.resume()
        await asyncio.sleep(0.12)
        assert not state.up  # nothing probes by itself: the next call does
        assert await state.take("t", 1, 1, LIMITS) == (0.0, 0.0)
        assert state.up
        await state.close()

    asyncio.run(run())


def test_charges_of_a_timed_out_sync_never_count_twice(own_server: RedisServer) -> None:
    """A SIGSTOPped Redis runs the queued sync on SIGCONT: its charges then count once."""
    cfg = config(own_server.url, timeout_ms=50, sync_interval_ms=100)

    async def run() -> None:
        state = await started(cfg)
        own_server.pause()
        assert await state.sync({}, {}, {"t": 1.0}) is None
        assert state.vtc_dropped == 1
        own_server.resume()
        got = None
        deadline = time.monotonic() + 5
        while got is None:
            assert time.monotonic() < deadline, state.reason
            await asyncio.sleep(0.05)
            got = await state.sync({}, {}, {})
        assert got.vtc_counters == {"t": 1.0}
        await state.close()

    asyncio.run(run())


def test_pause_resume_stop_restart(own_server: RedisServer) -> None:
    cfg = config(own_server.url, timeout_ms=50, sync_interval_ms=100)

    async def until_up(state: SharedState) -> float:
        t = time.perf_counter()
        while await state.take("t", 1, 1, LIMITS) is None:
            assert time.perf_counter() - t < 5, state.reason
            await asyncio.sleep(0.02)
        return time.perf_counter() - t

    async def run() -> None:
        state = await started(cfg)
        assert await state.take("t", 1, 1, LIMITS) == (0.0, 0.0)
        assert state.script_loads == 0  # loaded by start: no NOSCRIPT on a request's path
        own_server.pause()
        result, took = await _timed(state.take("t", 1, 1, LIMITS))
        assert result is None and not state.up
        own_server.resume()
        back = await until_up(state)
        assert state.up and state.down_since is None and state.reason is None
        got = await state.sync({"e1": 2}, {"e1": 20}, {"t": 1.0})
        assert got is not None and got.vtc_counters == {"t": 1.0}  # replies not mixed up
        print(f"paused: None after {took * 1000:.1f} ms; resumed: up after {back * 1000:.0f} ms")

        own_server.stop()
        result, refused_s = await _timed(state.take("t", 1, 1, LIMITS))
        assert result is None and not state.up and "Connection" in (state.reason or "")
        assert refused_s < 0.05 + 0.1
        fallbacks = state.fallbacks
        assert await state.sync({}, {}, {"t": 0.5}) is None  # kept: never sent
        assert state.fallbacks == fallbacks + 1
        own_server.start()  # same port, empty: no keys, no scripts
        back = await until_up(state)
        got = await state.sync({}, {}, {})
        assert got is not None and got.vtc_counters == {"t": 0.5}  # sent once Redis is back
        assert state.script_loads == 2  # take's and sync's scripts loaded again (NOSCRIPT)
        print(
            f"stopped: None after {refused_s * 1000:.1f} ms (refused); "
            f"restarted: up after {back * 1000:.0f} ms; fallbacks {state.fallbacks}"
        )
        await state.close()

    asyncio.run(run())


# -- (g) passwords and TLS -------------------------------------------------------------------


SECRET = "s3cr3t-" + uuid.uuid4().hex[:6]


@pytest.fixture(scope="module")
def locked() -> Iterator[RedisServer]:
    srv = start_redis(password=SECRET)
    try:
        yield srv
    finally:
        srv.close()


def test_password_from_the_environment(locked: RedisServer) -> None:
    async def run() -> None:
        cfg = config(locked.url, password_env="H4_REDIS_PASSWORD")
        state = await started(cfg, environ={"H4_REDIS_PASSWORD": SECRET})
        assert await state.take("t", 1, 1, LIMITS) == (0.0, 0.0)
        assert SECRET not in repr(state)
        await state.close()

    asyncio.run(run())


def test_password_from_a_file(locked: RedisServer, tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(SECRET + "\n")
    doc = {"shared_state": {"url": locked.url, "password_file": "pw"}}
    cfg = SharedStateConfig.from_document(doc, base_dir=tmp_path)
    assert cfg is not None and SECRET not in repr(cfg)

    async def run() -> None:
        state = await started(cfg)
        assert await state.sync({"e": 1}, {"e": 1}, {}) is not None
        await state.close()

    asyncio.run(run())


def test_a_wrong_password_marks_down_with_a_reason_free_of_secrets(
    locked: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong-" + SECRET

    async def run() -> SharedState:
        cfg = config(locked.url, password_env="PW")
        state = SharedState(cfg, environ={"PW": wrong})
        assert not await state.start()
        assert await state.take("t", 1, 1, LIMITS) is None  # answered locally
        return state

    with caplog.at_level(logging.INFO, logger="prefixroute.drivers.shared"):
        state = asyncio.run(run())
    assert not state.up and state.fallbacks >= 1
    assert state.reason is not None and "AuthenticationError" in state.reason
    assert "unavailable" in caplog.text and "AuthenticationError" in caplog.text
    for text in (caplog.text, state.reason, repr(state), repr(state.config)):
        assert wrong not in text and SECRET not in text


def test_no_password_against_a_locked_server_is_a_clear_reason(locked: RedisServer) -> None:
    async def run() -> SharedState:
        state = SharedState(config(locked.url))
        assert not await state.start()
        return state

    state = asyncio.run(run())
    assert "AuthenticationError" in (state.reason or "")


def test_a_missing_secret_is_a_config_error_at_start(tmp_path: Path) -> None:
    async def run(cfg: SharedStateConfig) -> None:
        await SharedState(cfg, environ={}).start()

    with pytest.raises(ConfigError, match="REDIS_PW is not set") as info:
        asyncio.run(run(config("redis://127.0.0.1:1", password_env="REDIS_PW")))
    assert info.value.path == "shared_state.password_env"
    missing = tmp_path / "absent"
    with pytest.raises(ConfigError, match="cannot read"):
        asyncio.run(run(config("redis://127.0.0.1:1", password_file=str(missing))))


def test_an_acl_user(tmp_path: Path) -> None:
    with_user = start_redis(password=SECRET, username="router")
    try:

        async def run() -> None:
            cfg = config(with_user.url, username="router", password_env="PW")
            state = await started(cfg, environ={"PW": SECRET})
            assert await state.take("t", 1, 1, LIMITS) == (0.0, 0.0)
            await state.close()
            anonymous = SharedState(config(with_user.url))
            assert not await anonymous.start()

        asyncio.run(run())
    finally:
        with_user.close()


def test_tls(tmp_path: Path) -> None:
    """Debian's redis-server is built with TLS: rediss:// with the test CA works; without
    trusting it the replica is down with an SSL reason."""
    secure = start_redis(tls=True)
    try:
        assert secure.tls is not None and secure.url.startswith("rediss://")

        async def run() -> None:
            tls = {"ca_file": str(secure.tls.ca_file)}  # type: ignore[union-attr]
            state = await started(config(secure.url, tls=tls, timeout_ms=1000))
            assert await state.take("t", 1, 1, LIMITS) == (0.0, 0.0)
            got = await state.sync({"e": 1}, {"e": 2}, {})
            assert got is not None
            await state.close()
            untrusted = SharedState(config(secure.url, timeout_ms=1000))
            assert not await untrusted.start()
            assert "SSL" in (untrusted.reason or "") or "certificate" in (untrusted.reason or "")

        asyncio.run(run())
    finally:
        secure.close()


def test_a_redis_that_never_answered_is_probed_no_more_than_every_sync_interval() -> None:
    """Nothing listens on the port: start says down, calls in between probes are local."""
    from prefixroute.devtools.live import free_port

    cfg = config(f"redis://127.0.0.1:{free_port()}/0", timeout_ms=50, sync_interval_ms=200)

    async def run() -> SharedState:
        state = SharedState(cfg)
        assert not await state.start()
        for _ in range(50):
            assert await state.take("t", 1, 1, LIMITS) is None
        return state

    state = asyncio.run(run())
    assert state.failures == 1 and state.fallbacks == 51
    assert math.isfinite(state.down_since or math.nan)
