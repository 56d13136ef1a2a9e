"""Tests 1 and 2 of issue 13: precise mode on real engines is exact; approximate mode's error.

Two real vLLM engines (128 blocks of 32 tokens each) behind the real gateway
(`benchmarks.engine_truth`: the gateway's app in a thread, its router read
on its own loop), one deterministic workload of 120 multi-tenant chats
(16 tenants, 440-700-token system prompts: more than the two caches hold,
so the engines evict), sent one at a time.

Precise mode (every endpoint's `kv_events` on, the index block = the engine
block = 32 tokens): each request is sent once the previous one's events are
applied (the tap, a second subscriber, says which sequence number the engine
reached), so the prediction is compared with the engine's report for the
same cache state; the event lag is measured apart (docs/real-engine.md).
Then the index's entries per endpoint must be exactly the blocks the engine
holds, as a second subscriber replays them from the same events, keyed the
way a request with that block's token prefix is keyed.

Approximate mode (no events) on the same workload: its error is measured and
printed, and must not beat precise mode's; it is not asserted to be small.
"""

from __future__ import annotations

import pytest
from benchmarks.engine_truth import HEADER, Chat, Run, run_policy, summarise

from prefixroute.devtools.vllm import Engine, EventTap

pytestmark = pytest.mark.engine


def _misses(run: Run) -> list[tuple[int, str, int, int]]:
    return [
        (s.index, s.endpoint, s.predicted, s.cached) for s in run.served if s.predicted != s.cached
    ]


def test_precise_predictions_equal_the_engines_cached_tokens(precise_run: Run) -> None:
    summary = summarise(precise_run)
    assert summary.failed == 0
    assert summary.cached > 0
    assert all(count > 0 for count in summary.per_endpoint.values())
    assert len(summary.per_endpoint) == 2
    # the workload forced eviction: the engines removed blocks
    assert all(sub["blocks_removed"] > 0 for sub in precise_run.subscriber)
    assert all(sub["precise"] for sub in precise_run.subscriber)
    assert _misses(precise_run) == []


def test_precise_index_holds_exactly_the_blocks_the_engines_hold(precise_run: Run) -> None:
    assert len(precise_run.holdings) == 2
    for held in precise_run.holdings:
        assert held.unkeyed == 0, held
        assert held.engine_blocks > 100, held  # full caches after the workload
        assert held.speculative == 0, held
        assert (held.missing, held.index_entries) == (0, held.engine_blocks), held


def test_precise_event_lag_is_measured(precise_run: Run) -> None:
    assert precise_run.lag_s is not None and 0 <= precise_run.lag_s < 1.0
    assert precise_run.tap_lag_s is not None


def test_precise_with_the_gateways_tokenizer_on_chat_requests(
    vllm_engines: list[Engine], vllm_taps: list[EventTap], chats: list[Chat]
) -> None:
    """The same as chat completions: the gateway renders and tokenizes (docs/tokens.md)."""
    pytest.importorskip("prefixroute.drivers.tokens")
    run = run_policy(vllm_engines, vllm_taps, chats[:60], "precise", form="chat")
    summary = summarise(run)
    assert summary.failed == 0
    assert summary.cached > 0
    assert _misses(run) == []
    for held in run.holdings:
        assert (held.missing, held.index_entries) == (0, held.engine_blocks), held


def test_approximate_mode_error_is_measured(
    vllm_engines: list[Engine],
    vllm_taps: list[EventTap],
    chats: list[Chat],
    chat_ids: list[list[int]],
    precise_run: Run,
    capsys: pytest.CaptureFixture[str],
) -> None:
    approximate = run_policy(vllm_engines, vllm_taps, chats, "approximate", ids=chat_ids)
    ours, theirs = summarise(precise_run), summarise(approximate)
    with capsys.disabled():
        print(f"\nreal engines, {len(chats)} requests (docs/real-engine.md)\n{HEADER}")
        print(ours.row())
        print(theirs.row())
    assert theirs.failed == 0
    assert theirs.cached > 0
    assert ours.abs_error <= theirs.abs_error
