"""`benchmarks/real_peers.py` and the peer models it calibrates.

The live half needs the peers' virtualenv and minutes of real time (run it by
hand: `python -m benchmarks.real_peers`); what is checked here is what the
comparison stands on: the live run and the simulator replay the same
requests, the within-run ratios and medians are what the table says, and the
calibrated `vllm-router` model routes as the live router did (cache-blind,
least loaded), apart from `sglang-cache-aware` on the same traffic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.real_peers import (
    TRAFFIC,
    median_ratios,
    median_row,
    ratios,
    sending_tools,
    simulate,
    table,
    tools_request,
)

from prefixroute.devtools.bench import runner, scenario_source, wire_request
from prefixroute.sim.compare import make_source
from prefixroute.sim.scenario import load_scenario


def _first(source: Any, n: int) -> list[tuple[Any, ...]]:
    """The first `n` arrivals: time, kind, tenant, prompt text, token ids, output length."""
    out = []
    for sim in source.arrivals():
        r = sim.request
        ids = None if r.token_ids is None else tuple(int(t) for t in r.token_ids)
        out.append((sim.arrival_s, sim.kind, r.tenant, r.prompt, ids, sim.output_tokens))
        if len(out) == n:
            break
    return out


def test_live_and_simulated_runs_replay_the_same_requests(tmp_path: Path) -> None:
    for name in ("agentic", "seed"):
        traffic = TRAFFIC[name].scaled(5.0)
        path = traffic.write(tmp_path)
        live = scenario_source(str(path), model=traffic.model, duration_s=5.0).source
        simulated = make_source(load_scenario(path))
        first = _first(live, 20)
        assert len(first) == 20
        assert first == _first(simulated, 20), name


def test_the_tools_variant_moves_the_system_prompt_into_tools(tmp_path: Path) -> None:
    traffic = TRAFFIC["agentic-tools"].scaled(5.0)
    source = scenario_source(str(traffic.write(tmp_path)), model=traffic.model, duration_s=5.0)
    sim = next(iter(source.source.arrivals()))
    path, plain, headers = wire_request(sim)
    _, body, same = tools_request(sim)
    assert path == "/v1/chat/completions" and same == headers and "x-session-id" in headers
    assert plain["messages"][0]["role"] == "system" and "tools" not in plain
    assert body["messages"] == plain["messages"][1:]
    assert body["tools"][0]["function"]["description"] == plain["messages"][0]["content"]
    with sending_tools(True):
        assert vars(runner)["wire_request"] is tools_request
    assert vars(runner)["wire_request"] is wire_request


def test_ratios_and_medians() -> None:
    ours = {"hit_rate": 0.80, "ttft_p50_s": 0.020, "ttft_p99_s": 0.200}
    peer = {"hit_rate": 0.55, "ttft_p50_s": 0.040, "ttft_p99_s": 0.300}
    rel = ratios(peer, ours)
    assert round(rel["hit_rate"] or 0, 6) == -25.0  # points
    assert rel["ttft_p50_s"] == 2.0 and abs((rel["ttft_p99_s"] or 0) - 1.5) < 1e-12
    assert ratios({**peer, "ttft_p99_s": None}, ours)["ttft_p99_s"] is None
    runs = [
        {"live": {"ours": ours, "p": {**peer, "ttft_p50_s": 0.020 * k}}, "sim": {}}
        for k in (1.0, 3.0, 2.0)
    ]
    assert median_ratios(runs, "p", "live")["ttft_p50_s"] == 2.0
    rows = [
        {**peer, "requests": r, "failures": 0, "split": s}
        for r, s in ((10, [0.5, 0.5]), (30, [0.9, 0.1]), (20, [0.6, 0.4]))
    ]
    row = median_row(rows)
    assert row["requests"] == 20 and row["split"] == [0.6, 0.4] and row["runs"] == 3


def test_vllm_router_model_is_cache_blind_and_sglang_is_not(tmp_path: Path) -> None:
    path = TRAFFIC["agentic"].scaled(20.0).write(tmp_path)
    sglang = simulate("sglang-cache-aware", path)
    vllm = simulate("vllm-router", path)
    least = simulate("least-request", path)
    assert min(vllm["requests"], sglang["requests"]) > 100
    assert vllm["hit_rate"] == least["hit_rate"]  # the calibrated model: least loaded
    assert sglang["hit_rate"] > vllm["hit_rate"] + 0.15
    assert max(vllm["split"]) < max(sglang["split"])  # spread by load, not by prefix
    ours = simulate("prefixroute", path)
    result = {
        "traffics": {
            "agentic": {
                "routers": ["ours", "vllm-router"],
                "median": {
                    "live": {},
                    "sim": {"ours": {**ours, "runs": 1}, "vllm-router": {**vllm, "runs": 1}},
                },
                "ratios": {"live": {}, "sim": {"vllm-router": ratios(vllm, ours)}},
            }
        }
    }
    lines = table(result).splitlines()
    assert len(lines) == 4 and lines[3].startswith("| agentic | vllm-router | sim |")


def test_resimulate_keeps_the_live_runs_and_simulates_again(tmp_path: Path) -> None:
    from benchmarks.real_peers import main

    doc = TRAFFIC["agentic"].scaled(5.0).doc
    live = {"hit_rate": 0.5, "ttft_p50_s": 0.02, "ttft_p99_s": 0.1, "requests": 9, "failures": 0}
    runs = [{"live": {"ours": {**live, "split": [1.0]}, "vllm-router": {**live, "split": [1.0]}}}]
    before = tmp_path / "before.json"
    block = {"scenario": doc, "routers": ["ours", "vllm-router"], "runs": runs}
    before.write_text(json.dumps({"machine": None, "traffics": {"agentic": block}}))
    after = tmp_path / "after.json"
    assert main(["--resimulate", str(before), "--json", str(after)]) == 0
    result = json.loads(after.read_text())["traffics"]["agentic"]
    assert result["median"]["live"]["vllm-router"]["requests"] == 9
    assert result["ratios"]["live"]["vllm-router"]["hit_rate"] == 0.0
    sim = result["median"]["sim"]
    assert sim["ours"]["requests"] > 20 and sim["ours"]["hit_rate"] > sim["vllm-router"]["hit_rate"]
    assert result["ratios"]["sim"]["vllm-router"]["hit_rate"] < 0
