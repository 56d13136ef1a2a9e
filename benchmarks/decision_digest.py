"""A digest of every decision the simulator makes: proof that a change left decisions alone.

    python -m benchmarks.decision_digest OUT_DIR [SCENARIO ...]
    python -m benchmarks.decision_digest --diff BEFORE_DIR AFTER_DIR

Runs every built-in scenario (or those named) under every built-in policy,
with bounded durations, and writes one JSON file per pair: the run's
summary plus a SHA-256 over every `Decision` the router returned (endpoint,
fallbacks, match, predicted tokens, candidates, scorer names, weights, the
raw score bytes, totals, block keys, times, serials) and every
`Rejection`/`Deferral`. Run it on the tree before a change and after it,
then `--diff`: identical digests mean identical decisions; wall-clock
fields are left out of the comparison. Issue 14 (the hot path) used it to
show that its compiled index, hashing kernel and columnar scoring changed
no decision (docs/performance.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from prefixroute.decision import Decision
from prefixroute.router import Router
from prefixroute.sim.compare import run_policy
from prefixroute.sim.policy import builtin_policies, load_policy
from prefixroute.sim.scenario import builtin_scenarios, load_scenario

DURATION_S = {
    "kv-pressure-restarts": 180.0,
    "noisy-neighbour": 180.0,
    "seed": 120.0,
    "mooncake": 300.0,
}
"""Simulated seconds per scenario; the others run `DEFAULT_DURATION_S`."""
DEFAULT_DURATION_S = 60.0
TIMING_FIELDS = ("wall_s", "events_per_s")


class Digest:
    """A running SHA-256 over the outcomes the router returns, and their count."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.seen = 0

    def feed(self, out: object) -> None:
        if isinstance(out, Decision):
            d = out
            record = (
                d.endpoint, d.fallbacks, d.matched_blocks, d.total_blocks,
                d.predicted_cached_tokens, d.prompt_tokens, d.profile, d.picker, d.candidates,
                d.scorer_names, d.weights, d.totals, sorted(d.matches.items()), d.decided_at,
                d.load_tokens, d.epoch, d.serial, d.raw.shape,
            )  # fmt: skip
            self.sha.update(repr(record).encode())
            self.sha.update(np.ascontiguousarray(d.raw, dtype=np.float64).tobytes())
            self.sha.update(repr(tuple(d.block_keys)).encode())
        else:
            self.sha.update(repr(out).encode())
        self.seen += 1


def _watching(digest: Callable[[], Digest]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """`Router.route` and `Router.release` wrapped to feed the current digest."""
    route, release = Router.route, Router.release

    def watched_route(self: Router, *args: Any, **kwargs: Any) -> Any:
        out = route(self, *args, **kwargs)
        digest().feed(out)
        return out

    def watched_release(self: Router, *args: Any, **kwargs: Any) -> Any:
        out = release(self, *args, **kwargs)
        for _request, outcome in out:
            digest().feed(outcome)
        return out

    return watched_route, watched_release


def record(out: Path, scenarios: list[str], duration_s: float | None = None) -> None:
    """Write `SCENARIO__POLICY.json` under `out` for every pair (`duration_s` overrides all)."""
    out.mkdir(parents=True, exist_ok=True)
    current = [Digest()]
    original = Router.route, Router.release
    Router.route, Router.release = _watching(lambda: current[0])  # type: ignore[method-assign]
    try:
        for name in scenarios:
            duration = duration_s or DURATION_S.get(name, DEFAULT_DURATION_S)
            scenario = load_scenario(name).with_overrides(duration_s=duration)
            for policy in builtin_policies():
                current[0] = digest = Digest()
                started = time.perf_counter()
                summary = dict(run_policy(scenario, load_policy(policy)).summary)
                summary["_decision_digest"] = digest.sha.hexdigest()
                summary["_decisions_seen"] = digest.seen
                path = out / f"{name}__{policy}.json"
                path.write_text(json.dumps(summary, indent=1, sort_keys=True, default=repr))
                took = time.perf_counter() - started
                print(f"{name:22s} {policy:26s} {took:6.1f} s  {digest.seen} outcomes", flush=True)
    finally:
        Router.route, Router.release = original  # type: ignore[method-assign]


def diff(before: Path, after: Path) -> int:
    """Compare two record directories; print each difference; the number of differing files."""
    same = differ = missing = 0
    for path in sorted(before.glob("*.json")):
        other = after / path.name
        if not other.exists():
            missing += 1
            print(f"missing {path.name}")
            continue
        a, b = json.loads(path.read_text()), json.loads(other.read_text())
        for doc in (a, b):
            for field in TIMING_FIELDS:
                doc.pop(field, None)
        if a == b:
            same += 1
        else:
            differ += 1
            fields = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            print(f"differs {path.name}: {fields}")
    print(f"same={same} differ={differ} missing={missing}")
    return differ + missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--diff", nargs=2, metavar=("BEFORE", "AFTER"), type=Path)
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("scenarios", nargs="*")
    parser.add_argument("--duration-s", type=float, help="simulated seconds for every scenario")
    args = parser.parse_args(argv)
    if args.diff:
        return 1 if diff(*args.diff) else 0
    if args.out is None:
        parser.error("OUT_DIR is required unless --diff")
    record(args.out, args.scenarios or list(builtin_scenarios()), args.duration_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
