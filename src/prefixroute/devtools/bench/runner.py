"""When requests go: `run_load` and its three send loops (open, closed, scenario timing).

* scenario timing (neither `rate_rps` nor `users`; the command's default):
  each request leaves at its own `arrival_s` (a trace's timestamps times
  `time_scale`, a scenario's Poisson/constant arrivals), and a closed-loop
  scenario's users send their next request a think time after the answer
  (`Source.follow_up`, called when each request ends, as the simulator
  does). Multi-turn chats continue only after their previous turn answered.
* open loop, `rate_rps`: Poisson (default) or evenly spaced arrivals in the
  scenario's request order, sent whether or not earlier requests have
  finished, as inference-perf and vLLM's `benchmark_serving.py` do.
* closed loop, `users`: Locust's model. Each user sends, waits for the
  answer, thinks a uniform `think_s` (0.5-2 s, the seed's Locust
  `between(0.5, 2)`), and sends again; users start evenly over `ramp_s`.

In open loop and scenario timing a request whose slot comes while
`max_in_flight` requests are outstanding is not sent and counts as a failure
(`in-flight-limit`): the target could not keep up. Runs are bounded: no
request starts at or after `duration_s` or beyond `max_requests`, or after
`stop` is set, and stragglers are waited for at most `timeout_s` (then
cancelled, counting as failures). The request sequence is deterministic
given `seed` (string-seeded `random.Random` streams). The report's rate is
over the run's wall-clock time, from its start until it stopped sending
and the last answer came in.

The tool's own ceiling is whatever rate it reaches against engines that
answer instantly; `lag` (how late requests left against their schedule)
tells when it fell behind.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import aiohttp
import attrs

from prefixroute.devtools.bench.config import LoadConfig
from prefixroute.devtools.bench.report import LoadReport, Result, summarise
from prefixroute.devtools.bench.send import Sender, discover_model, new_client
from prefixroute.devtools.bench.wire import (
    MODEL,
    WireRequest,
    request_kind,
    seed_requests,
    wire_request,
)
from prefixroute.sim.source import SimRequest, Source

__all__ = ["run_load"]

_Job = tuple[WireRequest, SimRequest | None]
"""One request to send, and the simulated request it came from (None for plain wire requests)."""

# The random streams keep the old load generator's name (`prefixroute.adapters.loadgen`, which
# became `prefixroute bench`): the name seeds them, so renaming it would change which requests
# and arrival times a given --seed produces, and every figure measured with one so far.
_RNG_PREFIX = "prefixroute.loadgen"


async def run_load(
    base_url: str | Sequence[str],
    *,
    rate_rps: float | None = None,
    users: int | None = None,
    duration_s: float = 10.0,
    max_requests: int | None = None,
    stream: bool = True,
    seed: int = 0,
    process: str | None = None,
    think_s: tuple[float, float] | None = None,
    ramp_s: float = 1.0,
    requests: Iterable[WireRequest] | None = None,
    source: Source | None = None,
    model: str | None = None,
    max_tokens: int | None = None,
    timeout_s: float = 30.0,
    max_in_flight: int = 4096,
    spread: str = "round-robin",
    on_result: Callable[[Result], None] | None = None,
    stop: asyncio.Event | None = None,
    client: aiohttp.ClientSession | None = None,
) -> LoadReport:
    """Send `requests` or `source`'s (default: `seed_requests(seed)`) to `base_url`; summarise.

    The settings are a `LoadConfig`'s (its docstring; `LoadConfigError`, a
    ValueError naming the field, for a bad one): at most one of `rate_rps`
    (open loop) and `users` (closed loop); with neither, `source` is
    required and its own arrival times and follow-ups drive the run
    (scenario timing). See the module docstring. With a `source` and a
    rate or users, its arrivals are taken in order (their times ignored) and
    `follow_up` still hears of each answer (so open-loop chats continue):
    give an endless open-loop source (`scenario_source(..., timed=False)`).
    `model` replaces the seed requests' model (default: the first of the
    target's `/v1/models`, else `MODEL`). `on_result` is called for each
    result as it arrives (from the event loop); setting `stop` ends the run
    early (in-flight requests still finish). Runs at most `duration_s` +
    `timeout_s` + 1 seconds. A `client` passed in is used as it is (its own
    timeouts and connection limit) and left open; without one the run makes
    `new_client(timeout_s, max_in_flight)` and closes it.
    """
    config = LoadConfig(
        rate_rps=rate_rps,
        users=users,
        duration_s=duration_s,
        max_requests=max_requests,
        stream=stream,
        seed=seed,
        process=process,
        think_s=think_s,
        ramp_s=ramp_s,
        max_tokens=max_tokens,
        timeout_s=timeout_s,
        max_in_flight=max_in_flight,
        spread=spread,
    )
    if rate_rps is None and users is None and source is None:
        raise ValueError("give rate_rps (open loop), users (closed loop) or a timed source")
    if requests is not None and source is not None:
        raise ValueError("give requests or source, not both")
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    if not urls:
        raise ValueError("base_url: at least one URL")
    own = client is None
    if client is None:
        client = new_client(timeout_s, max_in_flight)
    try:
        if requests is None and source is None:
            if model is None:
                model = await discover_model(client, urls[0]) or MODEL
            requests = seed_requests(seed, model=model)
        jobs: Iterator[_Job]
        if source is not None:
            jobs = ((wire_request(sim), sim) for sim in source.arrivals())
        else:
            assert requests is not None
            jobs = ((wire, None) for wire in requests)
        if max_requests is not None:
            jobs = itertools.islice(jobs, max_requests)
        sender = Sender(
            client,
            urls,
            stream=config.stream,
            max_tokens=config.max_tokens,
            t0=time.monotonic(),
            on_result=on_result,
            spread=config.spread,
        )
        run = _Run(sender, jobs, source, config, stop or asyncio.Event())
        if rate_rps is not None:
            await _open_loop(run)
        elif users is not None:
            await _closed_loop(run)
        else:
            await _timed_loop(run)
        wall_s = time.monotonic() - sender.t0
        return summarise(sender.results, duration_s=max(wall_s, 1e-9), offered_rps=rate_rps)
    finally:
        if own:
            await client.close()


@attrs.frozen
class _Run:
    """What every send loop works with: the sender, the jobs in order, the source
    (told of each answer, None for plain wire requests), the settings, the stop flag."""

    sender: Sender
    jobs: Iterator[_Job]
    source: Source | None
    config: LoadConfig
    stop: asyncio.Event

    def now(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.sender.t0

    async def sleep_until(self, at_s: float, awake: Callable[[], bool] = lambda: False) -> None:
        """Sleep until `at_s` after the start, waking early on `stop` or once `awake()`."""
        while (left := at_s - self.now()) > 0 and not self.stop.is_set() and not awake():
            await asyncio.sleep(min(left, 0.1))

    async def send(self, index: int, job: _Job, lag: float = 0.0) -> SimRequest | None:
        """Send `job`; tell the source how it ended; the follow-up it answers with, if any."""
        wire, sim = job
        result = await self.sender.send(index, wire, lag, _kind(job))
        if self.source is None or sim is None:
            return None
        return self.source.follow_up(sim, self.now(), result.ok)

    def refuse(self, index: int, job: _Job, due: float, lag: float) -> None:
        """Record `job` as not sent (`max_in_flight` outstanding); its chat, if any, ends."""
        self.sender.refused(index, job[0], due, lag, _kind(job))
        if self.source is not None and job[1] is not None:
            self.source.follow_up(job[1], self.now(), False)


async def _drain(tasks: set[asyncio.Task[Any]], timeout_s: float) -> None:
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=1.0)


def _kind(job: _Job) -> str:
    wire, sim = job
    return sim.kind if sim is not None else request_kind(wire[0], wire[2])


async def _open_loop(run: _Run) -> None:
    config = run.config
    assert config.rate_rps is not None
    rate = config.rate_rps
    rng = random.Random(f"{_RNG_PREFIX}/{config.seed}/arrivals")
    tasks: set[asyncio.Task[Any]] = set()
    due = 0.0
    for index, job in enumerate(run.jobs):
        if index > 0:
            due = due + rng.expovariate(rate) if config.arrivals == "poisson" else index / rate
        if due >= config.duration_s:
            break
        await run.sleep_until(due)
        if run.stop.is_set():
            break
        lag = run.now() - due
        if len(tasks) >= config.max_in_flight:
            run.refuse(index, job, due, lag)
            continue
        task = asyncio.create_task(run.send(index, job, lag))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await _drain(tasks, config.timeout_s + 1.0)


async def _closed_loop(run: _Run) -> None:
    config = run.config
    assert config.users is not None
    users = config.users
    counter = itertools.count()
    left = math.inf if config.max_requests is None else config.max_requests

    async def pause(seconds: float) -> None:
        """Sleep `seconds`, waking early at the end of the run, on `stop`, or with nothing left."""
        await run.sleep_until(min(run.now() + seconds, config.duration_s), lambda: left <= 0)

    async def user(u: int) -> None:
        nonlocal left
        rng = random.Random(f"{_RNG_PREFIX}/{config.seed}/user/{u}")
        await pause(config.ramp_s * u / users)
        while run.now() < config.duration_s and not run.stop.is_set():
            job = next(run.jobs, None)
            if job is None:
                return
            left -= 1
            await run.send(next(counter), job)
            if left <= 0:
                return  # the last request: no think time to wait out
            low, high = config.think
            await pause(low if low == high else rng.uniform(low, high))

    tasks = {asyncio.create_task(user(u)) for u in range(users)}
    await _drain(tasks, max(0.0, config.duration_s - run.now()) + config.timeout_s + 1.0)


async def _timed_loop(run: _Run) -> None:
    """Scenario timing: each arrival at its `arrival_s`, each follow-up at its own.

    An arrival starts a chain: send, then, while the source answers with a
    follow-up (a closed-loop user's next request, a chat's next turn) due
    before the end, wait for it and send it. `max_requests` bounds the
    arrivals and follow-ups together: each takes its place in the budget
    before it waits for its time, and gives it back if the run ends while it
    waits, so waiting chains cannot all send.
    """
    config = run.config
    duration_s = config.duration_s
    counter = itertools.count()
    budget = math.inf if config.max_requests is None else config.max_requests
    tasks: set[asyncio.Task[Any]] = set()

    async def wait_for(at_s: float) -> float | None:
        """Take a place in the budget, then sleep until `at_s`: how late it woke, or None
        (place given back) when the budget is spent, `at_s` is past the end, or the run
        ended while it slept."""
        nonlocal budget
        if at_s >= duration_s or budget <= 0:
            return None
        budget -= 1
        await run.sleep_until(at_s)
        if run.stop.is_set() or run.now() >= duration_s:
            budget += 1
            return None
        return max(0.0, run.now() - at_s)

    async def chain(index: int, job: _Job, lag: float) -> None:
        while True:
            follow = await run.send(index, job, lag)
            if follow is None or (woke := await wait_for(follow.arrival_s)) is None:
                return
            index, job, lag = next(counter), (wire_request(follow), follow), woke

    for job in run.jobs:
        sim = job[1]
        assert sim is not None
        if (lag := await wait_for(sim.arrival_s)) is None:
            break
        index = next(counter)
        if run.sender.in_flight >= config.max_in_flight:
            run.refuse(index, job, sim.arrival_s, lag)
            continue
        task = asyncio.create_task(chain(index, job, lag))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await _drain(tasks, max(0.0, duration_s - run.now()) + config.timeout_s + 1.0)
