"""Workload generators: synthetic sources of simulated requests.

An `OpenLoopSource` (Poisson or evenly spaced arrivals) or a
`ClosedLoopSource` (users who send, wait for the answer, think, and send
again), optionally merged with per-tenant Poisson streams (`StreamsSource`),
draws requests of the kinds a `WorkloadSpec` mixes, from the tenants it
describes. Each is a `Source` (`prefixroute.sim.source`). A scenario's
`workload` mapping is read into these by
`prefixroute.sim.workload_schema.build_workload`, whose docstring gives the
schema; a Mooncake trace is replayed by `prefixroute.sim.trace` instead.

Request kinds (the `kind` label of each `SimRequest`):

* `tenant`: chat messages [tenant system prompt, user question]. The question
  is one of the three seed questions (`seed_questions`) or `question_tokens`
  synthetic words; the answer is `max_tokens` long.
* `cold`: a completions-style prompt (text and `encode(text)`, no chat
  template, as the seed experiment sent `/v1/completions` "Question N"):
  "Question N" with N uniform in 1..1000 (`seed_questions`), else
  `prompt_tokens` fresh synthetic words. Rarely shared, by design.
* `chat`: a multi-turn conversation of `turns` turns whose context grows:
  turn k's prompt is the tenant system prompt, every earlier user and
  assistant message, and a new user message of `user_tokens` words; its reply
  (`reply_tokens` tokens: reply words then `<|im_end|>`) is given as
  `output_token_ids`, and turn k+1's token ids start with turn k's prompt
  followed by those reply ids. `session` is the conversation id. A
  closed-loop user has at most one conversation in progress: choosing `chat`
  continues it (or starts one when none is in progress). An open-loop chat
  arrival continues the oldest idle conversation of its tenant (one whose
  last turn finished before the arrival was drawn) and otherwise starts a
  new one. A failed turn abandons its conversation.
* `shared-prefix`: kubernetes-sigs/inference-perf's `shared_prefix` data
  generator (`inference_perf/datagen/shared_prefix_datagen.py`, defaults
  from `SharedPrefix` in `inference_perf/config.py`): `num_groups` (10)
  groups, each with one shared system prompt of `system_prompt_len` (100)
  tokens and `num_prompts_per_group` (10) distinct questions of
  `question_len` (50) tokens and outputs of `output_len` (50) tokens; the
  group lengths and per-prompt lengths are drawn once, the
  `num_groups * num_prompts_per_group` prompts shuffled once, and requests
  cycle through them in that order. Like inference-perf's default completion
  API, the prompt is the prefix text followed by the question text, untemplated.

The tenant of each request is drawn by Zipf popularity; a closed-loop user is
assigned one tenant (by popularity) for good. Mix weights are per request in
both loops. Synthetic text is made of lexicon words
(`prefixroute.sim.tokenizer.lexicon_text`, each " " + four letters and
exactly one token), so token counts are exact and text and tokens agree:
a tenant's system prompt (drawn once per tenant, on first use, from the
tenant's own stream) is the same text and the same tokens in every request,
and text-mode and token-mode policies see the same prefix structure. Each
request is `Request(model, prompt, token_ids, tenant, session,
max_tokens=output_tokens)`, chat prompts rendered by
`prefixroute.openai.render_messages` and tokenised as `encode_chat` does.

Sources are deterministic given `seed` (their own string-seeded
`random.Random` streams, never the global generator). A closed-loop user draws from a stream of
its own, so its requests do not depend on how the engine interleaves users.
Open-loop arrivals are generated lazily, one per `next`, so millions of
requests are never held at once. No source produces an arrival at or after
`duration_s`.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Iterator, Sequence

import attrs
import numpy as np
import numpy.typing as npt

from prefixroute.openai import render_messages
from prefixroute.request import Request
from prefixroute.sim.source import SimRequest
from prefixroute.sim.tokenizer import (
    IM_END,
    LEXICON_SIZE,
    chat_message,
    encode,
    generation_prompt,
    lexicon_text,
    lexicon_tokens,
)

__all__ = [
    "SEED_PERSONAS",
    "SEED_QUESTIONS",
    "Bursts",
    "ChatKind",
    "ClosedLoopSource",
    "ColdKind",
    "IntRange",
    "Kind",
    "OpenLoopSource",
    "SharedPrefixKind",
    "StreamsSource",
    "TenantKind",
    "TenantStream",
    "Tenants",
    "WorkloadSpec",
]

TokenIds = npt.NDArray[np.uint32]
IntRange = tuple[int, int]


# The seed experiment's personas and questions (as in `prefixroute.cli`'s demo).
SEED_PERSONAS = {
    "finance": "You are a financial analyst assistant specializing in market data. " * 5,
    "devops": "You are a DevOps engineer assistant specializing in Kubernetes and CI/CD. " * 5,
    "datasci": "You are a data scientist assistant specializing in ML pipelines. " * 5,
}
SEED_QUESTIONS = (
    "Summarize the key points.",
    "What should I focus on?",
    "Give me 3 recommendations.",
)


# --- what a workload is made of -----------------------------------------------------------


@attrs.frozen
class TenantKind:
    """`tenant` requests: system prompt + one question (see the module docstring)."""

    weight: float = 1.0
    question_tokens: IntRange = (6, 6)
    max_tokens: IntRange = (80, 80)
    seed_questions: bool = False


@attrs.frozen
class ColdKind:
    """`cold` requests: a short untemplated prompt nobody shares."""

    weight: float = 1.0
    max_tokens: IntRange = (50, 50)
    seed_questions: bool = False
    prompt_tokens: IntRange = (8, 8)


@attrs.frozen
class ChatKind:
    """`chat` requests: turns of multi-turn conversations."""

    weight: float = 1.0
    turns: IntRange = (2, 8)
    user_tokens: IntRange = (30, 60)
    reply_tokens: IntRange = (50, 150)


@attrs.frozen
class SharedPrefixKind:
    """`shared-prefix` requests: inference-perf's `shared_prefix` generator."""

    weight: float = 1.0
    num_groups: int = 10
    num_prompts_per_group: int = 10
    system_prompt_len: IntRange = (100, 100)
    question_len: IntRange = (50, 50)
    output_len: IntRange = (50, 50)


Kind = TenantKind | ColdKind | ChatKind | SharedPrefixKind
_LABELS: dict[type, str] = {
    TenantKind: "tenant",
    ColdKind: "cold",
    ChatKind: "chat",
    SharedPrefixKind: "shared-prefix",
}


@attrs.frozen
class Bursts:
    """Periodic bursts of an open-loop arrival process: an on/off rate schedule.

    From `start_s`, every `every_s` seconds the arrival rate is `rate_rps`
    for `for_s` seconds, then back to the base rate: burst k covers
    [start_s + k * every_s, start_s + k * every_s + for_s). A burst replaces
    the base rate (it does not add to it). O(1) per query.
    """

    rate_rps: float
    every_s: float
    for_s: float
    start_s: float = 0.0

    def __attrs_post_init__(self) -> None:
        if not (self.rate_rps > 0 and self.rate_rps != float("inf")):
            raise ValueError(f"bursts.rate_rps must be finite and > 0, got {self.rate_rps!r}")
        if not (0 < self.for_s <= self.every_s < float("inf")):
            raise ValueError(
                f"bursts need 0 < for_s <= every_s (finite), got {self.for_s!r}, {self.every_s!r}"
            )
        if not (0 <= self.start_s < float("inf")):
            raise ValueError(f"bursts.start_s must be finite and >= 0, got {self.start_s!r}")

    def phase(self, t: float, base_rps: float) -> tuple[float, float]:
        """The rate in effect at `t` and when it next changes (> t)."""
        if t < self.start_s:
            return base_rps, self.start_s
        k, into = divmod(t - self.start_s, self.every_s)
        begin = self.start_s + k * self.every_s
        if into < self.for_s:
            return self.rate_rps, max(begin + self.for_s, math.nextafter(t, math.inf))
        return base_rps, max(begin + self.every_s, math.nextafter(t, math.inf))


@attrs.frozen
class TenantStream:
    """Extra Poisson arrivals of one tenant at `rate_rps` during [start_s, end_s)."""

    tenant: str
    rate_rps: float
    start_s: float = 0.0
    end_s: float = float("inf")


@attrs.frozen
class Tenants:
    """Who sends: `count` tenants with Zipf popularity, their system prompts and priorities.

    `priorities` maps tenant names to request priorities (others 0);
    `streams` are per-tenant arrival streams added to the arrival process.
    """

    count: int = 1
    zipf_exponent: float = 0.0
    seed_personas: bool = False
    system_prompt_tokens: IntRange = (200, 200)
    priorities: tuple[tuple[str, int], ...] = ()
    streams: tuple[TenantStream, ...] = ()

    def names(self) -> list[str]:
        """Tenant names in popularity rank order."""
        if self.seed_personas:
            return list(SEED_PERSONAS)
        return [f"t{i:04d}" for i in range(self.count)]

    def weights(self) -> list[float]:
        """Relative popularity: rank r (from 1) weighs 1/r**zipf_exponent."""
        return [1.0 / (r**self.zipf_exponent) for r in range(1, self.count + 1)]


@attrs.frozen
class WorkloadSpec:
    """What requests look like, independent of when they arrive."""

    model: str
    mix: tuple[Kind, ...]
    tenants: Tenants = Tenants()

    def __attrs_post_init__(self) -> None:
        if not any(kind.weight > 0 for kind in self.mix):
            raise ValueError("the mix needs at least one kind with weight > 0")
        if self.tenants.seed_personas and self.tenants.count != len(SEED_PERSONAS):
            raise ValueError("seed personas need exactly 3 tenants")


# --- generating requests -----------------------------------------------------------------


class _Stream:
    """A deterministic random stream (`random.Random`, seeded by a string)."""

    __slots__ = ("py",)

    def __init__(self, seed: int, name: str) -> None:
        self.py = random.Random(f"prefixroute.sim.workload/{seed}/{name}")

    def pick(self, bounds: IntRange) -> int:
        low, high = bounds
        return low if low == high else self.py.randint(low, high)

    def words(self, n: int) -> npt.NDArray[np.uint32]:
        """`n` uniform lexicon word indices (32 random bits each, reduced; bias < 2e-6)."""
        bits = np.frombuffer(self.py.randbytes(4 * n), dtype="<u4")
        return bits % np.uint32(LEXICON_SIZE)


def _choose(stream: _Stream, cumulative: list[float]) -> int:
    if len(cumulative) == 1:
        return 0
    return bisect.bisect_right(cumulative, stream.py.random() * cumulative[-1])


class _Conversation:
    __slots__ = ("id", "tenant", "text", "tokens", "turns_left")

    def __init__(self, id: str, tenant: int, text: str, tokens: TokenIds, turns: int) -> None:
        self.id = id
        self.tenant = tenant
        self.text = text  # render_messages of the messages so far
        self.tokens = tokens  # their templated tokens, without the generation prompt
        self.turns_left = turns


def _user_message(text: str) -> str:
    return render_messages([{"role": "user", "content": text}])


class _Requests:
    """Builds the requests of a `WorkloadSpec`: tenants, prompts, the shared-prefix pool."""

    def __init__(self, spec: WorkloadSpec, seed: int) -> None:
        self.model = spec.model
        self.kinds = [kind for kind in spec.mix if kind.weight > 0]
        self.kind_cumulative = list(itertools.accumulate(k.weight for k in self.kinds))
        self.names = spec.tenants.names()
        self.tenant_cumulative = list(itertools.accumulate(spec.tenants.weights()))
        self.seed = seed
        self.tenants = spec.tenants
        self.priority = dict(spec.tenants.priorities)
        setup = _Stream(seed, "setup")
        self.setup = setup
        self._systems: dict[int, tuple[str, TokenIds]] = {}
        self.generation = generation_prompt()
        self.im_end = np.array([IM_END], dtype=np.uint32)
        self._question_cache: dict[tuple[int, int], tuple[str, TokenIds]] = {}
        self._shared_next = 0
        self._shared: _SharedPrefixPool | None = None
        for kind in self.kinds:
            if isinstance(kind, SharedPrefixKind):
                self._shared = _SharedPrefixPool(kind, setup)

    def system(self, tenant: int) -> tuple[str, TokenIds]:
        """Tenant `tenant`'s rendered system message and its templated tokens.

        Made on first use (thousands of tenants with long prompts cost nothing
        until they send) from the tenant's own stream, so it does not depend
        on the order tenants first appear. O(prompt) once, O(1) after.
        """
        cached = self._systems.get(tenant)
        if cached is None:
            if self.tenants.seed_personas:
                content = SEED_PERSONAS[self.names[tenant]]
                content_ids = encode(content)
            else:
                stream = _Stream(self.seed, f"tenant/{tenant}")
                words = stream.words(stream.pick(self.tenants.system_prompt_tokens))
                content, content_ids = lexicon_text(words), lexicon_tokens(words)
            cached = (
                render_messages([{"role": "system", "content": content}]),
                chat_message("system", content_ids),
            )
            self._systems[tenant] = cached
        return cached

    def tenant(self, stream: _Stream) -> int:
        return _choose(stream, self.tenant_cumulative)

    def kind(self, stream: _Stream) -> Kind:
        return self.kinds[_choose(stream, self.kind_cumulative)]

    def _sim(
        self,
        at: float,
        kind: str,
        tenant: int,
        prompt: str,
        tokens: TokenIds,
        output: int,
        user: int | None,
        session: str | None = None,
        output_ids: TokenIds | None = None,
    ) -> SimRequest:
        name = self.names[tenant]
        request = Request(
            model=self.model,
            prompt=prompt,
            token_ids=tokens,
            tenant=name,
            session=session,
            max_tokens=output,
            priority=self.priority.get(name, 0),
        )
        return SimRequest(at, request, output, kind, user, output_ids)

    def tenant_request(
        self, kind: TenantKind, tenant: int, stream: _Stream, at: float, user: int | None
    ) -> SimRequest:
        if kind.seed_questions:
            q = stream.py.randrange(len(SEED_QUESTIONS))
            cached = self._question_cache.get((tenant, q))
            if cached is None:
                question = SEED_QUESTIONS[q]
                system_text, system_tokens = self.system(tenant)
                ids = np.concatenate(
                    (
                        system_tokens,
                        chat_message("user", encode(question)),
                        self.generation,
                    )
                )
                ids.flags.writeable = False
                cached = (system_text + _user_message(question), ids)
                self._question_cache[tenant, q] = cached
            prompt, tokens = cached
        else:
            words = stream.words(stream.pick(kind.question_tokens))
            system_text, system_tokens = self.system(tenant)
            prompt = system_text + _user_message(lexicon_text(words))
            tokens = np.concatenate(
                (
                    system_tokens,
                    chat_message("user", lexicon_tokens(words)),
                    self.generation,
                )
            )
        return self._sim(at, "tenant", tenant, prompt, tokens, stream.pick(kind.max_tokens), user)

    def cold_request(
        self, kind: ColdKind, tenant: int, stream: _Stream, at: float, user: int | None
    ) -> SimRequest:
        if kind.seed_questions:
            prompt = f"Question {stream.py.randint(1, 1000)}"
            tokens = encode(prompt)
        else:
            words = stream.words(stream.pick(kind.prompt_tokens))
            prompt, tokens = lexicon_text(words), lexicon_tokens(words)
        return self._sim(at, "cold", tenant, prompt, tokens, stream.pick(kind.max_tokens), user)

    def shared_prefix_request(self, tenant: int, at: float, user: int | None) -> SimRequest:
        pool = self._shared
        assert pool is not None
        group, question, question_ids, output = pool.prompts[self._shared_next % len(pool.prompts)]
        self._shared_next += 1
        prompt = pool.prefix_text[group] + question
        tokens = np.concatenate((pool.prefix_tokens[group], question_ids))
        return self._sim(at, "shared-prefix", tenant, prompt, tokens, output, user)

    def new_conversation(
        self, kind: ChatKind, tenant: int, stream: _Stream, id: str
    ) -> _Conversation:
        return _Conversation(
            id,
            tenant,
            *self.system(tenant),
            stream.pick(kind.turns),
        )

    def chat_turn(
        self, kind: ChatKind, conv: _Conversation, stream: _Stream, at: float, user: int | None
    ) -> SimRequest:
        """The next turn of `conv`, advancing it past the reply. O(context length)."""
        words = stream.words(stream.pick(kind.user_tokens))
        user_text = _user_message(lexicon_text(words))
        user_tokens = chat_message("user", lexicon_tokens(words))
        prompt = conv.text + user_text
        tokens = np.concatenate((conv.tokens, user_tokens, self.generation))
        reply = stream.words(stream.pick(kind.reply_tokens) - 1)
        reply_ids = lexicon_tokens(reply)
        output_ids = np.concatenate((reply_ids, self.im_end))
        output_ids.flags.writeable = False
        conv.text = prompt + render_messages(
            [{"role": "assistant", "content": lexicon_text(reply)}]
        )
        conv.tokens = np.concatenate(
            (conv.tokens, user_tokens, chat_message("assistant", reply_ids))
        )
        conv.turns_left -= 1
        return self._sim(
            at, "chat", conv.tenant, prompt, tokens, len(output_ids), user, conv.id, output_ids
        )

    def simple(
        self, kind: Kind, tenant: int, stream: _Stream, at: float, user: int | None
    ) -> SimRequest:
        """A request of a kind without conversation state (not `ChatKind`)."""
        if isinstance(kind, TenantKind):
            return self.tenant_request(kind, tenant, stream, at, user)
        if isinstance(kind, ColdKind):
            return self.cold_request(kind, tenant, stream, at, user)
        assert isinstance(kind, SharedPrefixKind)
        return self.shared_prefix_request(tenant, at, user)


class _SharedPrefixPool:
    """The num_groups * num_prompts_per_group prompts, drawn and shuffled once (inference-perf)."""

    def __init__(self, kind: SharedPrefixKind, stream: _Stream) -> None:
        self.prefix_text: list[str] = []
        self.prefix_tokens: list[TokenIds] = []
        prompts: list[tuple[int, str, TokenIds, int]] = []
        lengths = [stream.pick(kind.system_prompt_len) for _ in range(kind.num_groups)]
        for group, length in enumerate(lengths):
            words = stream.words(length)
            self.prefix_text.append(lexicon_text(words))
            self.prefix_tokens.append(lexicon_tokens(words))
            questions = [stream.pick(kind.question_len) for _ in range(kind.num_prompts_per_group)]
            outputs = [stream.pick(kind.output_len) for _ in range(kind.num_prompts_per_group)]
            for q_len, out in zip(questions, outputs, strict=True):
                words = stream.words(q_len)
                prompts.append((group, lexicon_text(words), lexicon_tokens(words), out))
        stream.py.shuffle(prompts)
        self.prompts = prompts


# --- sources -----------------------------------------------------------------------------


def _check_duration(duration_s: float) -> None:
    if not duration_s > 0 or duration_s == float("inf"):
        raise ValueError(f"duration_s must be finite and > 0, got {duration_s!r}")


class OpenLoopSource:
    """Open-loop arrivals (Poisson or evenly spaced) at `rate_rps` until `duration_s`.

    With `bursts` the rate follows their on/off schedule (`Bursts`): Poisson
    arrivals are then a non-homogeneous Poisson process with a piecewise
    constant rate (an exponential gap drawn at the rate in effect; one that
    would cross a change of rate is dropped and drawn again from the change,
    which is exact since the process is memoryless); evenly spaced arrivals
    are `1 / rate` apart within each phase, from its start. Scheduled arrival
    times come from a random stream of their own, so they are the same
    whatever the requests' completions do to the mix's draws (open-loop
    chats continue conversations that are idle).
    `arrivals()` is a lazy generator: O(1) memory beyond open conversations,
    O(prompt) work per request. `follow_up` never sends anything; it only
    marks a chat conversation idle so a later chat arrival of its tenant can
    continue it.
    """

    def __init__(
        self,
        spec: WorkloadSpec,
        *,
        process: str,
        rate_rps: float,
        seed: int,
        duration_s: float,
        bursts: Bursts | None = None,
    ) -> None:
        if process not in ("poisson", "constant"):
            raise ValueError(f"process must be poisson or constant, got {process!r}")
        if not rate_rps > 0:
            raise ValueError(f"rate_rps must be > 0, got {rate_rps!r}")
        _check_duration(duration_s)
        self.process = process
        self.rate_rps = rate_rps
        self.bursts = bursts
        self.duration_s = duration_s
        self._requests = _Requests(spec, seed)
        self._stream = _Stream(seed, "open-loop")
        self._seed = seed
        self._idle: list[deque[_Conversation]] = [deque() for _ in self._requests.names]
        self._busy: dict[str, _Conversation] = {}
        self._conversations = 0

    def arrivals(self) -> Iterator[SimRequest]:
        """Lazily, each arrival in time order (first at 0 for `constant`)."""
        if self.bursts is not None:
            yield from self._scheduled(self.bursts)
            return
        stream, rate, end = self._stream, self.rate_rps, self.duration_s
        t = 0.0
        for k in itertools.count():
            if self.process == "poisson":
                t += stream.py.expovariate(rate)
            else:
                t = k / rate
            if t >= end:
                return
            yield self._next(t)

    def _scheduled(self, bursts: Bursts) -> Iterator[SimRequest]:
        """Arrivals whose rate follows `bursts` (class docstring); O(1) per arrival and change."""
        # Arrival times from a stream of their own: the same for every policy, even when
        # chat turns (whose draws depend on which conversations are idle) share the mix.
        stream = _Stream(self._seed, "open-loop/arrivals")
        base, end = self.rate_rps, self.duration_s
        poisson = self.process == "poisson"
        origin, k = 0.0, 0  # the current phase's start, and arrivals in it (constant)
        t = 0.0
        rate, change = bursts.phase(t, base)
        while True:
            if poisson:
                t += stream.py.expovariate(rate)
            else:
                t = origin + k / rate
            if t >= change:  # memoryless: draw again from the change, at the new rate
                t = origin = change
                k = 0
                rate, change = bursts.phase(t, base)
                if t >= end:
                    return
                continue
            if t >= end:
                return
            k += 1
            yield self._next(t)

    def _next(self, at: float) -> SimRequest:
        reqs, stream = self._requests, self._stream
        tenant = reqs.tenant(stream)
        kind = reqs.kind(stream)
        if not isinstance(kind, ChatKind):
            return reqs.simple(kind, tenant, stream, at, None)
        idle = self._idle[tenant]
        if idle:
            conv = idle.popleft()
        else:
            conv = reqs.new_conversation(kind, tenant, stream, f"c{self._conversations:06d}")
            self._conversations += 1
        sim = reqs.chat_turn(kind, conv, stream, at, None)
        if conv.turns_left > 0:
            self._busy[conv.id] = conv
        return sim

    def follow_up(self, done: SimRequest, finished_s: float, ok: bool) -> SimRequest | None:
        """Mark `done`'s conversation idle (or drop it when `ok` is False); always None. O(1)."""
        if done.kind == "chat" and done.request.session is not None:
            conv = self._busy.pop(done.request.session, None)
            if conv is not None and ok:
                self._idle[conv.tenant].append(conv)
        return None


class _User:
    __slots__ = ("chats", "conv", "index", "stream", "tenant")

    def __init__(self, index: int, tenant: int, stream: _Stream) -> None:
        self.index = index
        self.tenant = tenant
        self.stream = stream
        self.conv: _Conversation | None = None
        self.chats = 0


class ClosedLoopSource:
    """`users` closed-loop users: send, wait for the answer, think `think_s`, send again.

    User u (of `users`) sends its first request at `ramp_s * u / users`; each
    follow-up arrives a uniform `think_s` after the previous one finished,
    and none at or after `duration_s`. Each user keeps one tenant (drawn by
    popularity) and draws from its own random stream. O(prompt) per request.
    """

    def __init__(
        self,
        spec: WorkloadSpec,
        *,
        users: int,
        think_s: tuple[float, float] = (0.5, 2.0),
        ramp_s: float = 1.0,
        seed: int,
        duration_s: float,
    ) -> None:
        if users < 1:
            raise ValueError(f"users must be >= 1, got {users!r}")
        if not 0 <= think_s[0] <= think_s[1]:
            raise ValueError(f"think_s must be [low, high] with 0 <= low <= high, got {think_s!r}")
        if ramp_s < 0:
            raise ValueError(f"ramp_s must be >= 0, got {ramp_s!r}")
        _check_duration(duration_s)
        self.think_s = think_s
        self.ramp_s = ramp_s
        self.duration_s = duration_s
        self._requests = _Requests(spec, seed)
        setup = self._requests.setup
        self._users = [
            _User(u, self._requests.tenant(setup), _Stream(seed, f"user/{u}")) for u in range(users)
        ]

    def user_tenants(self) -> list[str]:
        """The tenant of each user, by user index."""
        return [self._requests.names[u.tenant] for u in self._users]

    def arrivals(self) -> Iterator[SimRequest]:
        """Each user's first request, in start order (lazy)."""
        n = len(self._users)
        for user in self._users:
            at = self.ramp_s * user.index / n
            if at >= self.duration_s:
                return
            yield self._next(user, at)

    def follow_up(self, done: SimRequest, finished_s: float, ok: bool) -> SimRequest | None:
        """`done`'s user's next request, a think time after `finished_s`; None past the end."""
        if done.user is None or not 0 <= done.user < len(self._users):
            return None
        user = self._users[done.user]
        conv = user.conv
        if not ok and done.kind == "chat" and conv is not None and conv.id == done.request.session:
            user.conv = None
        low, high = self.think_s
        at = finished_s + (low if low == high else user.stream.py.uniform(low, high))
        if at >= self.duration_s:
            return None
        return self._next(user, at)

    def _next(self, user: _User, at: float) -> SimRequest:
        reqs, stream = self._requests, user.stream
        kind = reqs.kind(stream)
        if not isinstance(kind, ChatKind):
            return reqs.simple(kind, user.tenant, stream, at, user.index)
        if user.conv is None:
            user.conv = reqs.new_conversation(
                kind, user.tenant, stream, f"u{user.index:04d}c{user.chats:04d}"
            )
            user.chats += 1
        conv = user.conv
        sim = reqs.chat_turn(kind, conv, stream, at, user.index)
        if conv.turns_left <= 0:
            user.conv = None
        return sim


class StreamsSource:
    """A source plus per-tenant Poisson streams (`tenants.rates`), merged in time order.

    A stream's requests draw their kind from the mix like any other (a drawn
    `chat` becomes the mix's first other kind, or a tenant request: streams
    model bursts, not conversations). Follow-ups go to the base source.
    """

    def __init__(
        self,
        base: ClosedLoopSource | OpenLoopSource,
        streams: Sequence[TenantStream],
        *,
        seed: int,
        duration_s: float,
    ) -> None:
        self.base = base
        self.streams = tuple(streams)
        self.duration_s = duration_s
        self._seed = seed

    def _stream(self, index: int, spec: TenantStream) -> Iterator[SimRequest]:
        reqs = self.base._requests
        stream = _Stream(self._seed, f"tenant-stream/{index}/{spec.tenant}")
        tenant = reqs.names.index(spec.tenant)
        fallback = next((k for k in reqs.kinds if not isinstance(k, ChatKind)), None)
        t = spec.start_s
        end = min(spec.end_s, self.duration_s)
        while True:
            t += stream.py.expovariate(spec.rate_rps)
            if t >= end:
                return
            kind = reqs.kind(stream)
            if isinstance(kind, ChatKind):
                kind = fallback if fallback is not None else TenantKind()
            yield reqs.simple(kind, tenant, stream, t, None)

    def arrivals(self) -> Iterator[SimRequest]:
        """The base arrivals and every stream's, merged by arrival time (lazily)."""
        iterators = [self.base.arrivals()]
        iterators += [self._stream(i, s) for i, s in enumerate(self.streams)]
        return heapq.merge(*iterators, key=lambda r: r.arrival_s)

    def follow_up(self, done: SimRequest, finished_s: float, ok: bool) -> SimRequest | None:
        """Whatever the base source sends next (stream requests have no user)."""
        if done.user is None and done.kind != "chat":
            return None
        return self.base.follow_up(done, finished_s, ok)
