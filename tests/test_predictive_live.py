"""`benchmarks/predictive_live.py`: the live comparison of the predictive profile, in small.

The full comparison takes minutes (run it by hand: `python -m
benchmarks.predictive_live`). Here a tiny plan (a few seconds of light
traffic on two fake engines at time scale 1, everything on 127.0.0.1) runs
the predictive profile live through the real gateway and checks that it
routes every request, that its latency model learns from each completion
(the gateway's error samples grow by one per answer, and every answer
carries the decision's predicted TTFT), and that the table comes out; the
reporting helpers are checked on rows whose figures are known.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import attrs
import pytest
from benchmarks.predictive_live import (
    TINY,
    client_error,
    compare,
    latency_sums,
    main,
    median_ratios,
    parse_decision,
    router_config,
    table,
)

from prefixroute.config import load_config
from prefixroute.devtools.bench import Result


def test_the_predictive_config_is_the_simulators_profile_with_the_objective() -> None:
    doc = router_config("predictive", TINY, 8080)
    assert doc["objectives"] == {"ttft_ms": TINY.objective_ttft_ms}
    assert doc["server"] == {"host": "127.0.0.1", "port": 8080, "explain_header": True}
    types = {p["type"] for p in doc["plugins"]}
    assert {"predicted-latency-scorer", "slo-filter", "prefix-affinity-scorer"} <= types
    router = load_config({k: v for k, v in doc.items() if k != "server"})
    assert router.objectives.default.ttft_s == pytest.approx(TINY.objective_ttft_ms / 1000)
    assert "plugins" not in router_config("default", TINY, 8080)
    with pytest.raises(ValueError, match="unknown router"):
        router_config("nope", TINY, 8080)


def test_predictive_routes_and_learns_live(tmp_path: Path) -> None:
    plan = attrs.evolve(TINY, duration_s=3.0)
    result = compare(plan, ["predictive"], 1, tmp_path, log=io.StringIO())
    row = result["runs"][0]["predictive"]
    assert row["requests"] >= 10
    assert row["failures"] == 0, row["by_status"]
    assert row["served"] == row["requests"]  # the engines' own counters: all were routed
    model = row["model"]
    # every answer was a completion the model compared with its prediction, then learned from
    assert model["ttft_samples"] == row["requests"]
    assert model["tpot_samples"] == row["requests"]
    assert model["ttft_mae_s"] is not None and model["ttft_mae_s"] > 0
    assert model["router_attainment"] == pytest.approx(row["attainment"])
    # every answer carried its decision's predicted TTFT, on the engine that answered
    client = row["client"]
    assert client["samples"] == row["requests"]
    assert client["mismatched"] == 0 and client["unpaired"] == 0
    assert client["mae_s"] > 0 and client["constant_mae_s"] > 0
    assert 0 < row["attainment"] <= 1
    text = table(result)
    assert text.splitlines()[0].startswith("| router | engine hit |")
    assert "| predictive |" in text


def test_main_prints_the_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    assert main(["--tiny", "--runs", "1", "--routers", "round-robin", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| round-robin |" in printed
    doc = json.loads(out.read_text())
    assert doc["median"]["round-robin"]["requests"] > 0
    assert doc["runs"][0]["round-robin"]["model"]["ttft_samples"] > 0  # learns under any profile


def _result(index: int, sent_s: float, ttft_s: float | None, engine: str) -> Result:
    return Result(
        index=index,
        kind="chat",
        tenant="t",
        url="http://127.0.0.1:1",
        status=200,
        sent_s=sent_s,
        latency_s=1.0,
        ttft_s=ttft_s,
        engine=engine,
    )


def test_headers_pair_with_results_in_send_order() -> None:
    header = (
        "endpoint=127.0.0.1:8001; served_by=127.0.0.1:8001; matched_blocks=2; "
        "total_blocks=3; predicted_cached_tokens=32; fallbacks=; predicted_ttft_ms=50; "
        "predicted_tpot_ms=9"
    )
    parts = parse_decision(header)
    assert parts["served_by"] == "127.0.0.1:8001" and parts["predicted_ttft_ms"] == "50"
    results = [  # finished out of order; sent at 0.2, 0.1, 0.3
        _result(1, 0.2, 0.070, "fake-8002"),
        _result(0, 0.1, 0.040, "fake-8001"),
        _result(2, 0.3, 0.010, "fake-8001"),
    ]
    records = [
        {"predicted_ttft_s": 0.050, "served_by": "127.0.0.1:8001"},  # 0.1: +10 ms
        {"predicted_ttft_s": 0.050, "served_by": "127.0.0.1:8002"},  # 0.2: -20 ms
        {"predicted_ttft_s": 0.050, "served_by": "127.0.0.1:8003"},  # 0.3: wrong engine
    ]
    got = client_error(results, records)
    assert got["samples"] == 2 and got["mismatched"] == 1 and got["unpaired"] == 0
    assert got["mae_s"] == pytest.approx(0.015)
    assert got["bias_s"] == pytest.approx(-0.005)
    assert got["constant_mae_s"] == pytest.approx(0.015)  # measured 40 and 70 ms, median 55
    assert got["corr"] is None  # not from two points


def test_latency_sums_add_endpoints_per_kind() -> None:
    text = "\n".join(
        [
            "# HELP prefixroute_latency_prediction_samples_total x",
            'prefixroute_latency_prediction_samples_total{endpoint="a",kind="ttft"} 3.0',
            'prefixroute_latency_prediction_samples_total{endpoint="b",kind="ttft"} 2.0',
            'prefixroute_latency_prediction_samples_total{endpoint="b",kind="tpot"} 1.0',
            'prefixroute_latency_prediction_abs_error_seconds_total{endpoint="a",kind="ttft"} 0.5',
            'prefixroute_latency_prediction_signed_error_seconds{endpoint="a",kind="ttft"} -0.25',
            'prefixroute_latency_prediction_samples_created{endpoint="a",kind="ttft"} 1.7e9',
        ]
    )
    got = latency_sums(text)
    assert got["ttft_samples"] == 5.0 and got["tpot_samples"] == 1.0
    assert got["ttft_abs"] == 0.5 and got["ttft_signed"] == -0.25


def test_ratios_are_taken_within_runs() -> None:
    def row(hit: float, p99: float, att: float, good: float) -> dict[str, float]:
        return {
            "hit_rate": hit,
            "ttft_p50_s": 0.1,
            "ttft_p99_s": p99,
            "attainment": att,
            "goodput_rps": good,
        }

    runs = [
        {"predictive": row(0.6, 0.5, 0.9, 9.0), "default": row(0.5, 1.0, 0.8, 8.0)},
        {"predictive": row(0.6, 2.0, 0.9, 9.0), "default": row(0.6, 2.5, 0.9, 9.0)},
        {"predictive": row(0.7, 0.3, 0.9, 9.0), "default": row(0.6, 0.4, 0.7, 6.0)},
    ]
    got = median_ratios(runs, "predictive", "default")
    assert got["ttft_p99_s"] == pytest.approx(0.75)  # of 0.5, 0.8, 0.75
    assert got["hit_rate"] == pytest.approx(10.0)
    assert got["attainment"] == pytest.approx(10.0)
    assert got["goodput_rps"] == pytest.approx(9 / 8)
