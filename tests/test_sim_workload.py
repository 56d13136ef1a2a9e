"""Simulated workloads: the generators (`prefixroute.sim.workload`), request shapes, and
the `workload` schema (`prefixroute.sim.workload_schema`)."""

from __future__ import annotations

import copy
import heapq
import itertools
import re
from collections import Counter
from typing import Any

import numpy as np
import pytest

from prefixroute.sim.schema import Fields, ScenarioError
from prefixroute.sim.source import SimRequest, Source
from prefixroute.sim.tokenizer import IM_END, encode, encode_chat
from prefixroute.sim.workload import (
    SEED_PERSONAS,
    SEED_QUESTIONS,
    ChatKind,
    ClosedLoopSource,
    OpenLoopSource,
    TenantKind,
    Tenants,
    WorkloadSpec,
)
from prefixroute.sim.workload_schema import build_workload

SEED: dict[str, Any] = {
    "arrival": {"process": "closed-loop", "users": 55, "think_s": [0.5, 2.0]},
    "tenants": {"count": 3, "personas": "seed"},
    "mix": {
        "tenant": {"weight": 4, "seed_questions": True, "max_tokens": 80},
        "cold": {"weight": 1, "seed_questions": True, "max_tokens": 50},
    },
}


def build(doc: dict[str, Any], *, seed: int = 0, duration_s: float = 60.0) -> Source:
    return build_workload(Fields(doc, "workload"), seed=seed, duration_s=duration_s, model="m")


def drive(source: Source, service_s: float = 0.5, limit: int = 100_000) -> list[SimRequest]:
    """Every request `source` sends when each one takes `service_s` to serve, in arrival order."""
    heap: list[tuple[float, int, SimRequest]] = []
    tie = itertools.count()
    for sim in source.arrivals():
        heapq.heappush(heap, (sim.arrival_s, next(tie), sim))
    out: list[SimRequest] = []
    while heap and len(out) < limit:
        _, _, sim = heapq.heappop(heap)
        out.append(sim)
        nxt = source.follow_up(sim, sim.arrival_s + service_s, True)
        if nxt is not None:
            heapq.heappush(heap, (nxt.arrival_s, next(tie), nxt))
    return out


def tokens(sim: SimRequest) -> np.ndarray[Any, Any]:
    assert sim.request.token_ids is not None
    return sim.request.token_ids


def summary(sim: SimRequest) -> tuple[Any, ...]:
    r = sim.request
    assert r.token_ids is not None
    return (
        sim.arrival_s,
        sim.kind,
        sim.user,
        sim.output_tokens,
        r.prompt,
        r.token_ids.tobytes(),
        r.tenant,
        r.session,
        r.max_tokens,
    )


_MESSAGE = re.compile(r"<\|((?:[^|\\]|\\.)*)\|(\d+)\|>")


def parse_rendered(prompt: str) -> list[dict[str, str]]:
    """Invert `render_messages` (its rendering is injective)."""
    out, pos = [], 0
    while pos < len(prompt):
        m = _MESSAGE.match(prompt, pos)
        assert m is not None, prompt[pos : pos + 40]
        n = int(m.group(2))
        role = re.sub(r"\\(.)", r"\1", m.group(1))
        out.append({"role": role, "content": prompt[m.end() : m.end() + n]})
        pos = m.end() + n
    return out


def check_tokens_match_text(sim: SimRequest) -> None:
    """Chat kinds: tokens == encode_chat(messages); untemplated kinds: tokens == encode(prompt)."""
    r = sim.request
    assert r.prompt is not None and r.token_ids is not None
    if sim.kind in ("tenant", "chat"):
        expected = encode_chat(parse_rendered(r.prompt))
    else:
        expected = encode(r.prompt)
    assert np.array_equal(r.token_ids, expected)


# --- the seed shape ----------------------------------------------------------------------


def test_seed_shape() -> None:
    source = build(SEED, duration_s=120.0)
    assert isinstance(source, ClosedLoopSource)
    assert set(source.user_tenants()) <= set(SEED_PERSONAS)
    sims = drive(source)
    firsts = sims[:55]
    assert [s.user for s in firsts] == list(range(55))
    assert [s.arrival_s for s in firsts] == pytest.approx([u / 55 for u in range(55)])
    kinds = Counter(s.kind for s in sims)
    assert set(kinds) == {"tenant", "cold"}
    assert kinds["tenant"] / len(sims) == pytest.approx(0.8, abs=0.03)
    for sim in sims[:300]:
        check_tokens_match_text(sim)
        r = sim.request
        assert r.model == "m" and r.max_tokens == sim.output_tokens
        assert sim.output_token_ids is None and r.session is None
        if sim.kind == "tenant":
            assert sim.output_tokens == 80
            assert r.tenant == source.user_tenants()[sim.user or 0]
            messages = parse_rendered(r.prompt or "")
            assert messages == [
                {"role": "system", "content": SEED_PERSONAS[r.tenant]},
                {"role": "user", "content": messages[1]["content"]},
            ]
            assert messages[1]["content"] in SEED_QUESTIONS
        else:
            assert sim.output_tokens == 50
            assert re.fullmatch(r"Question (\d+)", r.prompt or "")
            assert 1 <= int((r.prompt or "").split()[1]) <= 1000


def test_seed_shape_cli_personas_agree() -> None:
    from prefixroute import cli

    assert getattr(cli, "PERSONAS", SEED_PERSONAS) == SEED_PERSONAS
    assert getattr(cli, "QUESTIONS", SEED_QUESTIONS) == SEED_QUESTIONS


def test_same_seed_same_requests_other_seed_others() -> None:
    doc = copy.deepcopy(SEED)
    doc["mix"]["chat"] = {"weight": 1, "turns": [2, 4], "user_tokens": [3, 9]}
    doc["mix"]["shared_prefix"] = {"weight": 1, "num_groups": 2, "num_prompts_per_group": 3}
    doc["tenants"] = {"count": 5, "zipf_exponent": 1.0, "system_prompt_tokens": [10, 40]}
    runs = [[summary(s) for s in drive(build(doc, seed=seed))] for seed in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    doc["arrival"] = {"process": "poisson", "rate_rps": 50}
    runs = [[summary(s) for s in drive(build(doc, seed=seed))] for seed in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_closed_loop_users_do_not_depend_on_each_other() -> None:
    # A user's requests come from its own stream: other users' timing changes nothing for it.
    def content(sims: list[SimRequest], user: int) -> list[tuple[Any, ...]]:
        return [summary(s)[1:] for s in sims if s.user == user][:20]

    fast = drive(build(SEED, duration_s=60.0), service_s=0.1)
    slow = drive(build(SEED, duration_s=60.0), service_s=0.9)
    for user in (0, 17, 54):
        assert content(fast, user) == content(slow, user)
    source = build(SEED, duration_s=60.0)
    mine = [next(iter(source.arrivals()))]
    for _ in range(29):
        nxt = source.follow_up(mine[-1], mine[-1].arrival_s + 0.1, True)
        assert nxt is not None
        mine.append(nxt)
    assert [summary(s) for s in mine] == [summary(s) for s in fast if s.user == 0][:30]


# --- arrivals ----------------------------------------------------------------------------


def test_closed_loop_follow_ups_respect_think_time_and_duration() -> None:
    source = build(SEED, duration_s=20.0)
    first = next(iter(source.arrivals()))
    sim: SimRequest | None = first
    count = 0
    while sim is not None:
        finished = sim.arrival_s + 0.3
        nxt = source.follow_up(sim, finished, True)
        if nxt is not None:
            assert finished + 0.5 <= nxt.arrival_s <= finished + 2.0
            assert nxt.arrival_s < 20.0
            assert nxt.user == first.user
            assert nxt.request.tenant == first.request.tenant
        else:
            assert finished + 0.5 > 20.0 - 2.0
        sim, count = nxt, count + 1
    assert count > 5
    assert source.follow_up(first, 25.0, True) is None


def test_closed_loop_ramp_and_no_start_after_the_end() -> None:
    doc = copy.deepcopy(SEED)
    doc["arrival"] = {"process": "closed-loop", "users": 10, "ramp_s": 20.0}
    starts = [s.arrival_s for s in build(doc, duration_s=10.0).arrivals()]
    assert starts == pytest.approx([0.0, 2.0, 4.0, 6.0, 8.0])


def test_constant_arrivals_are_evenly_spaced_and_stop_at_duration() -> None:
    doc = {"arrival": {"process": "constant", "rate_rps": 4}, "mix": {"cold": {}}}
    source = build(doc, duration_s=10.0)
    assert isinstance(source, OpenLoopSource)
    sims = list(source.arrivals())
    assert [s.arrival_s for s in sims] == pytest.approx([k / 4 for k in range(40)])
    assert all(s.user is None and s.kind == "cold" for s in sims)
    assert source.follow_up(sims[0], 1.0, True) is None


def test_poisson_arrivals_have_the_rate_and_stop_at_duration() -> None:
    doc = {"arrival": {"process": "poisson", "rate_rps": 100}, "mix": {"cold": {}}}
    times = [s.arrival_s for s in build(doc, duration_s=100.0).arrivals()]
    assert len(times) == pytest.approx(10_000, rel=0.05)
    assert times == sorted(times) and times[-1] < 100.0
    gaps = np.diff(times)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential


def test_open_loop_arrivals_are_lazy() -> None:
    doc = {"arrival": {"process": "poisson", "rate_rps": 1000}, "mix": {"tenant": {}}}
    source = build(doc, duration_s=1e9)
    assert len(list(itertools.islice(source.arrivals(), 100))) == 100


@pytest.mark.parametrize("s", [0.0, 1.0, 1.5])
def test_zipf_popularity(s: float) -> None:
    doc = {
        "arrival": {"process": "poisson", "rate_rps": 1000},
        "tenants": {"count": 5, "zipf_exponent": s, "system_prompt_tokens": 4},
        "mix": {"tenant": {"question_tokens": 1}},
    }
    counts = Counter(sim.request.tenant for sim in build(doc, duration_s=20.0).arrivals())
    total = sum(counts.values())
    weights = [1 / r**s for r in range(1, 6)]
    for rank, name in enumerate(["t0000", "t0001", "t0002", "t0003", "t0004"]):
        assert counts[name] / total == pytest.approx(weights[rank] / sum(weights), abs=0.015)


def test_closed_loop_users_are_assigned_by_popularity() -> None:
    spec = WorkloadSpec(model="m", mix=(TenantKind(),), tenants=Tenants(count=4, zipf_exponent=2.0))
    source = ClosedLoopSource(spec, users=2000, seed=1, duration_s=10.0)
    counts = Counter(source.user_tenants())
    weights = [1 / r**2 for r in range(1, 5)]
    for rank in range(4):
        assert counts[f"t{rank:04d}"] / 2000 == pytest.approx(
            weights[rank] / sum(weights), abs=0.03
        )


# --- request kinds -----------------------------------------------------------------------


def test_synthetic_tenant_prompts_are_shared_per_tenant() -> None:
    doc = {
        "arrival": {"process": "poisson", "rate_rps": 200},
        "tenants": {"count": 4, "system_prompt_tokens": [50, 80]},
        "mix": {"tenant": {"question_tokens": [3, 9], "max_tokens": [10, 20]}},
    }
    sims = list(build(doc, duration_s=5.0).arrivals())
    systems: dict[str, tuple[str, bytes]] = {}
    for sim in sims:
        check_tokens_match_text(sim)
        r = sim.request
        messages = parse_rendered(r.prompt or "")
        assert [m["role"] for m in messages] == ["system", "user"]
        assert 50 <= len(encode(messages[0]["content"])) <= 80
        assert 3 <= len(encode(messages[1]["content"])) <= 9
        assert 10 <= sim.output_tokens <= 20
        system_ids = encode_chat(messages[:1])[:-3].tobytes()
        assert systems.setdefault(r.tenant, (messages[0]["content"], system_ids)) == (
            messages[0]["content"],
            system_ids,
        )
    assert len(systems) == 4
    assert len({text for text, _ in systems.values()}) == 4


def test_synthetic_cold_prompts() -> None:
    doc = {
        "arrival": {"process": "constant", "rate_rps": 10},
        "mix": {"cold": {"prompt_tokens": [8, 8], "max_tokens": [5, 7]}},
    }
    sims = list(build(doc, duration_s=10.0).arrivals())
    assert len({s.request.prompt for s in sims}) == len(sims)
    for sim in sims:
        check_tokens_match_text(sim)
        assert sim.request.token_ids is not None and len(sim.request.token_ids) == 8
        assert 5 <= sim.output_tokens <= 7


CHAT: dict[str, Any] = {
    "arrival": {"process": "closed-loop", "users": 3, "think_s": [1.0, 1.0]},
    "tenants": {"count": 2, "system_prompt_tokens": [20, 30]},
    "mix": {"chat": {"turns": [2, 4], "user_tokens": [5, 10], "reply_tokens": [8, 12]}},
}


def conversations(sims: list[SimRequest]) -> dict[str, list[SimRequest]]:
    out: dict[str, list[SimRequest]] = {}
    for sim in sims:
        assert sim.request.session is not None
        out.setdefault(sim.request.session, []).append(sim)
    return out


def test_chat_turns_resend_the_growing_context() -> None:
    sims = drive(build(CHAT, duration_s=200.0))
    convs = conversations(sims)
    assert len(convs) > 20
    for turns in convs.values():
        assert 1 <= len(turns) <= 4
        assert len({(t.user, t.request.tenant) for t in turns}) == 1
        for prev, nxt in itertools.pairwise(turns):
            p, n = prev.request, nxt.request
            assert p.token_ids is not None and n.token_ids is not None
            assert prev.output_token_ids is not None
            assert prev.output_tokens == len(prev.output_token_ids)
            assert int(prev.output_token_ids[-1]) == IM_END
            resent = np.concatenate((p.token_ids, prev.output_token_ids))
            assert np.array_equal(n.token_ids[: len(resent)], resent)
            assert (n.prompt or "").startswith(p.prompt or "")
        for k, turn in enumerate(turns):
            check_tokens_match_text(turn)
            assert turn.kind == "chat"
            assert 8 <= turn.output_tokens <= 12 and turn.request.max_tokens == turn.output_tokens
            messages = parse_rendered(turn.request.prompt or "")
            assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * k + [
                "user"
            ]
    # A user's conversations run back to back: all but the user's last one are complete.
    for user in range(3):
        mine = [c for c in convs.values() if c[0].user == user]
        assert all(2 <= len(c) <= 4 for c in mine[:-1])


def test_a_failed_chat_turn_abandons_the_conversation() -> None:
    doc = copy.deepcopy(CHAT)
    doc["mix"]["chat"]["turns"] = [5, 5]
    source = build(doc, duration_s=100.0)
    first = next(iter(source.arrivals()))
    second = source.follow_up(first, 1.0, True)
    assert second is not None and second.request.session == first.request.session
    third = source.follow_up(second, 5.0, False)
    assert third is not None and third.request.session != first.request.session
    assert len(parse_rendered(third.request.prompt or "")) == 2


def test_open_loop_chat_continues_idle_conversations_of_the_tenant() -> None:
    doc = {
        "arrival": {"process": "constant", "rate_rps": 10},
        "mix": {"chat": {"turns": [3, 3], "user_tokens": 2, "reply_tokens": 3}},
    }
    source = build(doc, duration_s=10.0)
    arrivals = iter(source.arrivals())
    a, b = next(arrivals), next(arrivals)
    assert a.request.session != b.request.session  # a still busy: b starts another
    assert a.user is None and b.user is None
    source.follow_up(a, 0.15, True)
    c = next(arrivals)
    assert c.request.session == a.request.session
    assert a.request.token_ids is not None and a.output_token_ids is not None
    assert c.request.token_ids is not None
    resent = np.concatenate((a.request.token_ids, a.output_token_ids))
    assert np.array_equal(c.request.token_ids[: len(resent)], resent)
    source.follow_up(b, 0.3, False)  # failed: b's conversation is dropped
    source.follow_up(c, 0.3, True)
    d = next(arrivals)
    assert d.request.session == a.request.session  # the third and last turn
    source.follow_up(d, 0.4, True)
    e = next(arrivals)
    assert e.request.session not in (a.request.session, b.request.session)


def test_shared_prefix_groups() -> None:
    groups, per_group = 3, 4
    doc = {
        "arrival": {"process": "constant", "rate_rps": 10},
        "mix": {
            "shared_prefix": {
                "num_groups": groups,
                "num_prompts_per_group": per_group,
                "system_prompt_len": 40,
                "question_len": 7,
                "output_len": 11,
            }
        },
    }
    sims = list(build(doc, duration_s=2 * groups * per_group / 10).arrivals())
    pool = groups * per_group
    assert len(sims) == 2 * pool
    by_prefix: dict[bytes, set[bytes]] = {}
    for sim in sims:
        r = sim.request
        assert r.token_ids is not None and len(r.token_ids) == 47
        assert sim.kind == "shared-prefix" and sim.output_tokens == 11
        check_tokens_match_text(sim)
        by_prefix.setdefault(r.token_ids[:40].tobytes(), set()).add(r.token_ids.tobytes())
    assert len(by_prefix) == groups
    assert all(len(prompts) == per_group for prompts in by_prefix.values())
    # The shuffled pool is cycled in the same order.
    assert [summary(s)[4:6] for s in sims[:pool]] == [summary(s)[4:6] for s in sims[pool:]]


def test_shared_prefix_defaults_follow_inference_perf() -> None:
    doc = {"arrival": {"process": "constant", "rate_rps": 1}, "mix": {"shared_prefix": {}}}
    sims = list(build(doc, duration_s=100.0).arrivals())
    assert {len(tokens(s)) for s in sims} == {150}
    assert {s.output_tokens for s in sims} == {50}
    assert len({tokens(s)[:100].tobytes() for s in sims}) == 10
    assert len({tokens(s).tobytes() for s in sims}) == 100


def test_spec_refuses_an_empty_mix() -> None:
    with pytest.raises(ValueError, match="weight > 0"):
        WorkloadSpec(model="m", mix=(ChatKind(weight=0),))


# --- the schema --------------------------------------------------------------------------


def with_changes(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node.setdefault(key, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return out


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "error_path"),
    [
        ("bogus", 1, "workload.bogus"),
        ("arrival.rate", 3, "workload.arrival.rate"),
        ("arrival.rate_rps", 3, "workload.arrival.rate_rps"),
        ("arrival.process", "burst", "workload.arrival.process"),
        ("arrival.process", _DELETE, "workload.arrival.process"),
        ("arrival.users", _DELETE, "workload.arrival.users"),
        ("arrival.users", 0, "workload.arrival.users"),
        ("arrival.think_s", [2.0, 1.0], "workload.arrival.think_s.high"),
        ("tenants.zipf", 1.0, "workload.tenants.zipf"),
        ("tenants.count", 4, "workload.tenants.count"),
        ("tenants.personas", "other", "workload.tenants.personas"),
        ("tenants.system_prompt_tokens", 10, "workload.tenants.system_prompt_tokens"),
        ("mix.tenant.weight", -1, "workload.mix.tenant.weight"),
        ("mix.tenant.max_token", 5, "workload.mix.tenant.max_token"),
        ("mix.tenant.max_tokens", [1.5, 3], "workload.mix.tenant.max_tokens"),
        ("mix.tenant.max_tokens", 0, "workload.mix.tenant.max_tokens.low"),
        ("mix.chat", {"turn": [1, 2]}, "workload.mix.chat.turn"),
        ("mix.shared_prefix", {"num_group": 3}, "workload.mix.shared_prefix.num_group"),
        ("mix.shared-prefix", {}, "workload.mix.shared-prefix"),
        ("mix.cold", {"seed_questions": "yes"}, "workload.mix.cold.seed_questions"),
        ("mix", _DELETE, "workload.mix"),
        ("mix", {"tenant": {"weight": 0}, "cold": {"weight": 0}}, "workload.mix"),
        ("trace", {"path": "x.jsonl"}, "workload.arrival"),
        ("model", "", "workload.model"),
    ],
)
def test_schema_errors_name_their_path(path: str, value: Any, error_path: str) -> None:
    with pytest.raises(ScenarioError) as info:
        build(with_changes(SEED, path, value))
    assert info.value.path == error_path
    assert str(info.value).startswith(error_path)


def test_poisson_refuses_closed_loop_keys() -> None:
    doc = with_changes(SEED, "arrival", {"process": "poisson", "rate_rps": 5, "users": 3})
    with pytest.raises(ScenarioError, match="only for closed-loop") as info:
        build(doc)
    assert info.value.path == "workload.arrival.users"


def test_model_defaults_to_the_argument_and_can_be_overridden() -> None:
    sim = next(iter(build(SEED).arrivals()))
    assert sim.request.model == "m"
    sim = next(iter(build(with_changes(SEED, "model", "other")).arrivals()))
    assert sim.request.model == "other"
