"""Simulator policies: every baseline ships, loads, and refuses bad `simulator` sections."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefixroute.config import ConfigError
from prefixroute.sim.policy import builtin_policies, load_policy

BASELINES = {
    "round-robin",
    "random",
    "least-request",
    "p2c",
    "session-hash",
    "gie-default",
    "sglang-cache-aware",
    "dynamo-kv",
    "prefixroute",
}


def test_every_baseline_ships_and_builds() -> None:
    assert set(builtin_policies()) >= BASELINES
    for name in builtin_policies():
        policy = load_policy(name)
        assert policy.name == name
        router = policy.build(seed=3)
        assert router.profile.scorer_names is not None


def test_builtin_files_say_what_they_model() -> None:
    import prefixroute.sim.policy as mod

    folder = Path(mod.__file__).parent / "policies"
    for path in folder.glob("*.yaml"):
        assert path.read_text().startswith("#"), f"{path.name} needs a header comment"


def test_simulator_section(tmp_path: Path) -> None:
    ok = tmp_path / "mine.yaml"
    ok.write_text("simulator: {kv_events: true}\n")
    assert load_policy(ok).kv_events
    assert load_policy(ok).name == "mine"
    bad = tmp_path / "bad.yaml"
    bad.write_text("simulator: {kv_event: true}\n")
    with pytest.raises(ConfigError, match=r"simulator\.kv_event"):
        load_policy(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("router: {speculative_ttl_s: -1}\n")
    with pytest.raises(ConfigError, match="speculative_ttl_s"):
        load_policy(wrong)
    with pytest.raises(ConfigError, match="unknown policy"):
        load_policy("no-such-policy")
