"""Fixtures shared by the adapter tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from prefixroute.devtools.fake_engine import FakeEngineConfig, create_app
from tests.servers import serve_in_thread

# `PREFIXROUTE_FUZZ=long` (docs/fuzzing.md): fuzz tests multiply their own counts
# (tests.strategies.fuzz_settings); every other property test without an explicit
# count runs this profile's.
settings.register_profile(
    "long",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
if os.environ.get("PREFIXROUTE_FUZZ", "").strip().lower() == "long":
    settings.load_profile("long")


@pytest.fixture(scope="module")
def engines() -> Iterator[list[str]]:
    """Two fake engines (no modelled waiting) as `host:port`, ids fake-a and fake-b."""
    with (
        serve_in_thread(create_app(FakeEngineConfig(engine_id="fake-a", time_scale=0.0))) as a,
        serve_in_thread(create_app(FakeEngineConfig(engine_id="fake-b", time_scale=0.0))) as b,
    ):
        yield [a.removeprefix("http://"), b.removeprefix("http://")]
