"""Per-decision cost of `Router.route` + `on_complete` on a warm index, and where it goes.

    python -m benchmarks.route_latency [--endpoints 8,64,1000] [--prompts 1024,4096,16384]
        [--paths compiled,pure] [--entries N] [--decisions N] [--kinds half,repeat,cold]
        [--no-stages] [--freeze] [--baseline DIR] [--json FILE]

For each fleet size, prompt length and path, warms a router's index to
`--entries` (block, endpoint) entries by routing real requests
(`benchmarks/fleet.py`: half the prompt shared by one of 256 groups, or one
group per endpoint in larger fleets, half new; each endpoint's capacity is
entries / endpoints blocks, so the index is full and every decision also
pays for evictions), then times each decision
with `perf_counter_ns`: `route` (hashing included) and `on_complete` (which
confirms the chain). Each request is built (untimed) just before it is
routed, as a driver routes a request it has just parsed, so its token ids
are in the CPU's caches. Three request kinds: half hit (new requests of
known groups), repeat (the same requests again: a full hit unless their
tails were evicted meanwhile), cold (random tokens). The garbage collector
stays on, as in production (`--freeze` calls `gc.freeze()` after the warm-up,
as a driver may). Reports p50 / p99 of route + on_complete, decisions per
second on one core (1 / mean), and the pure path's cost over the compiled
one's from the same run. Beside the wall clock, the thread's CPU time per
decision (`time.thread_time_ns`, whose calls add about 2 us): its p99, and
decisions per CPU-second (1 / its mean). On a shared machine the wall clock
also counts the time another process held the core, which CPU time does not
(GC pauses are in both); the ratios use CPU time for p99 and throughput.

Paths: "compiled" is the numba hashing kernel and the compiled index
(`Blocker(compiled=True)`, `make_index(compiled=True)`), "pure" the numpy
hashing and `PrefixIndex` (`compiled=False`); the rest of the router is the
same code. A tree without the compiled index runs `PrefixIndex` on both
(each line says what it ran). `--baseline DIR` measures another tree too,
`DIR/src/prefixroute` (e.g. the last commit: `git archive HEAD | tar -x -C
DIR`), with the same benchmark code, in a child process per configuration,
between the others: old beside new in one run, as the path "baseline".

Stages: a further pass of half-hit decisions runs with the router's
collaborators instrumented (`StageTimer`): the public methods of the
blocker (hashing), the index (match, speculative insert, expire, capacity),
the filters', scorers' (and the profile's) and picker's classes, the
endpoint table when the tree has one, and `Decision.__init__` are wrapped
with a timer, by class, so the router's own calls are timed whatever path
it takes inside. Only the outermost wrapped call counts (a scorer's call
into the endpoint table is scoring); whatever route does outside them is
"rest of route" (admission, context, load and ledger bookkeeping). The
instrumentation's own cost is estimated (timed calls per decision times the
cost of timing a no-op) and shown apart; the last line compares the
instrumented pass's total with the clean pass's. `on_complete` is timed
whole. The machine is shared and noisy: quote medians, compare within one
run.
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import numpy as np

import prefixroute
from benchmarks.fleet import COMPILED_AVAILABLE, describe, warm_router
from prefixroute import Decision, EndpointState, Request, Router, Usage

KINDS = {"half": "half hit", "repeat": "repeat", "cold": "cold"}
STAGES = (
    "hashing",
    "index match",
    "filters",
    "scoring",
    "pick",
    "speculative insert",
    "Decision",
    "endpoint table",
    "capacity sync",
    "index expire",
    "index other",
    "rest of route",
    "instrumentation (est.)",
    "on_complete",
)


@attrs.frozen
class Pass:
    """Per-decision timings (microseconds) of one pass over a list of requests."""

    route_us: np.ndarray[Any, np.dtype[np.float64]]
    complete_us: np.ndarray[Any, np.dtype[np.float64]]
    matched: float  # mean fraction of the prompt's blocks found on the chosen endpoint
    # CPU time of this thread over the decision: not counting while another
    # process held the core (wall p99 on a shared machine is mostly that)
    cpu_us: np.ndarray[Any, np.dtype[np.float64]]

    @property
    def total_us(self) -> np.ndarray[Any, np.dtype[np.float64]]:
        return self.route_us + self.complete_us

    def p50(self) -> float:
        return float(np.percentile(self.total_us, 50))

    def p99(self) -> float:
        return float(np.percentile(self.total_us, 99))

    def rate(self) -> float:
        return 1e6 / float(self.total_us.mean())

    def cpu_p99(self) -> float:
        return float(np.percentile(self.cpu_us, 99))

    def cpu_rate(self) -> float:
        """Decisions per second of CPU time: one core's capacity, whoever else shares it."""
        return 1e6 / float(self.cpu_us.mean())


def run_pass(
    router: Router,
    fleet: Sequence[EndpointState],
    requests: Sequence[Request],
    now: float,
    timer: StageTimer | None = None,
) -> tuple[Pass, float]:
    """Route and settle each request in turn; returns the timings and the clock.

    Each request is built afresh just before it is routed (`fresh`, untimed).
    """
    n = len(requests)
    route_us = np.empty(n)
    complete_us = np.empty(n)
    cpu_us = np.empty(n)
    cpu = time.thread_time_ns
    matched = np.empty(n)
    clock = time.perf_counter_ns
    for i, template in enumerate(requests):
        now += 0.0005
        request = fresh(template)
        if timer is not None:
            timer.start_decision()
        c0 = cpu()
        t0 = clock()
        decision = router.route(request, fleet, now)
        t1 = clock()
        assert isinstance(decision, Decision)
        usage = Usage(
            prompt_tokens=decision.prompt_tokens, cached_tokens=decision.predicted_cached_tokens
        )
        if timer is not None:
            timer.active = False
        t2 = clock()
        router.on_complete(decision, usage, now)
        t3 = clock()
        cpu_us[i] = (cpu() - c0) / 1e3
        route_us[i] = (t1 - t0) / 1e3
        complete_us[i] = (t3 - t2) / 1e3
        matched[i] = decision.matched_blocks / max(decision.total_blocks, 1)
        if timer is not None:
            timer.end_decision(route_us[i], complete_us[i])
    return Pass(route_us, complete_us, float(matched.mean()), cpu_us), now


def fresh(request: Request) -> Request:
    """`request` with its own newly written copy of the token ids, as a driver that
    has just parsed it routes it (its prompt in the CPU's caches, not in memory)."""
    assert request.token_ids is not None
    return attrs.evolve(request, token_ids=request.token_ids.copy())


# -- stage instrumentation ---------------------------------------------------------------


class StageTimer:
    """Times the router's collaborators by class while active (see the module docstring).

    `instrument(router)` wraps, on their classes, the public methods (and
    `__init__` where listed) of the router's blocker, index, filters,
    scorers, profile, picker, endpoint table and `Decision`; leaving the
    context restores them. A wrapped call made while another wrapped call
    runs is not timed on its own (the outer stage includes it).
    """

    def __init__(self) -> None:
        self.active = False
        self._depth = 0
        self._now: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.samples: dict[str, list[float]] = {s: [] for s in STAGES}
        self.calls: Counter[str] = Counter()  # timed calls by stage and function
        self._timed = 0
        self.overhead_us = self._calibrate()

    # per decision
    def start_decision(self) -> None:
        self._now = dict.fromkeys(STAGES, 0.0)
        self._timed = 0
        self.active = True

    def _calibrate(self, n: int = 20_000) -> float:
        """What one timed call adds to a decision, in microseconds (a no-op, wrapped vs not)."""

        def noop() -> None:
            return None

        timed = self._wrap(noop, "rest of route")
        clock = time.perf_counter_ns
        best = float("inf")
        for _ in range(5):
            self.active = True
            t0 = clock()
            for _ in range(n):
                timed()
            t1 = clock()
            for _ in range(n):
                noop()
            t2 = clock()
            best = min(best, ((t1 - t0) - (t2 - t1)) / n / 1e3)
        self.active = False
        self.calls.clear()
        return best

    def end_decision(self, route_us: float, complete_us: float) -> None:
        self.active = False
        stages = self._now
        stages["instrumentation (est.)"] = self._timed * self.overhead_us
        stages["rest of route"] = route_us - sum(stages.values())
        stages["on_complete"] = complete_us
        for name, value in stages.items():
            self.samples[name].append(value)

    def _wrap(
        self, fn: Callable[..., Any], stage: str | Callable[[str], str]
    ) -> Callable[..., Any]:
        clock = time.perf_counter_ns
        timer = self

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if timer._depth or not timer.active:
                return fn(*args, **kwargs)
            timer._depth = 1
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = (clock() - t0) / 1e3
                timer._depth = 0
                name = stage if isinstance(stage, str) else stage(fn.__name__)
                timer._now[name] += dt
                timer._timed += 1
                timer.calls[f"{name}: {fn.__qualname__}"] += 1

        return timed

    @contextmanager
    def instrument(self, router: Router) -> Iterator[StageTimer]:
        """Wrap the router's collaborators' classes for the duration of the block."""
        targets: list[tuple[type, str | Callable[[str], str], tuple[str, ...]]] = []
        profile = router.profile
        targets.append((type(router.blocker), "hashing", ()))
        targets.append((type(router.index), _index_stage, ()))
        targets += [(type(f), "filters", ()) for _, f in profile.filters]
        targets += [(type(ws.scorer), "scoring", ()) for ws in profile.scorers]
        targets.append((type(profile), "scoring", ()))
        targets.append((type(profile.picker[1]), "pick", ()))
        targets.append((Decision, "Decision", ("__init__",)))
        try:
            from prefixroute.endpoint import EndpointTable  # the columnar table, where present

            targets.append((EndpointTable, "endpoint table", ("__init__",)))
        except ImportError:
            pass
        sync = getattr(type(router), "_sync_capacities", None)
        saved: list[tuple[type, str, Any]] = []
        done: set[tuple[type, str]] = set()
        try:
            if inspect.isfunction(sync):
                saved.append((type(router), "_sync_capacities", sync))
                type(router)._sync_capacities = self._wrap(sync, "capacity sync")  # type: ignore[method-assign]
            for cls, stage, dunders in targets:
                for klass in cls.__mro__:
                    if not klass.__module__.startswith("prefixroute"):
                        continue
                    for name, value in list(vars(klass).items()):
                        if (klass, name) in done:
                            continue
                        if name.startswith("_") and name not in dunders:
                            continue
                        if not inspect.isfunction(value):
                            continue
                        done.add((klass, name))
                        saved.append((klass, name, value))
                        setattr(klass, name, self._wrap(value, stage))
            yield self
        finally:
            for klass, name, value in reversed(saved):
                setattr(klass, name, value)

    def table(self) -> dict[str, tuple[float, float]]:
        """Per stage: (mean, p50) in microseconds per decision."""
        return {s: (float(np.mean(v)), float(np.median(v))) for s, v in self.samples.items() if v}


def _index_stage(method: str) -> str:
    return {
        "match": "index match",
        "insert": "speculative insert",
        "expire": "index expire",
        "set_capacity": "capacity sync",
    }.get(method, "index other")


# -- one configuration -------------------------------------------------------------------


@attrs.frozen
class Result:
    endpoints: int
    prompt: int
    path: str
    ran: str
    entries: int
    warm_s: float
    passes: dict[str, Pass]
    stages: dict[str, tuple[float, float]] | None
    instrumented: Pass | None


def _pass_json(p: Pass) -> dict[str, Any]:
    return {
        "route_us": p.route_us.tolist(),
        "complete_us": p.complete_us.tolist(),
        "matched": p.matched,
        "cpu_us": p.cpu_us.tolist(),
    }


def _pass_from(d: dict[str, Any]) -> Pass:
    return Pass(
        np.array(d["route_us"]), np.array(d["complete_us"]), d["matched"], np.array(d["cpu_us"])
    )


def result_json(r: Result) -> dict[str, Any]:
    return {
        "endpoints": r.endpoints,
        "prompt": r.prompt,
        "path": r.path,
        "ran": r.ran,
        "entries": r.entries,
        "warm_s": r.warm_s,
        "passes": {k: _pass_json(p) for k, p in r.passes.items()},
        "stages": r.stages,
        "instrumented": None if r.instrumented is None else _pass_json(r.instrumented),
    }


def result_from(d: dict[str, Any], path: str) -> Result:
    stages = d["stages"]
    return Result(
        d["endpoints"],
        d["prompt"],
        path,
        d["ran"],
        d["entries"],
        d["warm_s"],
        {k: _pass_from(p) for k, p in d["passes"].items()},
        None if stages is None else {k: (v[0], v[1]) for k, v in stages.items()},
        None if d["instrumented"] is None else _pass_from(d["instrumented"]),
    )


def measure_baseline(tree: Path, endpoints: int, prompt: int, args: argparse.Namespace) -> Result:
    """The same measurement, in a child process importing `prefixroute` from `tree`/src."""
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree / "src"), str(repo)]))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "baseline.json"
        command = [
            sys.executable, "-m", "benchmarks.route_latency",
            "--endpoints", str(endpoints), "--prompts", str(prompt), "--paths", "default",
            "--entries", str(args.entries), "--decisions", str(args.decisions),
            "--kinds", args.kinds, "--json", str(out), "--quiet",
        ]  # fmt: skip
        if not args.stages:
            command.append("--no-stages")
        if args.freeze:
            command.append("--freeze")
        subprocess.run(command, cwd=repo, env=env, check=True)
        (data,) = json.loads(out.read_text())["results"]
    return result_from(data, "baseline")


def measure(
    endpoints: int,
    prompt: int,
    path: str,
    entries: int,
    decisions: int,
    kinds: Sequence[str],
    stages: bool,
    freeze: bool,
) -> Result:
    compiled = {"compiled": True, "pure": False, "default": None}[path]
    t0 = time.perf_counter()
    router, fleet, work = warm_router(
        endpoints=endpoints, entries=entries, prompt_tokens=prompt, compiled=compiled
    )
    warm_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    half = [work.request(i) for i in range(decisions)]
    requests = {
        "half": half,
        "repeat": half,
        "cold": [
            Request(model="m", token_ids=rng.integers(0, 150_000, prompt, dtype=np.uint32))
            for _ in range(decisions)
        ],
    }
    staged = [work.request(decisions + i) for i in range(decisions)] if stages else []
    now = 1000.0
    # untimed: the first decisions of each kind after the warm-up (lazy compilation, caches)
    spare = [work.request(2 * decisions + i) for i in range(100)]
    spare += [
        Request(model="m", token_ids=rng.integers(0, 150_000, prompt, dtype=np.uint32))
        for _ in range(20)
    ]
    _, now = run_pass(router, fleet, spare, now)
    gc.collect()
    if freeze:
        gc.freeze()
    passes: dict[str, Pass] = {}
    for kind in kinds:
        gc.collect()
        passes[kind], now = run_pass(router, fleet, requests[kind], now)
    table = instrumented = None
    if stages:
        timer = StageTimer()
        gc.collect()
        with timer.instrument(router):
            instrumented, now = run_pass(router, fleet, staged, now, timer)
        table = timer.table()
    result = Result(
        endpoints,
        prompt,
        path,
        describe(router),
        len(router.index),
        warm_s,
        passes,
        table,
        instrumented,
    )
    if freeze:
        gc.unfreeze()
    del router, fleet, work, requests, half, staged
    gc.collect()
    return result


def print_result(r: Result) -> None:
    print(
        f"{r.endpoints} endpoints, {r.prompt:,}-token prompts, {r.path} ({r.ran}): "
        f"{r.entries:,} entries, warmed in {r.warm_s:.1f} s",
        flush=True,
    )
    for kind, p in r.passes.items():
        print(
            f"  {KINDS[kind]:8s} matched {p.matched:4.0%}  route+on_complete p50 {p.p50():7.1f} us"
            f"  p99 {p.p99():7.1f} us (CPU {p.cpu_p99():6.1f})  {p.rate():7,.0f}/s"
            f" ({p.cpu_rate():,.0f}/CPU-s)  (route p50 "
            f"{np.median(p.route_us):6.1f}, on_complete p50 {np.median(p.complete_us):5.1f})",
            flush=True,
        )
    if r.stages is not None and r.instrumented is not None:
        print(
            f"  stages (half hit, instrumented: p50 {r.instrumented.p50():.1f} us): "
            + ", ".join(f"{s} {mean:.1f}" for s, (mean, _) in r.stages.items() if mean >= 0.05),
            flush=True,
        )


# -- reports -------------------------------------------------------------------------------


def tree_state(source: Path) -> str:
    """The git commit and modified files of the checkout holding `source`, if any."""
    try:
        head = subprocess.run(
            ["git", "log", "-1", "--format=%h %cd", "--date=format:%Y-%m-%d %H:%M"],
            capture_output=True,
            text=True,
            check=True,
            cwd=source,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            cwd=source,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head}, {len(dirty)} tracked files modified"


def report(results: list[Result], kinds: Sequence[str]) -> None:
    by = {(r.endpoints, r.prompt, r.path): r for r in results}
    paths = list(dict.fromkeys(r.path for r in results))
    print("\n## Per decision: route + on_complete (GC on)\n")
    print(
        "| endpoints | prompt | path | entries | kind | matched | p50 us | p99 us "
        "| p99 CPU us | decisions/s | per CPU-second |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for kind, p in r.passes.items():
            print(
                f"| {r.endpoints:,} | {r.prompt:,} | {r.path} | {r.entries:,} | {KINDS[kind]} "
                f"| {p.matched:.0%} | {p.p50():.1f} | {p.p99():.1f} | {p.cpu_p99():.1f} "
                f"| {p.rate():,.0f} | {p.cpu_rate():,.0f} |"
            )
    for slow in ("pure", "baseline"):
        if not {"compiled", slow} <= set(paths):
            continue
        print(f"\n## {slow.capitalize()} over compiled (same run, same requests)\n")
        print(
            f"| endpoints | prompt | kind | p50: {slow} / compiled | p99 CPU | CPU per decision |"
        )
        print("|---|---|---|---|---|---|")
        for (e, tokens, path), r in by.items():
            other = by.get((e, tokens, slow))
            if path != "compiled" or other is None:
                continue
            for kind in kinds:
                a, b = r.passes.get(kind), other.passes.get(kind)
                if a is None or b is None:
                    continue
                print(
                    f"| {e:,} | {tokens:,} | {KINDS[kind]} | {b.p50() / a.p50():.1f}x "
                    f"| {b.cpu_p99() / a.cpu_p99():.1f}x | {a.cpu_rate() / b.cpu_rate():.1f}x |"
                )
    configs = list(dict.fromkeys((r.endpoints, r.prompt) for r in results if r.stages))
    for e, tokens in configs:
        side = [x for path in paths if (x := by.get((e, tokens, path))) and x.stages]
        print(f"\n## Stages side by side, {e:,} endpoints x {tokens:,} tokens: p50 (mean) us\n")
        print("| stage | " + " | ".join(r.path for r in side) + " |")
        print("|---|" + "---|" * len(side))
        for stage in STAGES:
            cells = []
            for r in side:
                assert r.stages is not None
                mean, p50 = r.stages.get(stage, (0.0, 0.0))
                cells.append(f"{p50:.1f} ({mean:.1f})")
            print(f"| {stage} | " + " | ".join(cells) + " |")
    for path in paths:
        staged = [r for r in results if r.path == path and r.stages]
        if not staged:
            continue
        print(f"\n## Stages, {path} path: mean us per half-hit decision (p50 in brackets)\n")
        print(
            "| stage | "
            + " | ".join(f"{r.endpoints:,} x {r.prompt // 1024}k" for r in staged)
            + " |"
        )
        print("|---|" + "---|" * len(staged))
        for stage in STAGES:
            cells = []
            for r in staged:
                assert r.stages is not None
                mean, p50 = r.stages.get(stage, (0.0, 0.0))
                cells.append(f"{mean:.1f} ({p50:.1f})")
            print(f"| {stage} | " + " | ".join(cells) + " |")
        cells = []
        for r in staged:
            assert r.instrumented is not None
            clean = r.passes.get("half")
            ref = f" / {clean.total_us.mean():.1f}" if clean else ""
            cells.append(f"{r.instrumented.total_us.mean():.1f}{ref}")
        print("| total: instrumented / clean | " + " | ".join(cells) + " |")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decisions", type=int, default=3000, help="per kind and stage pass")
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--endpoints", default="8,64,1000", help="comma-separated fleet sizes")
    parser.add_argument("--prompts", default="1024,4096,16384", help="prompt lengths, tokens")
    parser.add_argument(
        "--paths",
        default="compiled,pure" if COMPILED_AVAILABLE else "pure",
        help="compiled, pure, default (each class's default)",
    )
    parser.add_argument("--kinds", default="half,repeat,cold")
    parser.add_argument("--no-stages", dest="stages", action="store_false")
    parser.add_argument("--freeze", action="store_true", help="gc.freeze() after the warm-up")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also measure the prefixroute in DIR/src (e.g. `git archive HEAD | tar -x -C DIR`), "
        "in a child process per configuration, as the path 'baseline'",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="no tables (with --json)")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; choose from {sorted(KINDS)}")
    paths = [p for p in args.paths.split(",") if p]
    if set(paths) - {"compiled", "pure", "default"}:
        parser.error("paths are compiled, pure or default")
    if "compiled" in paths and not COMPILED_AVAILABLE:
        parser.error("the compiled path needs numba (the `fast` extra)")
    if args.baseline is not None and not (args.baseline / "src" / "prefixroute").is_dir():
        parser.error(f"--baseline {args.baseline}: no src/prefixroute there")
    source = Path(prefixroute.__file__).parent
    print(
        f"route_latency: prefixroute from {source} (tree {tree_state(source)}); "
        f"entries {args.entries:,}, "
        f"{args.decisions:,} decisions per kind, GC on"
        + (" (frozen after warm-up)" if args.freeze else ""),
        flush=True,
    )
    results = []
    for endpoints in (int(x) for x in args.endpoints.split(",")):
        for prompt in (int(x) for x in args.prompts.split(",")):
            for path in paths:
                result = measure(
                    endpoints,
                    prompt,
                    path,
                    args.entries,
                    args.decisions,
                    kinds,
                    args.stages,
                    args.freeze,
                )
                if not args.quiet:
                    print_result(result)
                results.append(result)
            if args.baseline is not None:
                result = measure_baseline(args.baseline, endpoints, prompt, args)
                print_result(result)
                results.append(result)
    if args.json is not None:
        args.json.write_text(json.dumps({"results": [result_json(r) for r in results]}))
    if not args.quiet:
        report(results, kinds)


if __name__ == "__main__":
    main()
