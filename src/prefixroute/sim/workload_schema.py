"""The scenario's `workload` mapping: its schema, and `build_workload`, its reader.

`build_workload` reads a scenario's `workload` mapping (every error a
`ScenarioError` naming the field) into the generators of
`prefixroute.sim.workload` (an `OpenLoopSource` or a `ClosedLoopSource`,
wrapped in a `StreamsSource` when tenants have streams of their own) or a
`TraceSource` (`prefixroute.sim.trace`)::

    workload:
      model: qwen3-0.6b            # default: the scenario's model
      arrival:
        process: closed-loop       # poisson | constant | closed-loop
        users: 55                  # closed-loop: concurrent users
        think_s: [0.5, 2.0]        # closed-loop: uniform wait after each answer
        ramp_s: 1.0                # closed-loop: users start evenly over [0, ramp_s)
        # rate_rps: 20.0           # poisson | constant: mean arrivals per second
        # bursts:                  # poisson | constant: an on/off rate schedule: from
        #   rate_rps: 120          #   start_s, every every_s seconds the rate is rate_rps
        #   every_s: 60            #   for for_s seconds (it replaces rate_rps; default
        #   for_s: 15              #   start_s 0)
        #   start_s: 30
      tenants:
        count: 3                   # default 1; names t0000, t0001, ...
        zipf_exponent: 0.0         # tenant of rank r has weight 1/r**s (0: uniform)
        personas: seed             # the seed experiment's three personas:
                                   #   count must be 3; tenants finance/devops/datasci
        # system_prompt_tokens: [200, 200]   # synthetic system prompt length (not with personas)
        # priorities: {t0003: -1}  # per-tenant request priority (default 0; < 0 is sheddable)
        # rates:                   # per-tenant Poisson streams on top of the arrival process
        #   t0000: {rate_rps: 60, start_s: 60, end_s: 120}   # (a burst; default the whole run)
      mix:                         # relative weights (default 1) of request kinds
        tenant: {weight: 4, seed_questions: true, max_tokens: 80}
        cold: {weight: 1, seed_questions: true, max_tokens: 50}
        # tenant: {question_tokens: [6, 6], max_tokens: [80, 80], seed_questions: false}
        # cold: {max_tokens: [50, 50], seed_questions: false, prompt_tokens: [8, 8]}
        # chat: {turns: [2, 8], user_tokens: [30, 60], reply_tokens: [50, 150]}
        # shared_prefix: {num_groups: 10, num_prompts_per_group: 10,
        #                 system_prompt_len: 100, question_len: 50, output_len: 50}

or, replaying a Mooncake trace (then `arrival`, `tenants` and `mix` must be
absent): `workload: {trace: {path: conversation.jsonl.gz, time_scale: 1.0}}`
(a `.gz` file is decompressed; see `prefixroute.sim.trace`).

That example is the seed experiment's shape. Every `[low, high]` is an
inclusive uniform integer range (one number means both); token counts are
exact under `prefixroute.sim.tokenizer`. What each request kind looks like,
and how the sources draw them, is in `prefixroute.sim.workload`.

The reader sits apart from the generators so that it alone knows both the
generators and the trace replay; neither of those imports it.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from prefixroute.sim.objectives import ClientObjectives, ObjectiveSource
from prefixroute.sim.schema import Fields, ScenarioError
from prefixroute.sim.source import Source
from prefixroute.sim.trace import TraceSource
from prefixroute.sim.workload import (
    SEED_PERSONAS,
    Bursts,
    ChatKind,
    ClosedLoopSource,
    ColdKind,
    IntRange,
    Kind,
    OpenLoopSource,
    SharedPrefixKind,
    StreamsSource,
    TenantKind,
    Tenants,
    TenantStream,
    WorkloadSpec,
)

__all__ = ["MAX_RATE_RPS", "build_workload"]

MAX_RATE_RPS = 1e6
"""Highest `rate_rps` accepted: beyond it, arrival times stop advancing in floating point."""


def _int_range(fields: Fields, key: str, default: IntRange, *, min: int = 0) -> IntRange:
    low, high = fields.range(key, (float(default[0]), float(default[1])), min=min)
    if not (low.is_integer() and high.is_integer()):
        raise ScenarioError(fields.where(key), f"must be whole numbers, got [{low:g}, {high:g}]")
    return int(low), int(high)


def _required(fields: Fields, key: str) -> None:
    if not fields.has(key):
        raise ScenarioError(fields.where(key), "is required")


def _refuse(fields: Fields, keys: Sequence[str], why: str) -> None:
    for key in keys:
        if fields.has(key):
            raise ScenarioError(fields.where(key), why)


def _read_mix(mix: Fields) -> tuple[Kind, ...]:
    kinds: list[Kind] = []
    if mix.has("tenant"):
        f = mix.sub("tenant")
        kinds.append(
            TenantKind(
                weight=f.number("weight", 1.0, min=0),
                question_tokens=_int_range(f, "question_tokens", (6, 6)),
                max_tokens=_int_range(f, "max_tokens", (80, 80), min=1),
                seed_questions=f.boolean("seed_questions", False),
            )
        )
        f.done()
    if mix.has("cold"):
        f = mix.sub("cold")
        kinds.append(
            ColdKind(
                weight=f.number("weight", 1.0, min=0),
                max_tokens=_int_range(f, "max_tokens", (50, 50), min=1),
                seed_questions=f.boolean("seed_questions", False),
                prompt_tokens=_int_range(f, "prompt_tokens", (8, 8), min=1),
            )
        )
        f.done()
    if mix.has("chat"):
        f = mix.sub("chat")
        kinds.append(
            ChatKind(
                weight=f.number("weight", 1.0, min=0),
                turns=_int_range(f, "turns", (2, 8), min=1),
                user_tokens=_int_range(f, "user_tokens", (30, 60)),
                reply_tokens=_int_range(f, "reply_tokens", (50, 150), min=1),
            )
        )
        f.done()
    if mix.has("shared_prefix"):
        f = mix.sub("shared_prefix")
        kinds.append(
            SharedPrefixKind(
                weight=f.number("weight", 1.0, min=0),
                num_groups=f.integer("num_groups", 10, min=1),
                num_prompts_per_group=f.integer("num_prompts_per_group", 10, min=1),
                system_prompt_len=_int_range(f, "system_prompt_len", (100, 100)),
                question_len=_int_range(f, "question_len", (50, 50)),
                output_len=_int_range(f, "output_len", (50, 50), min=1),
            )
        )
        f.done()
    mix.done()
    if not any(kind.weight > 0 for kind in kinds):
        raise ScenarioError(mix.path, "needs at least one kind with weight > 0")
    return tuple(kinds)


def _read_bursts(f: Fields) -> Bursts:
    for key in ("rate_rps", "every_s", "for_s"):
        _required(f, key)
    rate = f.number("rate_rps", 1.0, above=0, max=MAX_RATE_RPS)
    every = f.number("every_s", 1.0, above=0)
    length = f.number("for_s", 1.0, above=0, max=every)
    start = f.number("start_s", 0.0, min=0)
    f.done()
    return Bursts(rate_rps=rate, every_s=every, for_s=length, start_s=start)


def _read_tenants(f: Fields) -> Tenants:
    if f.has("personas"):
        f.string("personas", "seed", choices=("seed",))
        count = f.integer("count", len(SEED_PERSONAS), min=1)
        if count != len(SEED_PERSONAS):
            raise ScenarioError(f.where("count"), f"must be 3 with personas: seed, got {count}")
        _refuse(f, ["system_prompt_tokens"], "cannot be combined with personas")
        tenants = Tenants(
            count=count, zipf_exponent=f.number("zipf_exponent", 0.0, min=0), seed_personas=True
        )
    else:
        tenants = Tenants(
            count=f.integer("count", 1, min=1),
            zipf_exponent=f.number("zipf_exponent", 0.0, min=0),
            system_prompt_tokens=_int_range(f, "system_prompt_tokens", (200, 200)),
        )
    names = set(tenants.names())
    priorities = f.sub("priorities")
    pairs = []
    for name in list(priorities.doc):
        if name not in names:
            raise ScenarioError(priorities.where(name), "is not one of the scenario's tenants")
        pairs.append((name, priorities.integer(name, 0)))
    priorities.done()
    rates = f.sub("rates")
    streams = []
    for name in list(rates.doc):
        if name not in names:
            raise ScenarioError(rates.where(name), "is not one of the scenario's tenants")
        r = rates.sub(name)
        rates.raw(name)
        _required(r, "rate_rps")
        start = r.number("start_s", 0.0, min=0)
        end = r.number("end_s", float("inf"), above=start) if r.has("end_s") else float("inf")
        rate = r.number("rate_rps", 1.0, above=0, max=MAX_RATE_RPS)
        streams.append(TenantStream(name, rate, start, end))
        r.done()
    rates.done()
    f.done()
    return attrs.evolve(tenants, priorities=tuple(pairs), streams=tuple(streams))


def build_workload(
    fields: Fields,
    *,
    seed: int,
    duration_s: float,
    model: str,
    objectives: ClientObjectives | None = None,
) -> Source:
    """The `Source` a scenario's `workload` mapping describes (schema: module docstring).

    Every mapping read is checked with `done()`, so an unknown key fails with
    a `ScenarioError` naming its path (`workload.mix.chat.turn`). A `trace`
    path is opened as given (resolve relative paths first). With
    `objectives` (the scenario's, `prefixroute.sim.objectives`) every
    request carries its tenant's; a per-tenant entry naming no tenant of the
    workload is a `ScenarioError`.
    """
    source, tenants = _build(fields, seed=seed, duration_s=duration_s, model=model)
    if objectives is None or not objectives.any:
        return source
    objectives.check_tenants(tenants)
    return ObjectiveSource(source, objectives)


def _build(fields: Fields, *, seed: int, duration_s: float, model: str) -> tuple[Source, set[str]]:
    """The workload's source and its tenants' names."""
    model = fields.string("model", model)
    if fields.has("trace"):
        _refuse(fields, ["arrival", "tenants", "mix"], "cannot be combined with workload.trace")
        trace = fields.sub("trace")
        _required(trace, "path")
        path = trace.string("path", "")
        time_scale = trace.number("time_scale", 1.0, above=0)
        trace.done()
        fields.done()
        trace_source = TraceSource(path, time_scale=time_scale, model=model, duration_s=duration_s)
        return trace_source, {"default"}

    arrival = fields.sub("arrival")
    _required(arrival, "process")
    process = arrival.string("process", "poisson", choices=("poisson", "constant", "closed-loop"))
    if process == "closed-loop":
        _refuse(arrival, ["rate_rps", "bursts"], "is only for poisson and constant arrivals")
        _required(arrival, "users")
        users = arrival.integer("users", 1, min=1)
        think_s = arrival.range("think_s", (0.5, 2.0))
        ramp_s = arrival.number("ramp_s", 1.0, min=0)
    else:
        _refuse(arrival, ["users", "think_s", "ramp_s"], "is only for closed-loop arrivals")
        _required(arrival, "rate_rps")
        rate_rps = arrival.number("rate_rps", 1.0, above=0, max=MAX_RATE_RPS)
        bursts = _read_bursts(arrival.sub("bursts")) if arrival.has("bursts") else None
    arrival.done()
    tenants = _read_tenants(fields.sub("tenants"))
    if not fields.has("mix"):
        raise ScenarioError(fields.where("mix"), "is required (at least one request kind)")
    mix = _read_mix(fields.sub("mix"))
    fields.done()
    spec = WorkloadSpec(model=model, mix=mix, tenants=tenants)
    base: ClosedLoopSource | OpenLoopSource
    if process == "closed-loop":
        base = ClosedLoopSource(
            spec, users=users, think_s=think_s, ramp_s=ramp_s, seed=seed, duration_s=duration_s
        )
    else:
        base = OpenLoopSource(
            spec,
            process=process,
            rate_rps=rate_rps,
            seed=seed,
            duration_s=duration_s,
            bursts=bursts,
        )
    names = set(tenants.names())
    if not tenants.streams:
        return base, names
    return StreamsSource(base, tenants.streams, seed=seed, duration_s=duration_s), names
