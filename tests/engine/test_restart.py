"""Test 3 of issue 13: an engine killed (its whole process group) and restarted mid-run.

Precise mode over the two real engines, the session's workload sent one
request at a time: after 40 requests engine-1's process group is killed
(SIGKILL: the API server and its EngineCore, as a crash would) and started
again on the same ports in a thread, while requests keep coming. Then:

- no request is lost: every answer is a 200 (the gateway's connection
  failure marks engine-1 unhealthy and retries on a fallback);
- while it is down everything is served by engine-0;
- the index forgets engine-1's blocks: when the gateway sees it healthy
  again, before any request reaches it, it has no index entry (its
  restarted engine holds nothing);
- routing returns to it: later requests are served by engine-1 too.

The restarted engine replaces the old one in the session's list, so the
session fixture stops it at the end.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from benchmarks.engine_truth import (
    Chat,
    Served,
    endpoint_id,
    gateway_document,
    gateway_thread,
    reset_caches,
    send,
    wait_applied,
    wait_precise,
)

from prefixroute.devtools.vllm import Engine, EventTap, kill_engine, restart_engine
from tests.servers import wait_until

pytestmark = pytest.mark.engine

BEFORE = 40  # requests before the kill
PACE_S = 0.2  # between requests while engine-1 restarts (20-60 s)
AFTER = 80  # at most this many requests after it is back, until one reaches it


def test_a_killed_and_restarted_engine_loses_no_request_and_gets_traffic_again(
    vllm_engines: list[Engine],
    vllm_taps: list[EventTap],
    chats: list[Chat],
    chat_ids: list[list[int]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    reset_caches(vllm_engines)
    doc = gateway_document(vllm_engines, "precise")
    taps = {endpoint_id(i): tap for i, tap in enumerate(vllm_taps)}
    served: list[Served] = []
    n = 0

    with gateway_thread(doc) as gw, httpx.Client(timeout=120) as client:
        router = gw.gateway.router

        def one(sync: bool = True) -> Served:
            nonlocal n
            i = n % len(chats)
            answer = send(client, gw.url, chats[i], chat_ids[i], n)
            n += 1
            served.append(answer)
            if sync:
                wait_applied(gw, taps, answer)
            return answer

        def healthy(eid: str) -> bool:
            states = gw.call(lambda: gw.gateway.pool.states())
            return any(s.id == eid and s.healthy for s in states)

        wait_precise(gw, vllm_engines)
        for _ in range(BEFORE):
            one()
        assert gw.call(lambda: router.index.size("engine-1")) > 0

        kill_engine(vllm_engines[1])
        vllm_taps[1].clear()  # the dead engine's frames: the restarted one counts from 0 again
        restarted: list[Engine] = []
        failure: list[BaseException] = []

        def restart() -> None:
            try:
                restarted.append(restart_engine(vllm_engines[1]))
            except BaseException as exc:  # reported by the test thread
                failure.append(exc)

        thread = threading.Thread(target=restart, daemon=True)
        killed_at = time.monotonic()
        thread.start()
        down = len(served)
        while thread.is_alive():
            one(sync=False)
            time.sleep(PACE_S)
        thread.join()
        restart_s = time.monotonic() - killed_at
        assert not failure, failure
        vllm_engines[1] = restarted[0]
        outage = served[down:]
        assert len(outage) >= 10
        assert [s.status for s in outage] == [200] * len(outage)
        assert {s.endpoint for s in outage} == {"engine-0"}

        wait_until(lambda: healthy("engine-1"), timeout_s=20, message="engine-1 healthy again")
        assert gw.call(lambda: router.index.size("engine-1")) == 0  # forgotten

        back = len(served)
        while len(served) - back < AFTER and served[-1].endpoint != "engine-1":
            one()
        after = served[back:]
        assert [s.status for s in after] == [200] * len(after)
        assert any(s.endpoint == "engine-1" for s in after)
    assert [s.status for s in served] == [200] * len(served)
    with capsys.disabled():
        print(
            f"\nrestart (docs/real-engine.md): engine-1 killed after {BEFORE} requests, "
            f"healthy again "
            f"{restart_s:.1f} s later; {len(outage)} requests meanwhile, all 200 from engine-0; "
            f"engine-1 served again after {len(after)} more; {len(served)} requests, 0 lost"
        )
