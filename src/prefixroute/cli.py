"""The `prefixroute` command line (a driver: it owns printing and the clock).

prefixroute demo [--config FILE] [--quiet]   route a built-in request set, explain each decision
prefixroute check-config FILE                validate a config document
prefixroute version
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from prefixroute import __version__
from prefixroute.config import ConfigError, load_config
from prefixroute.decision import Decision
from prefixroute.endpoint import EndpointState
from prefixroute.request import Request, RequestError, Usage
from prefixroute.router import Router

__all__ = ["demo_requests", "main"]

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
            request = Request.from_openai(body, headers)
        except RequestError as exc:
            print(f"request demo-{i}: rejected with {exc.status}: {exc}", file=out)
            continue
        result = router.route(request, demo_fleet(now), now)
        if not isinstance(result, Decision):
            print(f"request demo-{i}: rejected with {result.status}: {result.reason}", file=out)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `prefixroute` command."""
    parser = argparse.ArgumentParser(prog="prefixroute", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="route a built-in request set and explain each decision")
    demo.add_argument("--config", help="a router config (YAML/JSON); default: built-in profile")
    demo.add_argument("--quiet", action="store_true", help="print only the summary")
    check = sub.add_parser("check-config", help="validate a router config document")
    check.add_argument("path")
    sub.add_parser("version", help="print the version")
    args = parser.parse_args(argv)

    if args.command == "version":
        print(__version__)
        return 0
    try:
        if args.command == "check-config":
            router = load_config(args.path)
            print(f"{args.path}: ok (profile {router.profile.name})")
            return 0
        router = load_config(args.config) if args.config else Router.default()
    except ConfigError as exc:
        print(f"prefixroute: invalid config: {exc}", file=sys.stderr)
        return 2
    run_demo(router, quiet=args.quiet)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
