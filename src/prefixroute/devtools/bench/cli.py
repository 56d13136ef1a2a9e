"""`prefixroute bench`'s command line: flags, their checks, the run, the report.

    prefixroute bench --url http://127.0.0.1:8080 [--url ...] --scenario seed --duration 10
    prefixroute bench --url URL --scenario conversation.jsonl.gz --time-scale 0.1
    prefixroute bench --url URL --scenario my-scenario.yaml --rate 32 --json out.json

Flags are checked before any URL is tried: the run's settings by
`LoadConfig` (its errors name the field, said here as the flag), the
command's own (`--time-scale`, `--json`) here. Every `--url` is then probed
once (`GET URL/v1/models` must answer 200); a URL ending in `/v1`, the
OpenAI SDK's `base_url`, is taken without it, with a hint on stderr. Bad
input is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

import aiohttp
import attrs

from prefixroute.devtools.bench.config import PROCESSES, LoadConfig, LoadConfigError
from prefixroute.devtools.bench.report import LoadReport, Result, _pct
from prefixroute.devtools.bench.runner import run_load
from prefixroute.devtools.bench.send import SPREADS, discover_model, error_name, run_with_uvloop
from prefixroute.devtools.bench.wire import MODEL, Workload, scenario_source

__all__ = ["cli_arguments", "cli_main"]

_FLAGS = {
    "rate_rps": "--rate",
    "users": "--users",
    "duration_s": "--duration",
    "max_requests": "--max-requests",
    "seed": "--seed",
    "process": "--process",
    "think_s": "--think",
    "max_tokens": "--max-tokens",
    "timeout_s": "--timeout",
    "spread": "--spread",
}
"""The flag that sets each `LoadConfig` field, for its errors."""


class _Progress:
    """The progress line: elapsed time, requests answered, failures, req/s, hit rate so far.

    Results are counted as they arrive (O(1) each); `draw` writes one line,
    redrawn in place (carriage return) on a terminal, one line per call otherwise.
    """

    def __init__(self, out: TextIO, tty: bool) -> None:
        self.out = out
        self.tty = tty
        self.t0 = time.monotonic()
        self.done = self.failed = self.prompt = self.cached = 0

    def add(self, result: Result) -> None:
        self.done += 1
        if not result.ok:
            self.failed += 1
        elif result.prompt_tokens is not None and result.cached_tokens is not None:
            self.prompt += result.prompt_tokens
            self.cached += result.cached_tokens

    def draw(self, final: bool = False) -> None:
        elapsed = time.monotonic() - self.t0
        hit = _pct(self.cached / self.prompt if self.prompt else None)
        line = (
            f"bench {elapsed:6.1f} s  {self.done} done ({self.failed} failed),"
            f" {self.done / max(elapsed, 1e-9):.1f} req/s, hit rate {hit}"
        )
        if self.tty:
            self.out.write("\r\x1b[K" + line + ("\n" if final else ""))
        else:
            self.out.write(line + "\n")
        self.out.flush()


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `prefixroute bench`'s options to `parser`."""
    parser.add_argument(
        "--url",
        action="append",
        required=True,
        help="OpenAI base URL, e.g. http://127.0.0.1:8080 (a trailing /v1 is dropped; repeat "
        "for several; see --spread)",
    )
    parser.add_argument(
        "--scenario",
        default="seed",
        help="a built-in scenario name, a scenario file (YAML/JSON), or a Mooncake trace "
        "(.jsonl or .jsonl.gz) (default: seed)",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        help="multiply a trace's timestamps by this (e.g. 0.1: ten times faster; default 1)",
    )
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--rate", type=float, help="open loop: arrivals per second, in the scenario's order"
    )
    load.add_argument(
        "--users",
        "--concurrency",
        dest="users",
        type=int,
        help="closed loop: concurrent users, each waiting for its answer",
    )
    parser.add_argument(
        "--process",
        choices=PROCESSES,
        help="--rate arrivals: Poisson or evenly spaced (default poisson)",
    )
    parser.add_argument(
        "--think",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="--users: think time range in seconds (default 0.5 2.0)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument("--max-requests", type=int, help="stop after this many requests")
    parser.add_argument(
        "--spread",
        choices=SPREADS,
        default="round-robin",
        help="several URLs: round-robin per request, or sticky per session/tenant",
    )
    parser.add_argument("--no-stream", action="store_true", help="non-streaming requests")
    parser.add_argument("--seed", type=int, help="workload seed (default: the scenario's)")
    parser.add_argument("--model", help="model name (default: the first URL's first /v1/models)")
    parser.add_argument("--max-tokens", type=int, help="override every request's max_tokens")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout (s)")
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="write the summary as JSON ('-': stdout, the report then goes to stderr)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress line on stderr, once a second (default: when stderr is a terminal)",
    )


class _BadInput(Exception):
    """A command-line input the run cannot start with (exit status 2)."""


def _config(args: argparse.Namespace) -> LoadConfig:
    """The run's settings from the flags: _BadInput naming the flag for a bad one."""
    try:
        return LoadConfig(
            rate_rps=args.rate,
            users=args.users,
            duration_s=args.duration,
            max_requests=args.max_requests,
            stream=not args.no_stream,
            seed=0 if args.seed is None else args.seed,
            process=args.process,
            think_s=None if args.think is None else (args.think[0], args.think[1]),
            max_tokens=args.max_tokens,
            timeout_s=args.timeout,
            spread=args.spread,
        )
    except LoadConfigError as exc:
        raise _BadInput(exc.describe(_FLAGS)) from exc


def _check(args: argparse.Namespace) -> None:
    """_BadInput for a flag of the command's own out of range (or a --json file with no folder)."""
    if args.time_scale is not None and not 0 < args.time_scale < math.inf:
        raise _BadInput(f"--time-scale must be finite and > 0, got {args.time_scale:g}")
    if args.json not in (None, "-") and not Path(args.json).resolve().parent.is_dir():
        raise _BadInput(f"--json: no directory for {args.json}")


def _base_url(url: str) -> str:
    """`url` without a trailing slash and a trailing `/v1` (the OpenAI SDK's `base_url`)."""
    base = url.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
        print(
            f"prefixroute bench: --url {url}: using {base} (the bench adds /v1/... itself)",
            file=sys.stderr,
        )
    return base


async def _probe(client: aiohttp.ClientSession, url: str) -> None:
    """Check that `url/v1/models` answers 200: _BadInput if not, or if `url` answers nothing."""
    models = url + "/v1/models"
    try:
        async with client.get(models, allow_redirects=False) as resp:
            await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _BadInput(f"cannot reach {url}: {error_name(exc)} ({exc})") from exc
    if resp.status != 200:
        raise _BadInput(
            f"{models} answered {resp.status}: --url is the base URL the bench adds /v1/... to"
        )


@attrs.frozen
class _Run:
    """What `_bench` ran: the report, a title line, the workload, the URLs it used."""

    report: LoadReport
    title: str
    workload: Workload
    urls: tuple[str, ...]


async def _bench(args: argparse.Namespace, progress: _Progress | None) -> _Run:
    """Check the flags, probe the URLs, build the workload, run it."""
    config = _config(args)
    _check(args)
    urls = tuple(_base_url(url) for url in args.url)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as probe:
        for url in urls:
            await _probe(probe, url)
        model = args.model or await discover_model(probe, urls[0]) or MODEL
    try:
        workload = scenario_source(
            args.scenario,
            model=model,
            seed=args.seed,
            duration_s=config.duration_s,
            time_scale=args.time_scale,
            timed=config.rate_rps is None and config.users is None,
        )
    except ValueError as exc:
        raise _BadInput(str(exc)) from exc
    if workload.timed:
        how = "scenario timing"
    elif config.rate_rps is not None:
        how = f"{config.rate_rps:g} req/s open loop ({config.arrivals})"
    else:
        how = f"{config.users} closed-loop users"
    title = f"{workload.name}: {how}, {config.duration_s:g} s, model {model}, {len(urls)} URL(s)"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        # SIGINT: finish what is in flight, then report
        loop.add_signal_handler(signal.SIGINT, stop.set)
    run = asyncio.create_task(
        run_load(
            urls,
            **attrs.asdict(config, recurse=False),
            source=workload.source,
            model=model,
            on_result=None if progress is None else progress.add,
            stop=stop,
        )
    )
    try:
        while not run.done():
            await asyncio.wait({run}, timeout=1.0)
            if progress is not None:
                progress.draw(final=run.done())
        return _Run(run.result(), title, workload, urls)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGINT)


def cli_main(args: argparse.Namespace) -> int:
    """Run the bench and print its report; 0 if every request succeeded, 1 otherwise, 2 for
    bad input (unknown scenario, unreadable or empty file, unreachable URL, bad option).

    With `--json -` stdout carries the JSON alone and the report goes to stderr.
    """
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    progress = _Progress(sys.stderr, sys.stderr.isatty()) if show else None
    try:
        ran = run_with_uvloop(_bench(args, progress))
    except (_BadInput, ValueError) as exc:
        print(f"prefixroute bench: {' '.join(str(exc).split())}", file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt:
        return 130
    report = ran.report
    human = sys.stderr if args.json == "-" else sys.stdout
    print(ran.title, file=human)
    for line in report.lines():
        print(line, file=human)
    if args.json:
        doc = {
            "run": ran.title,
            "scenario": args.scenario,
            "description": ran.workload.description,
            "urls": list(ran.urls),
            **report.as_dict(),
        }
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            try:
                Path(args.json).write_text(text + "\n", encoding="utf-8")
            except OSError as exc:
                print(f"prefixroute bench: cannot write {args.json}: {exc}", file=sys.stderr)
                return 2
    return 0 if report.failures == 0 and report.ok > 0 else 1
