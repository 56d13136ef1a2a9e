"""Fixtures shared by the adapter tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from prefixroute.devtools.fake_engine import FakeEngineConfig, create_app
from tests.servers import serve_in_thread


@pytest.fixture(scope="module")
def engines() -> Iterator[list[str]]:
    """Two fake engines (no modelled waiting) as `host:port`, ids fake-a and fake-b."""
    with (
        serve_in_thread(create_app(FakeEngineConfig(engine_id="fake-a", time_scale=0.0))) as a,
        serve_in_thread(create_app(FakeEngineConfig(engine_id="fake-b", time_scale=0.0))) as b,
    ):
        yield [a.removeprefix("http://"), b.removeprefix("http://")]
