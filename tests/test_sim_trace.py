"""Mooncake-format trace replay (`prefixroute.sim.trace`)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from prefixroute.sim.schema import Fields, ScenarioError
from prefixroute.sim.source import SimRequest
from prefixroute.sim.tokenizer import synthetic_tokens
from prefixroute.sim.trace import PAD_KEY_BASE, TraceSource
from prefixroute.sim.workload_schema import build_workload

MOONCAKE = Path("/work/shared/data/traces/mooncake-conversation.jsonl")
needs_mooncake = pytest.mark.skipif(not MOONCAKE.exists(), reason="shared trace not present")


def write(tmp_path: Path, *lines: Any, name: str = "t.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n",
        encoding="utf-8",
    )
    return path


def rec(ts: float, n_in: Any, n_out: Any, ids: list[Any]) -> dict[str, Any]:
    return {"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": ids}


def tokens(sim: SimRequest) -> np.ndarray[Any, Any]:
    assert sim.request.token_ids is not None
    return sim.request.token_ids


@needs_mooncake
def test_the_mooncake_conversation_trace() -> None:
    source = TraceSource(MOONCAKE, model="m")
    assert len(source) == 12_031
    sims = list(source.arrivals())
    assert len(sims) == 12_031
    first = [json.loads(line) for line in MOONCAKE.open(encoding="utf-8").readlines()[:3]]
    a, b, c = sims[:3]
    for sim, raw in zip((a, b, c), first, strict=True):
        assert len(tokens(sim)) == raw["input_length"]
        assert sim.output_tokens == raw["output_length"] == sim.request.max_tokens
        assert (sim.kind, sim.user, sim.request.tenant, sim.request.prompt) == (
            "trace",
            None,
            "default",
            None,
        )
        assert sim.output_token_ids is None
    # hash_ids [0, 1, ...] and [0, 14, ...]: exactly the first block is shared.
    assert np.array_equal(tokens(a)[:512], synthetic_tokens(0, 512))
    assert np.array_equal(tokens(a)[:512], tokens(b)[:512])
    assert (tokens(a)[512:1024] != tokens(b)[512:1024]).mean() > 0.99
    assert np.array_equal(tokens(a)[512:1024], synthetic_tokens(1, 512))
    times = [s.arrival_s for s in sims]
    assert times == sorted(times)
    assert times[-1] == pytest.approx(3536.999)


@needs_mooncake
def test_time_scale_and_duration() -> None:
    source = TraceSource(MOONCAKE, model="m", time_scale=0.5, duration_s=100.0)
    times = [s.arrival_s for s in source.arrivals()]
    assert times[-1] < 100.0
    full = TraceSource(MOONCAKE, model="m")
    expected = [s.arrival_s * 0.5 for s in full.arrivals() if s.arrival_s * 0.5 < 100.0]
    assert times == pytest.approx(expected)


def test_last_block_is_cut_and_short_hash_lists_are_padded(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        rec(0, 700, 3, [5, 6]),  # cut: 512 + 188
        rec(1, 1100, 0, [5, 6]),  # padded with 76 tokens unique to the request
        rec(2, 1100, 9, [5, 6]),
        rec(3, 10, 1, []),  # all padding
    )
    sims = list(TraceSource(path, model="m").arrivals())
    a, b, c, d = (tokens(s) for s in sims)
    assert [len(a), len(b), len(c), len(d)] == [700, 1100, 1100, 10]
    assert np.array_equal(a, np.concatenate((synthetic_tokens(5, 512), synthetic_tokens(6, 188))))
    assert np.array_equal(b[:1024], c[:1024])
    assert np.array_equal(b[:700], a)
    assert np.array_equal(b[1024:], synthetic_tokens(PAD_KEY_BASE + 1, 76))
    assert (b[1024:] != c[1024:]).all()
    assert [s.output_tokens for s in sims] == [3, 1, 9, 1]  # output_length 0 -> 1


def test_block_size_is_configurable(tmp_path: Path) -> None:
    path = write(tmp_path, rec(0, 40, 3, [5, 6, 7]))
    (sim,) = TraceSource(path, model="m", block_tokens=16).arrivals()
    expected = np.concatenate([synthetic_tokens(k, 16) for k in (5, 6, 7)])[:40]
    assert np.array_equal(tokens(sim), expected)


def test_unsorted_timestamps_are_replayed_in_order_and_blank_lines_skipped(tmp_path: Path) -> None:
    path = write(tmp_path, rec(2000, 5, 1, [1]), "", "  ", rec(500, 6, 1, [2]), rec(500, 7, 1, [3]))
    sims = list(TraceSource(path, model="m", time_scale=2.0).arrivals())
    assert [s.arrival_s for s in sims] == [1.0, 1.0, 4.0]
    assert [len(tokens(s)) for s in sims] == [6, 7, 5]


def test_gzip_traces(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(rec(0, 600, 2, [9, 10])) + "\n")
    (sim,) = TraceSource(path, model="m").arrivals()
    assert np.array_equal(tokens(sim)[:512], synthetic_tokens(9, 512))


def test_follow_up_is_none(tmp_path: Path) -> None:
    source = TraceSource(write(tmp_path, rec(0, 5, 1, [1])), model="m")
    (sim,) = source.arrivals()
    assert source.follow_up(sim, 1.0, True) is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps({"input_length": 5, "output_length": 1, "hash_ids": []}), "timestamp"),
        (json.dumps(rec(-1, 5, 1, [])), "timestamp must be finite and >= 0"),
        (json.dumps(rec(0, 0, 1, [])), "input_length must be >= 1"),
        (json.dumps(rec(0, 5.5, 1, [])), "input_length must be an integer"),
        (json.dumps(rec(0, 5, -1, [])), "output_length must be >= 0"),
        (
            json.dumps({**rec(0, 5, 1, []), "output_length": True}),
            "output_length must be an integer",
        ),
        (json.dumps({**rec(0, 5, 1, []), "hash_ids": "0 1"}), "hash_ids must be a list"),
        (json.dumps(rec(0, 5, 1, [1, -2])), "hash_ids must be integers in"),
        (json.dumps(rec(0, 5, 1, [2**31])), "hash_ids must be integers in"),
        (json.dumps(rec(0, 5, 1, [1.0])), "hash_ids must be integers in"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, rec(0, 5, 1, [1]), "", line)
    with pytest.raises(ScenarioError, match=message) as info:
        TraceSource(path, model="m")
    assert info.value.path == f"{path}:3"
    assert str(info.value).startswith(f"{path}:3: ")


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read trace") as info:
        TraceSource(tmp_path / "missing.jsonl", model="m")
    assert info.value.path == str(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(ScenarioError, match="cannot read trace"):
        TraceSource(bad, model="m")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"timestamp": 0, "x": "\xff"}\n')
    with pytest.raises(ScenarioError, match="UTF-8"):
        TraceSource(latin, model="m")


def test_build_workload_reads_trace(tmp_path: Path) -> None:
    path = write(tmp_path, rec(0, 5, 1, [1]), rec(3000, 5, 1, [1]))
    doc = {"model": "x", "trace": {"path": str(path), "time_scale": 0.5}}
    source = build_workload(Fields(doc, "workload"), seed=0, duration_s=1.0, model="m")
    assert isinstance(source, TraceSource)
    sims = list(source.arrivals())
    assert [(s.arrival_s, s.request.model) for s in sims] == [(0.0, "x")]


@pytest.mark.parametrize(
    ("trace", "extra", "error_path"),
    [
        ({}, {}, "workload.trace.path"),
        ({"path": "t.jsonl", "time_scale": 0}, {}, "workload.trace.time_scale"),
        ({"path": "t.jsonl", "speed": 2}, {}, "workload.trace.speed"),
        ({"path": "t.jsonl"}, {"mix": {"cold": {}}}, "workload.mix"),
        ({"path": "t.jsonl"}, {"tenants": {"count": 2}}, "workload.tenants"),
        ({"path": "t.jsonl"}, {"arrival": {"process": "poisson"}}, "workload.arrival"),
        ({"path": "t.jsonl"}, {"bogus": 1}, "workload.bogus"),
        ("t.jsonl", {}, "workload.trace"),
    ],
)
def test_trace_schema_errors(
    tmp_path: Path, trace: Any, extra: dict[str, Any], error_path: str
) -> None:
    write(tmp_path, rec(0, 5, 1, [1]))
    if isinstance(trace, dict) and "path" in trace:
        trace = {**trace, "path": str(tmp_path / trace["path"])}
    doc = {"trace": trace, **extra}
    with pytest.raises(ScenarioError) as info:
        build_workload(Fields(doc, "workload"), seed=0, duration_s=1.0, model="m")
    assert info.value.path == error_path
