"""`prefixroute bench`: request sequences, prompt text for traces, real runs against fake engines.

The fake engines run in threads on 127.0.0.1 (`tests.servers.serve_in_thread`);
the command runs in-process through `prefixroute.cli.main`.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import gzip
import itertools
import json
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from prefixroute.cli import main as prefixroute_main
from prefixroute.devtools.bench import (
    MODEL,
    LoadConfigError,
    Result,
    WireRequest,
    cli_arguments,
    cli_main,
    messages_of,
    run_load,
    run_with_uvloop,
    scenario_source,
    seed_requests,
    summarise,
    wire_request,
)
from prefixroute.devtools.fake_engine import FakeEngineConfig, create_app
from prefixroute.devtools.prompts import WORDS, prompt_text
from prefixroute.openai import render_messages
from prefixroute.sim.tokenizer import encode
from prefixroute.sim.trace import TraceSource
from prefixroute.sim.workload import SEED_PERSONAS, SEED_QUESTIONS
from tests.servers import free_port, serve_in_thread


@contextlib.contextmanager
def engines(n: int, *, time_scale: float = 0.05) -> Iterator[list[str]]:
    """`n` fake engines in threads; their base URLs."""
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(
                serve_in_thread(
                    create_app(FakeEngineConfig(engine_id=f"fake-{i}", time_scale=time_scale))
                )
            )
            for i in range(n)
        ]


# --- the request sequence ----------------------------------------------------------------


def test_seed_requests_are_deterministic_per_seed() -> None:
    first = list(itertools.islice(seed_requests(7), 300))
    assert first == list(itertools.islice(seed_requests(7), 300))
    assert first != list(itertools.islice(seed_requests(8), 300))


def test_seed_requests_are_the_seed_experiments_mix() -> None:
    reqs = list(itertools.islice(seed_requests(0), 5000))
    kinds = Counter(path for path, _, _ in reqs)
    tenant_share = kinds["/v1/chat/completions"] / len(reqs)
    assert tenant_share == pytest.approx(0.8, abs=0.02)  # 4 tenant : 1 cold
    tenants: Counter[str] = Counter()
    for path, body, headers in reqs:
        assert body["model"] == "qwen3-0.6b"
        if path == "/v1/chat/completions":
            tenant = headers["x-tenant-id"]
            tenants[tenant] += 1
            system, user = body["messages"]
            assert system == {"role": "system", "content": SEED_PERSONAS[tenant]}
            assert user["role"] == "user" and user["content"] in SEED_QUESTIONS
            assert body["max_tokens"] == 80
        else:
            assert path == "/v1/completions" and headers == {}
            word, n = body["prompt"].split()
            assert word == "Question" and 1 <= int(n) <= 1000
            assert body["max_tokens"] == 50
    assert set(tenants) == set(SEED_PERSONAS)
    assert min(tenants.values()) / max(tenants.values()) > 0.85  # uniform popularity


@given(
    st.lists(
        st.fixed_dictionaries({"role": st.text(max_size=8), "content": st.text(max_size=40)}),
        max_size=5,
    )
)
def test_messages_of_inverts_render_messages(messages: list[dict[str, str]]) -> None:
    assert messages_of(render_messages(messages)) == messages


def test_messages_of_refuses_other_text() -> None:
    with pytest.raises(ValueError):
        messages_of("Question 5")
    with pytest.raises(ValueError):
        messages_of("<|user|10|>short")


def test_summarise_percentiles_and_hit_rate() -> None:
    results = [
        Result(
            i,
            "tenant",
            "a",
            "u",
            200,
            0.0,
            latency_s=i / 100,
            ttft_s=i / 1000,
            prompt_tokens=100,
            cached_tokens=50,
        )
        for i in range(1, 101)
    ]
    results.append(Result(101, "cold", None, "u", 503, 0.0, latency_s=9.0, error="busy"))
    report = summarise(results, duration_s=10.0, offered_rps=10.0)
    assert (report.requests, report.ok, report.failures) == (101, 100, 1)
    assert report.by_status == {"200": 100, "503:busy": 1}
    assert report.latency_p50_s == pytest.approx(0.505)
    assert report.latency_p99_s == pytest.approx(0.9901)
    assert report.ttft_p50_s == pytest.approx(0.0505)
    assert report.hit_rate == 0.5 and report.achieved_rps == 10.0
    assert report.tenants == {"a": (100, 0.5), "-": (1, None)}


# --- real runs ---------------------------------------------------------------------------


def test_open_loop_against_a_fake_engine() -> None:
    with engines(1) as urls:
        report = asyncio.run(run_load(urls[0], rate_rps=40, duration_s=2.0, seed=1, timeout_s=10))
    assert report.failures == 0, report.by_status
    assert 50 <= report.requests <= 115  # Poisson around 80
    assert report.hit_rate is not None and report.hit_rate > 0.3
    assert report.ttft_p50_s is not None and report.ttft_p99_s is not None
    assert report.ttft_p50_s <= report.latency_p50_s  # type: ignore[operator]
    assert report.engines == {"fake-0": report.requests}
    assert report.lag_p99_s is not None and report.lag_p99_s < 0.5
    tenant_rate = report.tenants["finance"][1]
    assert tenant_rate is not None and tenant_rate > 0.5  # a persona repeats its prompt
    assert report.tenants["-"][1] is not None and report.tenants["-"][1] < 0.5  # cold questions


def test_same_seed_sends_the_same_requests_in_the_same_order() -> None:
    with engines(1) as urls:
        runs = [
            asyncio.run(run_load(urls[0], rate_rps=200, duration_s=5.0, max_requests=30, seed=3))
            for _ in range(2)
        ]
    for report in runs:
        assert report.requests == 30 and report.failures == 0
    kinds = [
        [(r.index, r.kind, r.tenant) for r in sorted(rep.results, key=lambda r: r.index)]
        for rep in runs
    ]
    assert kinds[0] == kinds[1]


def test_several_urls_are_used_round_robin_and_non_streaming_reads_usage() -> None:
    with engines(2) as urls:
        report = asyncio.run(
            run_load(urls, rate_rps=100, duration_s=5.0, max_requests=40, stream=False)
        )
    assert report.failures == 0
    assert report.engines == {"fake-0": 20, "fake-1": 20}
    assert report.ttft_p50_s is None  # no stream, no first token
    assert report.prompt_tokens > 0 and report.hit_rate is not None


def test_closed_loop_users_wait_for_answers() -> None:
    users = 3
    with engines(1) as urls:
        report = asyncio.run(
            run_load(
                urls[0], users=users, duration_s=1.5, think_s=(0.05, 0.1), ramp_s=0.1, max_tokens=4
            )
        )
    assert report.failures == 0
    assert report.requests > 2 * users  # each user went round several times
    # never more than `users` requests outstanding at once
    starts = [(r.sent_s, 1) for r in report.results]
    events = sorted(starts + [(r.sent_s + r.latency_s, -1) for r in report.results])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert peak <= users
    assert report.duration_s < 1.5 + 1.0


def test_closed_loop_rate_is_over_the_runs_wall_clock_time() -> None:
    """Users thinking until the end count in the run's time: not just up to the last answer."""
    with engines(1) as urls:
        report = asyncio.run(
            run_load(urls[0], users=2, duration_s=1.0, think_s=(5, 5), ramp_s=0.1, max_tokens=2)
        )
    assert (report.requests, report.failures) == (2, 0)  # one each, then thinking to the end
    assert 1.0 <= report.duration_s < 2.0
    assert report.achieved_rps <= 2.0


@pytest.mark.parametrize("max_requests", [3, 10])
def test_scenario_timing_sends_exactly_max_requests(max_requests: int) -> None:
    """Follow-ups that wait for their time reserve the budget first: none overshoots it."""
    workload = scenario_source("seed", model=MODEL, duration_s=5.0)
    with engines(2) as urls:
        report = asyncio.run(
            run_load(
                urls,
                duration_s=5.0,
                source=workload.source,
                max_requests=max_requests,
                max_tokens=2,
            )
        )
    assert (report.requests, report.failures) == (max_requests, 0)


def test_an_unreachable_target_fails_every_request_quickly() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    report = asyncio.run(
        run_load(url, rate_rps=50, duration_s=2.0, max_requests=5, model="m", timeout_s=2)
    )
    assert (report.requests, report.failures, report.ok) == (5, 5, 0)
    assert all(r.status == 0 and r.error == "ConnectError" for r in report.results)


def test_bad_arguments_are_value_errors() -> None:
    for kwargs in ({}, {"rate_rps": 1, "users": 1}, {"rate_rps": -1}, {"users": 0}):
        with pytest.raises(ValueError):
            asyncio.run(run_load("http://127.0.0.1:1", duration_s=1, **kwargs))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        asyncio.run(run_load("http://127.0.0.1:1", rate_rps=1, duration_s=float("inf")))


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"timeout_s": 0.0}, "timeout_s", "timeout_s must be finite and > 0, got 0"),
        ({"max_tokens": 0}, "max_tokens", "max_tokens must be >= 1, got 0"),
        ({"users": 1, "think_s": (2.0, 1.0)}, "think_s", "think_s must be LOW HIGH"),
        ({"users": 1, "process": "constant"}, "process", "process is for open loop: give rate_rps"),
        ({"rate_rps": 1.0, "think_s": (0.1, 0.2)}, "think_s", "think_s is for closed loop"),
    ],
)
def test_run_load_refuses_what_it_would_ignore_or_misuse(
    kwargs: dict[str, object], field: str, message: str
) -> None:
    """One check (`LoadConfig`) for the library and the command; the error names the field."""
    with pytest.raises(LoadConfigError) as caught:
        asyncio.run(run_load("http://127.0.0.1:1", duration_s=1, **kwargs))  # type: ignore[arg-type]
    assert caught.value.field == field and str(caught.value).startswith(message)


def test_cli_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    cli_arguments(parser)
    assert cli_main(parser.parse_args(["--url", "http://127.0.0.1:1", "--rate", "0"])) == 2
    assert capsys.readouterr().err == "prefixroute bench: --rate must be finite and > 0, got 0\n"
    with engines(1) as urls:
        args = parser.parse_args(
            ["--url", urls[0], "--rate", "100", "--max-requests", "10", "--max-tokens", "2"]
        )
        assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "requests 10 (200: 10), failures 0" in out


class Scripted:
    """A loopback upstream whose completions answer as `mode` says (it may misbehave)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.app = Starlette(routes=[Route("/v1/completions", self.complete, methods=["POST"])])

    async def complete(self, request: Request) -> Response:
        if self.mode == "stall":
            await asyncio.sleep(0.6)
        if self.mode == "rate-limited":
            body = {"error": {"message": "slow down", "type": "x", "code": "rate-limited"}}
            return JSONResponse(body, status_code=429)
        return StreamingResponse(self.events(), media_type="text/event-stream")

    async def events(self) -> AsyncIterator[bytes]:
        pieces = [b'data: {"choices": [{"text": ""}]}\n\n']  # nothing yet: no TTFT
        if self.mode == "stream-error":
            pieces.append(b'data: {"error": {"message": "engine died"}}\n\n')
        # a content event cut mid-line, then a usage event longer than aiohttp's line limit
        pieces += [b'data: {"choices": [{"te', b'xt": "hi"}]}\n', b"\n"]
        usage = {"prompt_tokens": 7, "prompt_tokens_details": {"cached_tokens": 3}}
        pad = "x" * 200_000
        pieces.append(
            f"data: {json.dumps({'choices': [], 'usage': usage, 'pad': pad})}\n\n".encode()
        )
        if self.mode != "truncated":
            pieces.append(b"data: [DONE]\n\n")
        for piece in pieces:
            yield piece
            await asyncio.sleep(0.01)  # separate writes: the client sees the cuts


COMPLETION: WireRequest = ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 2}, {})


@pytest.mark.parametrize(
    ("mode", "status", "error"),
    [
        ("ok", 200, None),
        ("truncated", 200, "truncated"),
        ("stream-error", 200, "stream-error"),
        ("rate-limited", 429, "rate-limited"),
        ("stall", 0, "ReadTimeout"),
    ],
)
def test_what_each_answer_is_recorded_as(mode: str, status: int, error: str | None) -> None:
    with serve_in_thread(Scripted(mode).app) as url:
        report = asyncio.run(
            run_load(url, rate_rps=100, duration_s=5, requests=[COMPLETION] * 2, timeout_s=0.2)
        )
    assert [(r.status, r.error) for r in report.results] == [(status, error)] * 2
    if mode == "ok":
        assert report.failures == 0 and report.ttft_p50_s is not None
        assert report.ttft_p50_s < report.latency_p50_s  # type: ignore[operator]
        assert (report.prompt_tokens, report.cached_tokens) == (14, 6)
    else:
        assert report.ok == 0 and report.failures == 2


def test_run_with_uvloop_runs_on_uvloop() -> None:
    pytest.importorskip("uvloop")

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run_with_uvloop(loop_module()).startswith("uvloop")


# --- prompt text for token-only requests -------------------------------------------------


def test_prompt_text_is_one_fake_engine_token_per_id_and_prefix_stable() -> None:
    assert len(set(WORDS)) == len(WORDS) > 500
    assert all(w.isascii() and w.isalpha() and w.islower() and len(w) <= 9 for w in WORDS)
    ids = list(range(0, 5000, 7))
    text = prompt_text(ids)
    assert len(encode(text)) == len(ids)  # the fake engine's tokenizer: one token per word
    assert text.startswith(prompt_text(ids[:100]))
    assert prompt_text([3, 3 + len(WORDS)]) == 2 * prompt_text([3])


def _write_trace(path: Path, records: list[dict[str, object]]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


TINY_TRACE = [  # 512-token hash blocks; 0, 1 and 3 share block 1, 0 and 1 share block 2 too
    {"timestamp": 0, "input_length": 700, "output_length": 3, "hash_ids": [1, 2]},
    {"timestamp": 400, "input_length": 1100, "output_length": 2, "hash_ids": [1, 2, 3]},
    {"timestamp": 800, "input_length": 300, "output_length": 4, "hash_ids": [9]},
    {"timestamp": 1200, "input_length": 600, "output_length": 1, "hash_ids": [1, 7]},
]


def test_trace_requests_become_text_sharing_leading_blocks(tmp_path: Path) -> None:
    path = tmp_path / "tiny.jsonl.gz"
    _write_trace(path, TINY_TRACE)
    workload = scenario_source(str(path), model="m", duration_s=10.0)
    wires = [wire_request(sim) for sim in workload.source.arrivals()]
    prompts = [body["prompt"] for _, body, _ in wires]
    assert [body["max_tokens"] for _, body, _ in wires] == [3, 2, 4, 1]
    assert [len(encode(p)) for p in prompts] == [700, 1100, 300, 600]
    block = prompt_text(TraceSource(path, model="m").tokens(0)[:512])  # hash id 1
    assert all(p.startswith(block) for p in (prompts[0], prompts[1], prompts[3]))
    assert prompts[1].startswith(prompts[0])  # hash ids 1, 2 (request 0 ends inside 2)
    assert not prompts[2].startswith(block[:40]) and not prompts[3].startswith(prompts[0])


def _bench(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = prefixroute_main(["bench", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bench_replays_a_builtin_scenario_over_two_engines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json = tmp_path / "report.json"
    with engines(2) as urls:
        code, out, err = _bench(
            [
                *("--url", urls[0], "--url", urls[1], "--scenario", "seed"),
                *("--rate", "60", "--duration", "5", "--max-requests", "60"),
                *("--max-tokens", "4", "--json", str(out_json), "--progress"),
            ],
            capsys,
        )
    assert code == 0, err
    assert out.splitlines()[0].startswith("seed: 60 req/s open loop (poisson)")
    assert "requests 60 (200: 60), failures 0" in out
    assert "per engine: fake-0 30, fake-1 30" in out  # round robin per request
    assert err.startswith("bench ") and " done (0 failed)" in err  # the progress line(s)
    doc = json.loads(out_json.read_text())
    assert (doc["requests"], doc["ok"], doc["failures"]) == (60, 60, 0)
    assert doc["scenario"] == "seed" and doc["urls"] == urls
    assert doc["engines"] == {"fake-0": 30, "fake-1": 30}
    assert doc["by_url"] == {urls[0]: 30, urls[1]: 30}
    assert doc["hit_rate"] > 0.3  # the personas repeat
    assert set(doc["tenants"]) == {"finance", "devops", "datasci", "-"}
    assert doc["by_kind"].keys() == {"tenant", "cold"}


CHAT_SCENARIO = """
name: tiny-chat
duration_s: 60
seed: 4
endpoints: {count: 2}
workload:
  arrival: {process: closed-loop, users: 4, think_s: [0.05, 0.1], ramp_s: 0.2}
  tenants: {count: 2, system_prompt_tokens: [200, 200]}
  mix:
    chat: {turns: [3, 3], user_tokens: [10, 20], reply_tokens: [5, 5]}
"""


def test_bench_scenario_file_timing_closed_loop_chats_sticky(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "chat.yaml"
    scenario.write_text(CHAT_SCENARIO)
    out_json = tmp_path / "chat.json"
    with engines(2) as urls:
        code, out, err = _bench(
            [
                *("--url", urls[0], "--url", urls[1], "--scenario", str(scenario)),
                *("--duration", "2", "--spread", "sticky", "--json", str(out_json)),
            ],
            capsys,
        )
    assert code == 0, err
    assert out.startswith("tiny-chat: scenario timing, 2 s")
    assert err == ""  # no progress line when stderr is not a terminal
    doc = json.loads(out_json.read_text())
    assert doc["failures"] == 0 and doc["by_kind"] == {"chat": doc["requests"]}
    assert doc["requests"] > 3 * 4  # the scenario's users came back after thinking
    assert doc["hit_rate"] > 0.3  # later turns resend the conversation so far


def test_sticky_spread_keeps_each_tenant_on_one_url() -> None:
    workload = scenario_source("seed", model="qwen3-0.6b", timed=False)
    with engines(2) as urls:
        report = asyncio.run(
            run_load(
                urls,
                rate_rps=100,
                duration_s=5.0,
                max_requests=60,
                source=workload.source,
                spread="sticky",
                max_tokens=2,
            )
        )
    assert report.failures == 0 and report.requests == 60
    engines_of: dict[str, set[str | None]] = {}
    for result in report.results:
        engines_of.setdefault(result.tenant or "-", set()).add(result.engine)
    assert all(len(engines_of[t]) == 1 for t in ("finance", "devops", "datasci"))
    assert len(engines_of["-"]) == 2  # no tenant, no session: round robin


def test_bench_replays_a_tiny_gz_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tiny.jsonl.gz"
    _write_trace(path, TINY_TRACE)
    out_json = tmp_path / "trace.json"
    with engines(1) as urls:
        code, out, err = _bench(
            [
                *("--url", urls[0], "--scenario", str(path), "--time-scale", "0.5"),
                *("--duration", "3", "--json", str(out_json)),
            ],
            capsys,
        )
    assert code == 0, err
    assert out.startswith("tiny.jsonl.gz: scenario timing")
    doc = json.loads(out_json.read_text())
    assert (doc["requests"], doc["failures"], doc["by_kind"]) == (4, 0, {"trace": 4})
    assert doc["prompt_tokens"] == 700 + 1100 + 300 + 600  # the trace's lengths, exactly
    # request 1 finds request 0's 700 tokens (688 in whole 16-token engine blocks) and
    # request 3 hash block 1 (512 tokens): the same hash ids became the same text
    assert doc["cached_tokens"] >= 688 + 512
    assert doc["engines"] == {"fake-0": 4}


def test_trace_requests_leave_at_their_scaled_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "tiny.jsonl.gz"
    _write_trace(path, TINY_TRACE)
    workload = scenario_source(str(path), model=MODEL, duration_s=5.0, time_scale=0.5)
    with engines(1) as urls:
        report = asyncio.run(run_load(urls, duration_s=5.0, source=workload.source, max_tokens=1))
    assert report.failures == 0
    sent = [r.sent_s for r in sorted(report.results, key=lambda r: r.index)]
    assert sent == pytest.approx([0.0, 0.2, 0.4, 0.6], abs=0.1)  # timestamp ms / 1000 * 0.5


def test_bench_replays_the_shipped_mooncake_trace(capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).resolve().parent.parent / "src/prefixroute/sim/data"
    trace = path / "mooncake-conversation.jsonl.gz"
    with engines(2) as urls:
        code, out, err = _bench(
            [
                *("--url", urls[0], "--url", urls[1], "--scenario", str(trace)),
                *("--time-scale", "0.02", "--duration", "4", "--max-requests", "12"),
                *("--json", "-"),
            ],
            capsys,
        )
    assert code == 0, err
    doc = json.loads(out)  # `--json -`: stdout is the JSON alone, the report goes to stderr
    assert "requests 12 (200: 12), failures 0" in err
    assert (doc["requests"], doc["failures"]) == (12, 0)
    assert doc["engines"] == {"fake-0": 6, "fake-1": 6}
    source = TraceSource(trace, model="m")
    first = list(itertools.islice(source.arrivals(), 12))
    lengths = [0 if s.request.token_ids is None else len(s.request.token_ids) for s in first]
    assert doc["prompt_tokens"] == sum(lengths)  # one token per id, as the trace says
    assert doc["hit_rate"] > 0  # the conversation trace repeats its prefixes


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenario", "no-such-scenario"], "unknown scenario 'no-such-scenario'"),
        (["--scenario", "missing.jsonl.gz"], "cannot read trace"),
        (["--scenario", "seed", "--time-scale", "2"], "--time-scale is for traces"),
        (["--scenario", "BAD"], "not valid YAML/JSON"),
        (["--rate", "-3"], "--rate must be finite and > 0, got -3"),
        (["--timeout", "0"], "--timeout must be finite and > 0, got 0"),
        (["--timeout", "-1"], "--timeout must be finite and > 0, got -1"),
        (["--max-tokens", "-5"], "--max-tokens must be >= 1, got -5"),
        (["--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
        (["--users", "2", "--think", "2", "1"], "--think must be LOW HIGH with 0 <= LOW <= HIGH"),
        (["--think", "0.1", "0.2"], "--think is for closed loop: give --users"),
        (["--users", "3", "--process", "constant"], "--process is for open loop: give --rate"),
        (
            ["--scenario", "mooncake", "--rate", "5", "--time-scale", "0.5"],
            "--time-scale is for scenario",
        ),
        (
            ["--scenario", "mooncake", "--users", "2", "--time-scale", "2"],
            "--time-scale is for scenario",
        ),
        (["--scenario", "EMPTY"], "empty.jsonl: no records"),
    ],
)
def test_bench_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    names = {"BAD": str(bad), "EMPTY": str(empty)}
    args = [names.get(a, str(tmp_path / a) if a.endswith(".gz") else a) for a in args]
    with engines(1) as urls:
        code, out, err = _bench(["--url", urls[0], *args], capsys)
    assert code == 2 and out == ""
    assert err.startswith("prefixroute bench: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bench_unreachable_url_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = _bench(["--url", url, "--duration", "1"], capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"prefixroute bench: cannot reach {url}: ConnectError")
    assert err.count("\n") == 1


def test_bench_url_ending_in_v1_is_the_base_url(capsys: pytest.CaptureFixture[str]) -> None:
    """The OpenAI SDK's `base_url` (`.../v1`) is taken, with a hint, not 404 on every request."""
    with engines(1) as urls:
        args = ["--url", urls[0] + "/v1/", "--rate", "50", "--max-requests", "4"]
        code, out, err = _bench([*args, "--max-tokens", "2"], capsys)
    assert code == 0, err
    assert "requests 4 (200: 4), failures 0" in out
    hint = f"--url {urls[0]}/v1/: using {urls[0]} (the bench adds /v1/... itself)"
    assert err == f"prefixroute bench: {hint}\n"


def test_bench_url_without_a_models_listing_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with serve_in_thread(Scripted("ok").app) as url:  # answers /v1/completions only
        code, out, err = _bench(["--url", url + "/api", "--rate", "5"], capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"prefixroute bench: {url}/api/v1/models answered 404")
    assert err.count("\n") == 1


def test_benchmarks_do_not_import_tests() -> None:
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "tests"]
    assert offenders == []


# --- the side-by-side harness, restricted to what `make test` can run ---------------------


@pytest.mark.slow
def test_side_by_side_quick_smoke(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.side_by_side",
            "--quick",
            "--routers",
            "direct,ours",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=Path(__file__).resolve().parent.parent,  # the repository root: `benchmarks` imports
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| direct |" in proc.stdout and "| ours |" in proc.stdout
    doc = json.loads(out.read_text())
    for router in ("direct", "ours"):
        seed = doc["routers"][router]["seed"]
        assert seed["failures"] == 0 and seed["engine_hit_rate"] > 0


@pytest.mark.slow
def test_side_by_side_quick_smoke_envoy(tmp_path: Path) -> None:
    """The `envoy` router: the shipped Envoy config + `prefixroute extproc`, every phase."""
    from prefixroute.devtools.envoy import envoy_binary

    envoy_binary()  # make test installs Envoy: a missing one fails with the install command
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.side_by_side",
            "--quick",
            "--routers",
            "envoy",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| envoy |" in proc.stdout
    envoy = json.loads(out.read_text())["routers"]["envoy"]
    seed = envoy["seed"]
    assert seed["failures"] == 0 and seed["engine_hit_rate"] > 0
    # the picker chose: the engines served every request Envoy answered
    assert sum(seed["engine_requests"]) == seed["ok"] == seed["requests"]
    assert envoy["burst"]["failures"] == 0 and envoy["ramp"][0]["sustained"]
