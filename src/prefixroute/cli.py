"""The `prefixroute` command line (a driver: it owns printing and the clock).

prefixroute demo                             compare routing policies on the built-in demo scenario
prefixroute simulate --scenario S --policy P simulate one policy on a scenario
prefixroute compare --scenario S --policies a,b,c
                                             simulate several policies, print one table
prefixroute explain [--config FILE] [--quiet]
                                             route a built-in request set, explain each decision
prefixroute check-config FILE [--kind K]     validate a router, gateway, ext_proc, simulator
                                             policy or scenario document, say which it is
prefixroute serve --config FILE              run the OpenAI-compatible gateway
prefixroute extproc --config FILE            run the Envoy ext_proc endpoint picker
prefixroute fake-engine [--port P]           run a stand-in vLLM server (the simulator's model)
prefixroute demo --live                      fake engines + gateway + load, live in the terminal
prefixroute version
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefixroute import __version__
from prefixroute.config import ConfigError, load_config
from prefixroute.decision import Decision, Rejection
from prefixroute.drivers.documents import read_document
from prefixroute.drivers.sections import DRIVER_SECTIONS
from prefixroute.endpoint import EndpointState
from prefixroute.openai import parse_openai
from prefixroute.request import RequestError, Usage
from prefixroute.router import Router
from prefixroute.schema import DocumentError

__all__ = ["CONFIG_KINDS", "check_config", "config_kind", "demo_requests", "main"]

# The seed experiment's three tenant personas: one sentence repeated five times.
PERSONAS = {
    "finance": "You are a financial analyst assistant specializing in market data. " * 5,
    "devops": "You are a DevOps engineer assistant specializing in Kubernetes and CI/CD. " * 5,
    "datasci": "You are a data scientist assistant specializing in ML pipelines. " * 5,
}
QUESTIONS = ("Summarize the key points.", "What should I focus on?", "Give me 3 recommendations.")


def _chat(
    tenant: str, system: str, *turns: str, max_tokens: int = 80
) -> tuple[dict[str, Any], dict[str, str]]:
    messages = [{"role": "system", "content": system}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    body = {"model": "qwen3-0.6b", "messages": messages, "max_tokens": max_tokens}
    return body, {"x-tenant-id": tenant}


def demo_requests() -> list[tuple[dict[str, Any], dict[str, str]]]:
    """The built-in request set: tenant personas, a growing chat, cold questions, one bad body."""
    reqs = []
    for round_ in range(2):
        for tenant, system in PERSONAS.items():
            reqs.append(_chat(tenant, system, QUESTIONS[round_ % 3]))
    history = ["How do I roll out a canary deployment?", "Use a second Deployment with ..."]
    for turn in range(3):
        body, headers = _chat("devops", PERSONAS["devops"], *history)
        headers["x-session-id"] = "chat-42"
        reqs.append((body, headers))
        history += [f"And step {turn + 2}?", f"Step {turn + 2} is to watch the error rate ..."]
    for n in (17, 256, 901):
        reqs.append(({"model": "qwen3-0.6b", "prompt": f"Question {n}", "max_tokens": 50}, {}))
    reqs.append(({"model": "qwen3-0.6b", "messages": "not a list"}, {}))
    return reqs


def demo_fleet(now: float) -> list[EndpointState]:
    """Four endpoints with mixed load; the last one is unhealthy."""
    loads = {"pod-a": (0, 3, 0.20), "pod-b": (2, 6, 0.45), "pod-c": (0, 1, 0.05)}
    fleet = [
        EndpointState(
            id=pod,
            address=f"10.0.0.{i + 1}:8000",
            waiting=waiting,
            running=running,
            kv_usage=kv,
            kv_capacity_blocks=4096,
            observed_at=now,
        )
        for i, (pod, (waiting, running, kv)) in enumerate(loads.items())
    ]
    fleet.append(EndpointState(id="pod-d", address="10.0.0.4:8000", healthy=False, observed_at=now))
    return fleet


def run_demo(router: Router, *, quiet: bool = False, out: Any = None) -> list[Decision]:
    """Route the built-in set on a virtual clock, settle each request, print the explanations."""
    out = out if out is not None else sys.stdout
    decisions: list[Decision] = []
    now = 0.0
    for i, (body, headers) in enumerate(demo_requests()):
        now += 0.25
        headers = {**headers, "x-request-id": f"demo-{i}"}
        try:
            request = parse_openai(body, headers)
        except RequestError as exc:
            print(f"request demo-{i}: rejected with {exc.status}: {exc}", file=out)
            continue
        result = router.route(request, demo_fleet(now), now)
        if isinstance(result, Rejection):
            print(f"request demo-{i}: rejected with {result.status}: {result.reason}", file=out)
            continue
        if not isinstance(result, Decision):  # deferred: the demo's policies never defer
            print(f"request demo-{i}: deferred: {result.reason}", file=out)
            continue
        decisions.append(result)
        if not quiet:
            print(result.explain(), file=out)
            print(file=out)
        usage = Usage(
            prompt_tokens=result.prompt_tokens,
            cached_tokens=result.predicted_cached_tokens,
            completion_tokens=request.max_tokens or 0,
            ttft_s=0.015,
            e2e_s=0.4,
        )
        router.on_complete(result, usage, now + 0.2)
    hits = sum(d.predicted_cached_tokens for d in decisions)
    total = sum(d.prompt_tokens for d in decisions)
    split: dict[str, int] = {}
    for d in decisions:
        split[d.endpoint] = split.get(d.endpoint, 0) + 1
    print(
        f"routed {len(decisions)} requests; predicted prefix-cache hit rate "
        f"{hits / max(total, 1):.1%}; per endpoint: "
        + ", ".join(f"{k}={v}" for k, v in sorted(split.items())),
        file=out,
    )
    return decisions


# The demo: 500 Zipf tenants whose prompts outgrow the fleet's KV, 60 simulated seconds.
DEMO_SCENARIO = "tenants-500"
DEMO_DURATION_S = 60.0
DEMO_POLICIES = (
    "round-robin",
    "least-request",
    "session-hash",
    "gie-default",
    "sglang-cache-aware",
    "dynamo-kv",
    "prefixroute",
)


class Progress:
    """A one-line progress bar on stderr, shown only once a run has taken `after_s` seconds."""

    def __init__(self, label: str, total_s: float, *, enabled: bool, after_s: float = 2.0) -> None:
        self.label = label
        self.total_s = total_s
        self.enabled = enabled
        self.after_s = after_s
        self.started = time.perf_counter()
        self.shown = 0.0

    def __call__(self, virtual_s: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.started < self.after_s or now - self.shown < 0.2:
            return
        self.shown = now
        frac = min(1.0, virtual_s / self.total_s) if self.total_s > 0 else 1.0
        bar = "#" * int(frac * 30)
        print(
            f"\r{self.label:<20} [{bar:<30}] {frac:4.0%} {now - self.started:5.1f} s",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.enabled and self.shown:
            print("\r" + " " * 72 + "\r", end="", file=sys.stderr, flush=True)


def run_simulations(
    scenario_name: str,
    policy_names: Sequence[str],
    *,
    endpoints: int | None = None,
    duration_s: float | None = None,
    seed: int | None = None,
    json_path: str | None = None,
    plot_path: str | None = None,
    progress: bool | None = None,
    out: Any = None,
) -> list[dict[str, Any]]:
    """Load a scenario and policies, run each, print the table; write JSON and a plot if asked.

    ScenarioError / ConfigError propagate to `main`, which turns them into exit status 2.
    """
    from prefixroute.sim.compare import run_policy
    from prefixroute.sim.policy import load_policy
    from prefixroute.sim.report import format_fairness, format_table, format_tenants, plot_runs
    from prefixroute.sim.scenario import load_scenario

    out = out if out is not None else sys.stdout
    scenario = load_scenario(scenario_name).with_overrides(
        endpoints=endpoints, duration_s=duration_s, seed=seed
    )
    policies = [load_policy(p) for p in policy_names]
    show = sys.stderr.isatty() if progress is None else progress
    print(
        f"scenario {scenario.name}: {scenario.endpoints} x {scenario.cost.name}, "
        f"{scenario.engine.kv_capacity_tokens:,} KV tokens each, {scenario.duration_s:g} s, "
        f"seed {scenario.seed}",
        file=out,
    )
    if scenario.description:
        print(f"  {scenario.description}", file=out)
    runs = []
    for policy in policies:
        bar = Progress(policy.name, scenario.duration_s, enabled=show)
        try:
            runs.append(run_policy(scenario, policy, progress=bar))
        finally:
            bar.close()
    results = [r.summary for r in runs]
    print(format_table(results), file=out)
    print(file=out)
    if len(results) == 1:
        print(format_tenants(results[0]), file=out)
    else:
        print(format_fairness(results), file=out)
    counts = sorted({r["requests"] for r in results})
    requests = f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,}-{counts[-1]:,}"
    print(
        f"{requests} requests per policy; simulated in "
        + ", ".join(f"{r['wall_s']:.1f}" for r in results)
        + " s",
        file=out,
    )
    if json_path:
        doc: Any = results[0] if len(results) == 1 else {"results": results}
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
    if plot_path:
        plot_runs([(r.summary["policy"], r.simulation) for r in runs], plot_path)
    return results


def _sim_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", required=True, help="a built-in scenario name or a YAML/JSON file")
    p.add_argument("--endpoints", type=int, help="override the scenario's endpoint count")
    p.add_argument("--duration", type=float, help="override the scenario's duration (s)")
    p.add_argument("--seed", type=int, help="override the scenario's seed")
    p.add_argument("--json", dest="json_path", help="write the figures as JSON here")
    p.add_argument("--plot", dest="plot_path", help="write plots to this PNG (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")


# Commands served by drivers and dev tools, which need the `gateway` extra: their modules are
# imported only when the command runs, so the simulator's commands start fast.
_DRIVER_COMMANDS = {
    "serve": ("prefixroute.drivers.gateway.server", "run the OpenAI-compatible gateway"),
    "fake-engine": ("prefixroute.devtools.fake_engine", "run a stand-in vLLM server"),
    "bench": (
        "prefixroute.devtools.bench",
        "replay a scenario or a Mooncake trace against OpenAI URLs and report",
    ),
    "extproc": (
        "prefixroute.drivers.extproc",
        "run the Envoy ext_proc endpoint picker (Gateway API Inference Extension protocol)",
    ),
}


def _driver_module(name: str, module: str) -> Any:
    """The driver `module`, or a one-line message when its extra is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = "extproc" if module.endswith("extproc") else "gateway"
        return f"{name} needs the {extra} extra: pip install 'prefixroute[{extra}]' ({exc})"


def _driver_parser(
    sub: Any, name: str, module: str, text: str, *, load: bool
) -> argparse.ArgumentParser:
    """The sub-parser of a driver command; its arguments only when `load` (it will run)."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text)
    p.set_defaults(driver_main=None, driver_error="")
    if not load:
        return p
    mod = _driver_module(name, module)
    if isinstance(mod, str):
        p.set_defaults(driver_error=mod)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        return p
    mod.cli_arguments(p)
    p.set_defaults(driver_main=mod.cli_main)
    return p


# -- check-config ----------------------------------------------------------------------

CONFIG_KINDS = {
    "router": "router config",
    "gateway": "gateway config",
    "extproc": "ext_proc config",
    "policy": "simulator policy",
    "scenario": "scenario",
}
"""The kinds of config document `check-config` knows (`--kind` values), with their names."""

# The sections each kind has and the router document has not. The gateway's are
# `prefixroute.drivers.settings.DRIVER_SECTIONS` (a test keeps them equal): spelled out here
# so that recognising a document imports no driver.
_GATEWAY_KEYS = DRIVER_SECTIONS
_SCENARIO_KEYS = ("name", "description", "duration_s", "metrics_interval_s", "workload")


def config_kind(doc: Mapping[str, Any]) -> str:
    """The kind of config document `doc` is (a `CONFIG_KINDS` key), recognised by its keys.

    `extproc` -> ext_proc config (it may hold the gateway's sections too);
    `server`, `endpoints` (a list), `scrape`, `identity`, `metrics`,
    `kv_events`, `models`, `shared_state` -> gateway config; `simulator` ->
    simulator policy; `name`, `description`,
    `duration_s`, `metrics_interval_s`, `workload` or an `endpoints` mapping
    (`{count, profile}`) -> scenario; otherwise a router config (which is
    also a simulator policy without a `simulator` section). A document with
    the keys of two kinds is a ConfigError naming both: `--kind` decides; an
    Envoy bootstrap (`static_resources`, `admin`) is a ConfigError saying so.
    O(keys).
    """
    if "static_resources" in doc or "admin" in doc:  # Envoy's bootstrap, e.g. examples/envoy/
        raise ConfigError(
            "", "this is an Envoy config (static_resources/admin), not a prefixroute config"
        )
    endpoints = doc.get("endpoints")
    scenario = [k for k in _SCENARIO_KEYS if k in doc]
    if isinstance(endpoints, Mapping):
        scenario.append("endpoints")
    gateway = [k for k in _GATEWAY_KEYS if k in doc and k not in scenario]
    marks = {
        "extproc": ["extproc"] if "extproc" in doc else [],
        "gateway": gateway,
        "policy": ["simulator"] if "simulator" in doc else [],
        "scenario": scenario,
    }
    if marks["extproc"]:
        marks["gateway"] = []  # an ext_proc config holds the drivers' shared sections
    found = [kind for kind, keys in marks.items() if keys]
    if len(found) > 1:
        named = " and ".join(f"a {CONFIG_KINDS[kind]} ({', '.join(marks[kind])})" for kind in found)
        raise ConfigError("", f"looks like {named}: pass --kind to say which")
    return found[0] if found else "router"


def check_config(path: str | Path, kind: str | None = None) -> tuple[str, str]:
    """Validate the config document at `path` as `kind` (default: `config_kind`).

    Returns (kind, a one-line summary). Each kind is read by the loader that
    runs it (`load_config`, `DriverConfig.from_file`, `ExtProcConfig.from_file`,
    `load_policy`, `load_scenario` and its workload), imported only for that
    kind, so a router config is checked without the drivers' extras. Raises
    a `DocumentError` (ConfigError or ScenarioError) naming the field, or
    ImportError when the kind's extra is not installed.
    """
    if kind is None:
        kind = config_kind(read_document(path))
    if kind == "router":
        router = load_config(read_document(path))
        return kind, f"profile {router.profile.name}"
    if kind == "gateway":
        from prefixroute.drivers.settings import DriverConfig

        driver = DriverConfig.from_file(path)
        return kind, _driver_summary(
            driver, f"listens on {driver.server.host}:{driver.server.port}"
        )
    if kind == "extproc":
        from prefixroute.drivers.extproc import ExtProcConfig

        config = ExtProcConfig.from_file(path)
        where = f"gRPC on {config.extproc.host}:{config.extproc.port}"
        return kind, _driver_summary(config.driver, where)
    if kind == "policy":
        from prefixroute.sim.policy import load_policy

        policy = load_policy(Path(path))
        router = policy.build(0)
        events = "on" if policy.kv_events else "off"
        return kind, f"profile {router.profile.name}, kv_events {events}"
    if kind == "scenario":
        from prefixroute.sim.compare import make_source
        from prefixroute.sim.scenario import load_scenario

        scenario = load_scenario(Path(path))
        make_source(scenario)  # the workload (and a trace file) is read when a run builds it
        return kind, (
            f"{scenario.name or Path(path).stem}, {scenario.endpoints} x {scenario.cost.name}, "
            f"{scenario.duration_s:g} s"
        )
    raise ValueError(f"unknown config kind {kind!r} (known: {', '.join(CONFIG_KINDS)})")


def _driver_summary(driver: Any, where: str) -> str:
    """'profile P, N endpoints (+F files), WHERE' for a `DriverConfig`."""
    files = f" and {len(driver.endpoint_files)} endpoint files" if driver.endpoint_files else ""
    count = len(driver.endpoints)
    return (
        f"profile {driver.build_router().profile.name}, "
        f"{count} endpoint{'' if count == 1 else 's'}{files}, {where}"
    )


_EXTRAS = {"gateway": "gateway", "extproc": "extproc"}
"""The extra each kind's loader needs (a gateway config: aiohttp and prometheus-client)."""


def _check_config_command(path: str, kind: str | None) -> int:
    """`check-config`: 'PATH: ok (KIND: summary)' and 0, or one line on stderr and 2."""
    what = "config"
    try:
        kind = kind or config_kind(read_document(path))
        what = CONFIG_KINDS[kind]
        _, summary = check_config(path, kind)
    except DocumentError as exc:
        print(f"prefixroute: {path}: invalid {what}: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except ImportError as exc:
        extra = _EXTRAS.get(kind or "", "gateway")
        print(
            f"prefixroute: {path}: checking a {what} needs the {extra} extra: "
            f"pip install 'prefixroute[{extra}]' ({exc})",
            file=sys.stderr,
        )
        return 2
    print(f"{path}: ok ({what}: {summary})")
    return 0


def _one_line(text: str) -> str:
    """`text` on one line (a loader's message may span several; YAML syntax errors no longer do)."""
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `prefixroute` command."""
    parser = argparse.ArgumentParser(prog="prefixroute", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    demo = sub.add_parser("demo", help="compare routing policies on the built-in demo scenario")
    demo.add_argument(
        "--live", action="store_true", help="fake engines + gateway + load, live (see --live -h)"
    )
    live = None
    if argv[:1] == ["demo"] and "--live" in argv:
        live = _driver_module("demo --live", "prefixroute.devtools.live")
    if isinstance(live, str):
        print(f"prefixroute: {live}", file=sys.stderr)
        return 2
    if live is not None:
        live.cli_arguments(demo)
    else:
        demo.add_argument("--duration", type=float, help="override the scenario's duration (s)")
    simulate = sub.add_parser("simulate", help="simulate one policy on a scenario")
    _sim_args(simulate)
    simulate.add_argument("--policy", required=True, help="a built-in policy name or a file")
    compare = sub.add_parser("compare", help="simulate several policies on one scenario")
    _sim_args(compare)
    compare.add_argument("--policies", required=True, help="comma-separated names or files")
    explain = sub.add_parser("explain", help="route a built-in request set, explain each decision")
    explain.add_argument("--config", help="a router config (YAML/JSON); default: built-in profile")
    explain.add_argument("--quiet", action="store_true", help="print only the summary")
    check = sub.add_parser(
        "check-config",
        help="validate a config document of any kind the project reads; say which kind it is",
    )
    check.add_argument("path")
    check.add_argument(
        "--kind", choices=tuple(CONFIG_KINDS), help="check as this kind (default: recognise it)"
    )
    sub.add_parser("version", help="print the version")
    for name, (module, text) in _DRIVER_COMMANDS.items():
        _driver_parser(sub, name, module, text, load=name in argv[:1])
    # a driver whose extra is missing takes any arguments: its message says what to install
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "driver_error", ""):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    if args.command == "version":
        print(__version__)
        return 0
    if args.command == "demo" and live is not None:
        return int(live.cli_main(args))
    if args.command in _DRIVER_COMMANDS:
        if args.driver_main is None:
            print(f"prefixroute: {args.driver_error}", file=sys.stderr)
            return 2
        return int(args.driver_main(args))
    if args.command in ("demo", "simulate", "compare"):
        return _simulate_command(args)
    if args.command == "check-config":
        return _check_config_command(args.path, args.kind)
    try:
        router = load_config(read_document(args.config)) if args.config else Router.default()
    except ConfigError as exc:
        print(f"prefixroute: invalid config: {exc}", file=sys.stderr)
        return 2
    run_demo(router, quiet=args.quiet)
    return 0


def _simulate_command(args: argparse.Namespace) -> int:
    from prefixroute.sim.schema import ScenarioError
    from prefixroute.sim.simulation import PolicyMismatch

    try:
        if args.command == "demo":
            duration = DEMO_DURATION_S if args.duration is None else args.duration
            run_simulations(DEMO_SCENARIO, DEMO_POLICIES, duration_s=duration)
            return 0
        names = [args.policy] if args.command == "simulate" else args.policies.split(",")
        names = [n.strip() for n in names if n.strip()]
        if not names:
            print("prefixroute: --policies names no policy", file=sys.stderr)
            return 2
        run_simulations(
            args.scenario,
            names,
            endpoints=args.endpoints,
            duration_s=args.duration,
            seed=args.seed,
            json_path=args.json_path,
            plot_path=args.plot_path,
            progress=False if args.no_progress else None,
        )
    except ScenarioError as exc:
        print(f"prefixroute: invalid scenario: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"prefixroute: invalid policy: {exc}", file=sys.stderr)
        return 2
    except PolicyMismatch as exc:  # a policy that cannot drive these engines (KV events)
        print(f"prefixroute: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"prefixroute: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
