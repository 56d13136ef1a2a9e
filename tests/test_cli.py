from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from prefixroute import Router
from prefixroute.cli import demo_requests, main, run_demo


def test_demo_routes_every_valid_request_and_reports_hits() -> None:
    out = io.StringIO()
    decisions = run_demo(Router.default(), out=out)
    text = out.getvalue()
    assert len(decisions) == len(demo_requests()) - 1  # the malformed body is rejected
    assert "rejected with 400" in text and "messages" in text
    assert all(d.endpoint != "pod-d" for d in decisions)  # unhealthy
    repeat = [d for d in decisions if d.request.tenant == "finance"]
    assert repeat[1].endpoint == repeat[0].endpoint and repeat[1].matched_blocks > 0
    assert "predicted prefix-cache hit rate" in text


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins: 3\n")
    assert main(["check-config", str(bad)]) == 2
    assert "plugins" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text("seed: 4\n")
    assert main(["check-config", str(good)]) == 0


def test_console_script_runs_the_demo() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "prefixroute.cli", "explain", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "routed" in proc.stdout
