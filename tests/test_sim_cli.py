"""`prefixroute simulate` / `compare` / `demo` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefixroute.cli import main
from tests.test_sim_simulation import TENANTS

KEYS = {
    "scenario",
    "policy",
    "requests",
    "completed",
    "failed",
    "hit_rate",
    "ttft_s",
    "itl_s",
    "e2e_s",
    "throughput_rps",
    "output_tokens_per_s",
    "tenants",
    "wall_s",
}


@pytest.fixture
def scenario_file(tmp_path: Path) -> Path:
    path = tmp_path / "small.json"
    path.write_text(json.dumps({**TENANTS, "duration_s": 8}))
    return path


def test_simulate_writes_the_documented_json(
    scenario_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run.json"
    rc = main(
        [
            "simulate",
            "--scenario",
            str(scenario_file),
            "--policy",
            "prefixroute",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    table = capsys.readouterr().out
    assert "prefixroute" in table and "ttft p50" in table
    doc = json.loads(out.read_text())
    assert set(doc) >= KEYS
    assert doc["scenario"] == "small" and doc["policy"] == "prefixroute"
    for key in ("ttft_s", "itl_s", "e2e_s"):
        assert set(doc[key]) == {"p50", "p95", "p99", "mean"}
        assert 0 < doc[key]["p50"] <= doc[key]["p95"] <= doc[key]["p99"]
    assert set(doc["tenants"]) >= {"count", "head_hit_rate", "tail_hit_rate", "jain_hit_rate"}
    assert doc["completed"] + doc["failed"] == doc["requests"]


def test_compare_writes_results_and_a_plot(scenario_file: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    args = ["compare", "--scenario", str(scenario_file), "--policies", "round-robin,prefixroute"]
    assert main([*args, "--json", str(out), "--plot", str(png), "--endpoints", "2"]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["policy"] for r in results] == ["round-robin", "prefixroute"]
    assert all(len(r["endpoint_requests"]) == 2 for r in results)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_policy_plot_shows_endpoint_load(scenario_file: Path, tmp_path: Path) -> None:
    png = tmp_path / "one.png"
    args = ["simulate", "--scenario", str(scenario_file), "--policy", "p2c", "--plot", str(png)]
    assert main(args) == 0
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "--scenario", "nope", "--policy", "prefixroute"], "unknown scenario"),
        (["simulate", "--scenario", "seed", "--policy", "nope"], "unknown policy"),
        (["compare", "--scenario", "seed", "--policies", ","], "no policy"),
        (["simulate", "--scenario", "seed", "--policy", "p2c", "--endpoints", "0"], "count"),
        (["simulate", "--scenario", "seed", "--policy", "p2c", "--duration", "-3"], "duration"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_progress_bar_appears_on_long_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from prefixroute.cli import Progress

    bar = Progress("p", 100.0, enabled=True, after_s=0.0)
    bar(50.0)
    bar.close()
    err = capsys.readouterr().err
    assert "50%" in err and "#" * 15 in err
    quiet = Progress("p", 100.0, enabled=False, after_s=0.0)
    quiet(50.0)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_demo_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--duration", "10"]) == 0
    table = capsys.readouterr().out
    for name in ("round-robin", "gie-default", "sglang-cache-aware", "dynamo-kv", "prefixroute"):
        assert name in table
