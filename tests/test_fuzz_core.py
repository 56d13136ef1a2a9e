"""Fuzzing the core: hostile input raises only the documented errors (issue 12).

- `parse_openai(body, headers)`: any JSON-like body and header mapping (lone
  surrogates, huge ints, NaN, deep nesting, wrong types) -> a `Request` or
  `RequestError`, nothing else.
- `load_config(doc)`: any document, and mutations of the router part of every
  shipped `examples/*.yaml` -> a `Router` or `ConfigError` (a `DocumentError`).
- `TraceSource` (the simulator's Mooncake trace reader): damaged lines, bytes
  and gzip streams -> a source that replays, or `ScenarioError`.
- `Router.route` / `on_complete` / `observe` / `release` with random values
  of the right types -> only their documented errors (`ValueError` for
  duplicate endpoint ids or a non-finite `now`, `SettlementError` for a
  decision settled twice or not this router's), and every structure's
  `check_invariants()` holds afterwards.

Example counts are modest (`make test`); `PREFIXROUTE_FUZZ=long` multiplies
them (see docs/fuzzing.md and `tests.strategies.fuzz_settings`).
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given, note
from hypothesis import strategies as st

from prefixroute import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    ConfigError,
    Decision,
    Deferral,
    DocumentError,
    EndpointRemoved,
    EndpointState,
    Rejection,
    Request,
    RequestError,
    Router,
    SettlementError,
    Tier,
    Usage,
    load_config,
    parse_openai,
)
from prefixroute.endpoint import MAX_COUNT, EndpointId
from prefixroute.sim.schema import ScenarioError
from prefixroute.sim.trace import TraceSource
from tests.strategies import fuzz_settings

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ROUTER_KEYS = ("seed", "hashing", "index", "router", "tenants", "plugins", "profiles", "profile")

# -- JSON-like values ---------------------------------------------------------------------

any_text = st.text(st.characters(exclude_categories=()), max_size=40)
"""Any str, lone surrogates included (JSON can carry them as escapes)."""

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**31, 2**32, -1, 2**63, 10**30, -(10**30)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text
)
json_like = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(any_text, inner, max_size=5),
    max_leaves=25,
)
"""What `json.loads` can give (and a little more: NaN and infinities, as Python's json does)."""


def deep(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


# -- parse_openai -------------------------------------------------------------------------

MESSAGE_KEYS = ("role", "content", "tool_calls", "name")
BODY_KEYS = (
    "model",
    "messages",
    "prompt",
    "tools",
    "user",
    "prompt_cache_key",
    "cache_salt",
    "stream",
    "max_tokens",
    "max_completion_tokens",
)
HEADER_NAMES = ("x-tenant-id", "X-Session-Id", "x-priority", "x-request-id", "other")

content_parts = st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url", "refusal", "", "thinking"]) | json_like},
        optional={"text": any_text | json_like, "refusal": json_like, "image_url": json_like},
    )
    | any_text
    | json_like,
    max_size=4,
)
messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["user", "assistant", "system", "tool"]) | json_like,
            "content": any_text | st.none() | content_parts | json_like,
            "tool_calls": st.lists(st.dictionaries(any_text, json_like, max_size=3)) | json_like,
        },
    )
    | json_like,
    max_size=4,
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["m", "", "\ud800"]) | json_like,
        "messages": messages | json_like,
        "prompt": any_text
        | st.lists(st.integers(-5, 2**33), max_size=6)
        | st.lists(st.lists(st.integers(-1, 2**32), max_size=4) | any_text, max_size=2)
        | json_like,
        "tools": st.lists(json_like, max_size=3) | json_like,
        "user": any_text | json_like,
        "prompt_cache_key": any_text | json_like,
        "cache_salt": any_text | json_like,
        "stream": st.booleans() | json_like,
        "max_tokens": st.integers() | json_like,
        "max_completion_tokens": st.integers() | json_like,
    },
) | st.dictionaries(st.sampled_from(BODY_KEYS) | any_text, json_like, max_size=6)
headers = st.dictionaries(
    st.sampled_from(HEADER_NAMES) | any_text | st.integers(), any_text | json_like, max_size=5
)


@fuzz_settings(300)
@given(body=bodies | json_like, headers=headers | st.none(), from_user=st.booleans())
@example(
    body={"model": "m", "prompt": [[2**40]]}, headers={"x-priority": "9" * 5000}, from_user=True
)
@example(
    body={"model": "\ud800", "messages": [{"role": "user", "content": "hi"}]},
    headers={},
    from_user=False,
)
def test_parse_openai_raises_only_request_errors(
    body: Any, headers: dict[Any, Any] | None, from_user: bool
) -> None:
    try:
        request = parse_openai(body, headers, tenant_from_user=from_user)
    except RequestError as exc:
        assert exc.status in (400, 413) and str(exc)
        return
    assert isinstance(request, Request)
    assert request.prompt is not None or request.token_ids is not None
    request.tenant.encode("utf-8")  # ids are valid text


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": [{"role": "user", "content": deep(100_000)}]},
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [deep(100_000)]},
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "image", "u": deep(10**5)}]}],
        },
        {
            "model": "m",
            "messages": [
                {"role": "assistant", "content": None, "tool_calls": [{"a": deep(10**5)}]}
            ],
        },
    ],
    ids=["content", "tools", "part", "tool-calls"],
)
def test_parse_openai_refuses_deep_nesting_with_a_request_error(body: dict[str, Any]) -> None:
    with pytest.raises(RequestError) as info:
        parse_openai(body)
    assert info.value.status == 400


# -- load_config --------------------------------------------------------------------------


def router_part(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {k: v for k, v in doc.items() if k in ROUTER_KEYS}


SHIPPED = {p.name: router_part(p) for p in sorted(EXAMPLES.glob("*.yaml"))}


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into `doc` (dict keys and list indices), the root included."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


@st.composite
def mutated_examples(draw: st.DrawFn) -> Any:
    """A shipped router config with a few values replaced, deleted, or keys added."""
    doc = copy.deepcopy(SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))])
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths(doc)))
        if not where:
            continue
        parent = doc
        for step in where[:-1]:
            parent = parent[step]
        last = where[-1]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[last] = draw(json_like | st.sampled_from([0, -1, 1e308, math.nan, "", [], {}]))
        elif action == "delete":
            del parent[last]
        elif isinstance(parent[last], dict):
            parent[last][draw(any_text)] = draw(json_like)
        elif isinstance(parent[last], list):
            parent[last].append(draw(json_like))
    return doc


@fuzz_settings(300)
@given(
    doc=mutated_examples() | st.dictionaries(st.sampled_from(ROUTER_KEYS), json_like) | json_like
)
@example(doc={"hashing": {"block_size": 10**30}})
@example(doc={"index": {"default_capacity_blocks": 10**30}})
@example(doc={"router": {"engine_block_size": 2**63, "speculative_ttl_s": 1e308}})
@example(doc={"tenants": {"top_k": 10**30, "pinned": ["\ud800"]}})
@example(doc={"seed": 10**30})
@example(doc={"seed": -1, "hashing": {"seed": -(2**70)}})
def test_load_config_raises_only_config_errors(doc: Any) -> None:
    if isinstance(doc, str):  # documented: a file name is a TypeError (read the file first)
        with pytest.raises(TypeError, match="not a file name"):
            load_config(doc)
        return
    try:
        router = load_config(doc)
    except ConfigError as exc:
        assert isinstance(exc, DocumentError) and str(exc)
        return
    assert isinstance(router, Router)


# -- the Mooncake trace reader ------------------------------------------------------------

trace_records = st.fixed_dictionaries(
    {
        "timestamp": st.integers(0, 10**6) | st.floats(0, 1e6),
        "input_length": st.integers(1, 3000),
        "output_length": st.integers(0, 50),
        "hash_ids": st.lists(st.integers(0, 2**31 - 1), max_size=6),
    }
)
damaged_values = json_like | st.sampled_from(
    [-1, 2**31, 2**63, 10**30, 2**70, 1e308, math.inf, math.nan, True, "1", [], {}]
)


def raw_line(
    *,
    timestamp: bytes = b"0",
    input_length: bytes = b"5",
    output_length: bytes = b"1",
    hash_ids: bytes = b"[1]",
) -> bytes:
    """A trace line with each field's JSON given raw (numbers too long for `json.dumps`)."""
    return (
        b'{"timestamp": '
        + timestamp
        + b', "input_length": '
        + input_length
        + b', "output_length": '
        + output_length
        + b', "hash_ids": '
        + hash_ids
        + b"}"
    )


@st.composite
def trace_lines(draw: st.DrawFn) -> bytes:
    """A trace line: valid, a valid record with one field damaged, junk JSON, or junk bytes."""
    kind = draw(st.sampled_from(["ok", "ok", "field", "json", "bytes", "blank"]))
    record: dict[str, Any] = draw(trace_records)
    if kind == "field":
        key = draw(st.sampled_from([*record, "extra"]))
        if draw(st.booleans()):
            record[key] = draw(damaged_values)
        else:
            record.pop(key, None)
    if kind in ("ok", "field"):
        return json.dumps(record).encode("utf-8", "surrogatepass")
    if kind == "json":
        text = json.dumps(draw(json_like)) if draw(st.booleans()) else "[" * 100_000
        return text.encode("utf-8", "surrogatepass")
    if kind == "bytes":
        return draw(st.binary(max_size=30))
    return b"  "


@fuzz_settings(150)
@given(
    lines=st.lists(trace_lines(), max_size=6),
    gz=st.booleans(),
    cut=st.none() | st.integers(0, 200),
    flip=st.none() | st.tuples(st.integers(0, 400), st.integers(1, 255)),
)
@example(lines=[raw_line(timestamp=b"1" + b"0" * 400)], gz=False, cut=None, flip=None)
@example(lines=[raw_line(input_length=b"9" * 5000)], gz=False, cut=None, flip=None)
@example(lines=[raw_line(input_length=b"1000000000000")], gz=False, cut=None, flip=None)
@example(lines=[raw_line(output_length=b"1" + b"0" * 20)], gz=False, cut=None, flip=None)
@example(lines=[b"[" * 100_000], gz=False, cut=None, flip=None)
@example(lines=[raw_line()] * 40, gz=True, cut=30, flip=None)
@example(lines=[raw_line()] * 40, gz=True, cut=None, flip=(30, 7))
def test_trace_reader_raises_only_scenario_errors(
    lines: list[bytes], gz: bool, cut: int | None, flip: tuple[int, int] | None
) -> None:
    data = b"\n".join(lines) + b"\n"
    if gz:
        data = gzip.compress(data)
    if cut is not None:
        data = data[:cut]
    if flip is not None and flip[0] < len(data):
        data = data[: flip[0]] + bytes([data[flip[0]] ^ flip[1]]) + data[flip[0] + 1 :]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("trace.jsonl.gz" if gz else "trace.jsonl")
        path.write_bytes(data)
        try:
            source = TraceSource(path, model="m", block_tokens=16)
        except ScenarioError as exc:
            assert str(exc)
            return
        replayed = list(source.arrivals())
    assert len(replayed) == len(source)
    for sim in replayed:
        assert sim.request.token_ids is not None and len(sim.request.token_ids) >= 1


# -- the Router's public methods ----------------------------------------------------------

WIDE = {
    "hashing": {"mode": "text", "block_size": 4},
    "plugins": [
        {"type": "healthy-filter"},
        {"type": "model-filter"},
        {"type": "role-filter"},
        {"type": "stale-metrics-filter"},
        {"type": "saturation-filter"},
        {"type": "hot-spot-filter"},
        {"type": "tail-pool-filter"},
        {"type": "prefix-affinity-scorer"},
        {"type": "queue-depth-scorer"},
        {"type": "kv-utilisation-scorer"},
        {"type": "inflight-scorer"},
        {"type": "session-affinity-scorer"},
        {"type": "lora-affinity-scorer"},
        {"type": "cold-spread-scorer"},
        {"type": "consistent-hash-scorer"},
        {"type": "kv-cost-scorer"},
        {"type": "softmax-picker"},
        {"type": "token-bucket-admission", "parameters": {"requests_per_s": 5}},
        {"type": "concurrency-admission", "parameters": {"max_in_flight": 3}},
        {"type": "shedding-admission"},
        {"type": "fair-queue-admission", "parameters": {"max_in_flight_per_endpoint": 1}},
    ],
}
WIDE["profiles"] = [
    {
        "name": "wide",
        "plugins": [{"pluginRef": p["type"]} for p in WIDE["plugins"]],  # type: ignore[index]
    }
]
ROUTERS: dict[str, Callable[[], Router]] = {
    "default": Router.default,
    "wide": lambda: load_config(WIDE),
    **{name: (lambda doc=doc: load_config(doc)) for name, doc in SHIPPED.items()},
}

ids = st.sampled_from(["e0", "e1", "e2", "e3"]) | any_text.filter(bool)
times = (
    st.floats(0.0, 100.0) | st.floats(0.0, 100.0) | st.floats(allow_nan=True, allow_infinity=True)
)
counts = st.integers(0, 5) | st.sampled_from([0, 1, 10**6, MAX_COUNT])
names = st.sampled_from(["m", "m", "other"]) | any_text.filter(bool)


@st.composite
def endpoint_states(draw: st.DrawFn) -> EndpointState | None:
    """An endpoint snapshot, or None where the drawn values are (documentedly) refused."""
    fields = {
        "id": draw(ids),
        "address": draw(
            st.sampled_from(["127.0.0.1:9000", "h:1", "h:65535"])
            if draw(st.integers(0, 9))
            else any_text
        ),
        "role": draw(st.sampled_from(["both", "prefill", "decode"])),
        "models": draw(st.just(frozenset()) | st.just(frozenset({"m"})) | st.frozensets(names)),
        "adapters": draw(st.frozensets(names, max_size=2)),
        "waiting": draw(counts),
        "running": draw(counts),
        "kv_usage": draw(st.floats(0.0, 1.0)),
        "kv_capacity_blocks": draw(st.none() | st.integers(1, 10) | st.just(MAX_COUNT)),
        "healthy": draw(st.booleans()),
        "observed_at": draw(st.floats(-1.0, 1e4) if draw(st.integers(0, 9)) else st.none() | times),
        "max_model_len": draw(st.none() | st.integers(1, MAX_COUNT)),
    }
    try:
        return EndpointState(**fields)
    except ValueError:  # documented: an address or id that is not valid text, non-finite time
        return None


@st.composite
def requests(draw: st.DrawFn) -> Request | None:
    """A request, or None where the drawn values are (documentedly) refused."""
    tokens = draw(st.none() | st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=40))
    text = st.text(st.characters(exclude_categories=()), max_size=80)
    prompt = draw(text if tokens is None or draw(st.booleans()) else st.none() | text)
    try:
        return Request(
            model=draw(names),
            prompt=prompt,
            token_ids=tokens,
            tenant=draw(st.sampled_from(["t0", "t1"]) | any_text.filter(bool)),
            session=draw(st.none() | any_text),
            priority=draw(st.integers(-3, 3) | st.integers()),
            cache_salt=draw(st.none() | any_text),
            lora=draw(st.none() | names),
            max_tokens=draw(st.none() | st.integers(0, 50) | st.integers(min_value=0)),
            request_id=draw(st.none() | any_text),
            stream=draw(st.booleans()),
        )
    except RequestError:  # documented: no prompt, or an id that is not valid text
        return None


usages = st.builds(
    Usage,
    prompt_tokens=st.integers(0, 10**12),
    cached_tokens=st.integers(0, 10**15),
    completion_tokens=st.integers(0, 10**6),
    ttft_s=st.none() | st.floats(0, 1e300),
    e2e_s=st.none() | st.floats(0, 1e300),
    ok=st.booleans(),
)
block_keys = st.lists(st.integers(0, 2**64 - 1), max_size=8)  # events refuse others when built
events = st.one_of(
    st.builds(BlockStored, ids.map(EndpointId), block_keys, st.sampled_from(Tier)),
    st.builds(BlockRemoved, ids.map(EndpointId), block_keys, st.none() | st.sampled_from(Tier)),
    st.builds(AllBlocksCleared, ids.map(EndpointId)),
    st.builds(EndpointRemoved, ids.map(EndpointId)),
)
fleets = st.lists(endpoint_states(), max_size=4).map(
    lambda states: [e for e in states if e is not None] or None
)
"""A new fleet (None: keep the last; empty only from the start), ids sometimes repeated
(a documented ValueError)."""

routes = st.tuples(st.just("route"), requests(), st.none() | st.none() | fleets, times)
completions = st.tuples(st.just("complete"), st.integers(0, 50), usages, times, st.none() | ids)
operations = st.lists(
    st.one_of(
        routes,
        completions,
        routes,
        completions,
        st.tuples(st.just("observe"), events),
        st.tuples(st.just("release"), st.none() | fleets, times),
        st.tuples(st.just("stranger")),
    ),
    min_size=1,
    max_size=30,
)
"""Operations on one router; routes and completions twice as likely as the rest."""


def check(router: Router) -> None:
    router.index.check_invariants()
    router.ledger.check_invariants()
    router.load.check_invariants()
    admission = router.admission
    for policy in getattr(admission, "policies", (admission,)):
        checker = getattr(policy, "check_invariants", None)
        if checker is not None:
            checker()


def monotonic(t: float, last: float) -> float:
    """`t` as an offset from the last time when finite (time only goes forward), else `t`."""
    return last + abs(t) if math.isfinite(t) else t


@fuzz_settings(200)
@given(which=st.sampled_from(sorted(ROUTERS)), ops=operations)
def test_router_methods_raise_only_documented_errors(which: str, ops: list[Any]) -> None:
    router = ROUTERS[which]()
    stranger = Router.default()
    decided: list[Decision] = []  # every decision, settled or not: misuse settles again
    fleet = [EndpointState(id=f"e{i}", address=f"h:{i + 1}", observed_at=0.0) for i in range(3)]
    now = 0.0
    for i in range(3):  # a few open decisions to start from
        out = router.route(Request(model="m", prompt=f"{i} " * 30, tenant=f"t{i % 2}"), fleet, now)
        if isinstance(out, Decision):
            decided.append(out)
    for op in ops:
        note(repr(op)[:300])
        kind = op[0]
        try:
            if kind == "route":
                _, request, states, t = op
                if request is None:
                    continue
                states = fleet = fleet if states is None else states
                t = monotonic(t, now)
                out = router.route(request, states, t)
                assert isinstance(out, Decision | Rejection | Deferral)
                if isinstance(out, Decision):
                    assert out.endpoint in {e.id for e in states}
                    decided.append(out)
                now = t if math.isfinite(t) else now
            elif kind == "complete" and decided:
                _, k, usage, t, served = op
                t = monotonic(t, now)
                router.on_complete(decided[k % len(decided)], usage, t, served_by=served)
                now = t if math.isfinite(t) else now
            elif kind == "observe":
                router.observe(op[1])
            elif kind == "release":
                _, states, t = op
                states = fleet = fleet if states is None else states
                t = monotonic(t, now)
                for _request, outcome in router.release(states, t):
                    if isinstance(outcome, Decision):
                        decided.append(outcome)
                now = t if math.isfinite(t) else now
            elif kind == "stranger":
                out = router.route(Request(model="m", prompt="x" * 20), [], now)
                assert isinstance(out, Rejection | Deferral)  # no endpoints: nothing to settle
                foreign = stranger.route(
                    Request(model="m", prompt="x" * 20),
                    [EndpointState(id="e0", address="h:1")],
                    now,
                )
                assert isinstance(foreign, Decision)
                with pytest.raises(SettlementError):
                    router.on_complete(foreign, Usage(), now)
        except SettlementError:
            pass  # a decision settled a second time: documented
        except ValueError as exc:
            message = str(exc)
            assert "now must be a finite" in message or "distinct ids" in message, message
        check(router)
    assert router.open_decisions <= len(decided)
    snap = router.ledger.snapshot()
    for row in (*snap.tenants, snap.other, snap.total):
        assert row.hit_rate is None or 0.0 <= row.hit_rate <= 1.0
