"""Built-in scorers: each rates every candidate in [0, 1], higher is better.

Scores are absolute (a function of the endpoint and the request alone), not
min-max normalised across whichever endpoints happen to be candidates, so a
score does not jump when the candidate set changes (STYLE.md 6). Load scores
use the saturating form `1 / (1 + x / scale)`: 1 when idle, 0.5 at `scale`,
approaching 0 as load grows.

The prefix scorer follows GIE's prefix-cache plugin (matched blocks / total
blocks) and adds a match-length term, so that a long absolute match in a very
long prompt is not drowned by the ratio; tiers weigh blocks held in CPU or
disk below GPU-resident ones.

Two scorers exist so that other routers' policies run as configs of this
library (the simulator compares them as baselines):

- `ConsistentHashScorer` models vLLM production-stack's session router
  (vllm-project/production-stack, `src/vllm_router/routers/routing_logic.py`,
  `SessionRouter`): the session id (from the header or body field named by
  `--session-key`) is hashed onto the endpoints, a consistent-hash ring
  (`uhashring.HashRing`) there, rendezvous (highest-random-weight) hashing
  here: both move only a removed endpoint's keys. Production-stack sends a
  request without a session to the endpoint with the lowest QPS; here such a
  request scores 0 everywhere, and a config adds a load scorer for that
  (`sim/policies/session-hash.yaml`).
- `KVCostScorer` is the cost of Dynamo's KV router (ai-dynamo/dynamo,
  `lib/llm/src/kv_router/scheduler.rs`, `DefaultWorkerSelector`):
  ``logit = overlap_score_weight * potential_prefill_blocks +
  potential_decode_blocks``, lowest wins, with `overlap_score_weight` 1.0 and
  `router_temperature` 0.0 by default (`KvRouterConfig::default()`,
  `lib/llm/src/kv_router/config.rs`; docs/architecture/kv_cache_routing.md,
  `--kv-overlap-score-weight` "Defaults to 1").

Every built-in scorer also has `score_rows` (`plugins.RowScorer`): the same
scores, bit for bit, for rows of the router's `EndpointTable`, as float64
arrays. Columns that depend on the endpoints alone (queue depth, KV usage,
loaded adapters) are computed once per table; the router's in-flight
counts are gathered from the table's mirrored columns. Each array expression
repeats its list twin's operations in the same order on the same float64
values (numpy's elementwise +, *, / are IEEE-exact like Python's); `math.exp`
stays a Python call, since numpy's SIMD exp may differ in the last bit.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

import attrs
import numpy as np
import numpy.typing as npt

from prefixroute.endpoint import EndpointState, EndpointTable, Rows
from prefixroute.plugins import RouteContext

__all__ = [
    "UNIT_ROW_SCORERS",
    "ColdSpreadScorer",
    "ConsistentHashScorer",
    "InflightScorer",
    "KVCostScorer",
    "KVUtilisationScorer",
    "LoraAffinityScorer",
    "PrefixAffinityScorer",
    "QueueDepthScorer",
    "SessionAffinityScorer",
]

_unit = [attrs.validators.ge(0.0), attrs.validators.le(1.0)]
Scores = npt.NDArray[np.float64]


def _table(ctx: RouteContext) -> EndpointTable:
    table = ctx.table
    if table is None:
        raise ValueError("score_rows needs ctx.table (the router's EndpointTable)")
    return table


def _column(table: EndpointTable, values: Iterable[float]) -> Scores:
    out: Scores = np.fromiter(values, dtype=np.float64, count=len(table))
    out.flags.writeable = False
    return out


@attrs.frozen
class PrefixAffinityScorer:
    """Prefers endpoints holding the request's prefix. Type `prefix-affinity-scorer`.

    score = (1 - length_weight) * weighted_matched / total
            + length_weight * min(1, weighted_matched * tokens_per_block / length_ref_tokens)

    `weighted_matched` counts each matched block at its tier's weight (GPU 1).
    A request with no full block scores 0 everywhere. A full match can round
    to 1 + an ulp: the score is capped at 1 (what the profile's clamp does).
    O(candidates).
    """

    length_weight: float = attrs.field(default=0.2, validator=_unit)
    length_ref_tokens: float = attrs.field(default=2048.0, validator=attrs.validators.gt(0.0))

    def score(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[float]:
        total = ctx.total_blocks
        matches = ctx.matches
        if not total or not matches:
            return [0.0] * len(candidates)
        lw = self.length_weight
        ratio_w = (1.0 - lw) / total
        length_w = ctx.tokens_per_block / self.length_ref_tokens
        out = []
        for e in candidates:
            m = matches.get(e.id)
            if m is None:
                out.append(0.0)
            else:
                w = m.weighted
                value = ratio_w * w + lw * min(1.0, w * length_w)
                out.append(value if value <= 1.0 else 1.0)  # a rounding can pass 1 by an ulp
        return out

    def score_rows(self, ctx: RouteContext, rows: Rows) -> Scores:
        """O(matched endpoints) in Python, plus one gather.

        Clamped into [0, 1] as the profile would (a rounding can pass 1 by an
        ulp), so that the result is within [0, 1] (`UNIT_ROW_SCORERS`).
        """
        total = ctx.total_blocks
        matches = ctx.matches
        table = _table(ctx)
        if not total or not matches:
            return table.zeros(rows)
        lw = self.length_weight
        ratio_w = (1.0 - lw) / total
        length_w = ctx.tokens_per_block / self.length_ref_tokens
        row = table.row
        at: list[int] = []
        values: list[float] = []
        for eid, m in matches.items():
            i = row.get(eid)
            if i is not None:
                w = m.weighted
                at.append(i)
                value = ratio_w * w + lw * min(1.0, w * length_w)
                values.append(value if value <= 1.0 else 1.0)  # the profile's clamp (>= 0 already)
        full = np.zeros(len(table))
        if len(at) > 8:
            full[at] = values
        else:
            for i, value in zip(at, values, strict=True):
                full[i] = value
        return full if rows is table.all_rows else full[rows]


@attrs.frozen
class QueueDepthScorer:
    """Prefers short engine queues (scraped `waiting`). Type `queue-depth-scorer`.

    score = 1 / (1 + waiting / scale).
    """

    scale: float = attrs.field(default=8.0, validator=attrs.validators.gt(0.0))

    def score(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[float]:
        inv = 1.0 / self.scale
        return [1.0 / (1.0 + e.waiting * inv) for e in candidates]

    def score_rows(self, ctx: RouteContext, rows: Rows) -> Scores:
        """A column computed once per table, then one gather."""
        table = _table(ctx)
        scale = self.scale

        def column() -> Scores:
            inv = 1.0 / scale
            return _column(table, (1.0 / (1.0 + e.waiting * inv) for e in table.endpoints))

        return table.column(table.memo(("queue-depth", scale), column), rows)


@attrs.frozen
class KVUtilisationScorer:
    """Prefers free KV cache: 1 - kv_usage (scraped). Type `kv-utilisation-scorer`."""

    def score(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[float]:
        return [1.0 - e.kv_usage for e in candidates]

    def score_rows(self, ctx: RouteContext, rows: Rows) -> Scores:
        """A column computed once per table, then one gather."""
        table = _table(ctx)
        column = lambda: _column(table, (1.0 - e.kv_usage for e in table.endpoints))  # noqa: E731
        return table.column(table.memo(("kv-free",), column), rows)


@attrs.frozen
class InflightScorer:
    """Prefers endpoints with little work the router itself has in flight. Type `inflight-scorer`.

    score = (1 - token_weight) / (1 + requests / request_scale)
            + token_weight / (1 + tokens / token_scale)

    Tokens are uncached prompt tokens plus expected output tokens. Unlike
    scraped metrics these counts are exact at decision time, which is what
    keeps a burst from piling onto one endpoint between metric refreshes.
    """

    request_scale: float = attrs.field(default=8.0, validator=attrs.validators.gt(0.0))
    token_scale: float = attrs.field(default=16384.0, validator=attrs.validators.gt(0.0))
    token_weight: float = attrs.field(default=0.5, validator=_unit)

    def score(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[float]:
        requests = ctx.load.requests_view().get
        tokens = ctx.load.tokens_view().get
        tw = self.token_weight
        rw = 1.0 - tw
        inv_r, inv_t = 1.0 / self.request_scale, 1.0 / self.token_scale
        return [
            rw / (1.0 + requests(e.id, 0) * inv_r) + tw / (1.0 + tokens(e.id, 0) * inv_t)
            for e in candidates
        ]

    def score_rows(self, ctx: RouteContext, rows: Rows) -> Scores:
        """A column per table kept up to date row by row as the router's counts change.

        O(rows whose counts changed since the last request) in Python (`score`'s
        own expression) plus one gather; vectorised over the counts, in
        `score`'s order of operations, when the table does not mirror `ctx.load`
        or its change log was cut.
        """
        table = _table(ctx)
        load = ctx.load
        if load is not table.load_owner:
            requests = table.requests_at(load, rows)
            return self._vector(requests, table.tokens_at(load, rows))
        # keyed by the parameters (equal scorers share a column, as they would by `self`)
        key = ("inflight", self.request_scale, self.token_scale, self.token_weight)
        entry = table.memo(key, _fresh_entry)
        changed, entry[1] = table.changed_since(entry[1])
        column = entry[0]
        if column is None or changed is None:
            column = entry[0] = self._vector(table.inflight_requests, table.inflight_tokens)
        elif changed:
            get_r, get_t, ids = load.requests_view().get, load.tokens_view().get, table.ids
            tw = self.token_weight
            rw = 1.0 - tw
            inv_r, inv_t = 1.0 / self.request_scale, 1.0 / self.token_scale
            for i in set(changed) if len(changed) > 8 else changed:
                eid = ids[i]
                column[i] = rw / (1.0 + get_r(eid, 0) * inv_r) + tw / (1.0 + get_t(eid, 0) * inv_t)
        # a copy either way: the memoised column changes under the caller's feet
        return column.copy() if rows is table.all_rows else column[rows]  # type: ignore[no-any-return]

    def _vector(self, requests: np.ndarray, tokens: np.ndarray) -> Scores:
        tw = self.token_weight
        rw = 1.0 - tw
        inv_r, inv_t = 1.0 / self.request_scale, 1.0 / self.token_scale
        out: Scores = rw / (1.0 + requests * inv_r) + tw / (1.0 + tokens * inv_t)
        return out


@attrs.frozen
class SessionAffinityScorer:
    """1 for the endpoint that last served the session, else 0. Type `session-affinity-scorer`."""

    def score(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[float]:
        request = ctx.request
        if request.session is None:
            return [0.0] * len(candidates)
        target = ctx.load.session_endpoint((request.tenant, request.session))
        if target is None:
            return [0.0] * len(candidates)
        return [1.0 if e.id == target else 0.0 for e in candidates]

    def score_rows(self, ctx: RouteContext, rows: Rows) -> Scores:
        request = ctx.request
        table = _table(ctx)
        if request.session is None:
            return table.zeros(rows)
        target = ctx.load.session_endpoint((request.tenant, request.session))
        at = None if target is None else table.row.get(target)
        if at is None:
            return table.zeros(rows)
        out: Scores = (rows == at).astype(np.float64)
        return out


@attrs.frozen
class LoraAffinityScorer:
    """1 where the request's LoRA adapter is loaded, else 0. Type `lora-affinity-scorer`.

    Requests without an adapter score 0 everywhere (no preference).
    """

    def score(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[float]:
        lora = ctx.request.lora
        if lora is None:
            return [0.0] * len(candidates)
        return [1.0 if lora in e.adapters else 0.0 for e in candidates]

    def score_rows(self, ctx: RouteContext, rows: Rows) -> Scores:
        """A column per adapter, computed once per table, then one gather."""
        lora = ctx.request.lora
        table = _table(ctx)
        if lora is None:
            return table.zeros(rows)

        def column() -> Scores:
            return _column(table, (1.0 if lora in e.adapters else 0.0 for e in table.endpoints))

        return table.column(table.memo(("lora", lora), column), rows)


@attrs.frozen
class ColdSpreadScorer:
    """Sends cold requests where cold work went least recently. Type `cold-spread-scorer`.

    Only for a request with no prefix hit on any endpoint; otherwise 0
    everywhere. score = 1 - exp(-(now - last_cold) / tau_s), and 1 for an
    endpoint that never got cold work. Sending a run of cold requests to
    different endpoints spreads the new prefixes (and their prefill cost)
    instead of letting ties and stale load metrics pile them onto one pod.
    """

    tau_s: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))

    def score(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[float]:
        if ctx.best_match > 0:
            return [0.0] * len(candidates)
        load, now, tau = ctx.load, ctx.now, self.tau_s
        out = []
        for e in candidates:
            last = load.last_cold(e.id)
            out.append(1.0 if last is None else 1.0 - math.exp(-max(0.0, now - last) / tau))
        return out

    def score_rows(self, ctx: RouteContext, rows: Rows) -> Scores:
        """Zeros for a request with a hit; else `score`'s loop (math.exp per endpoint)."""
        table = _table(ctx)
        if ctx.best_match > 0:
            return table.zeros(rows)
        load, now, tau = ctx.load, ctx.now, self.tau_s
        ids = table.ids
        out = []
        for i in rows.tolist():
            last = load.last_cold(ids[i])
            out.append(1.0 if last is None else 1.0 - math.exp(-max(0.0, now - last) / tau))
        return np.array(out, dtype=np.float64)


def _fresh_entry() -> list[object]:
    return [None, -1]


_HASH_KEYS = ("session", "tenant", "session-or-tenant")
_TWO_64 = float(2**64)


@attrs.frozen
class ConsistentHashScorer:
    """Rendezvous hashing of the request's key onto the endpoints. Type `consistent-hash-scorer`.

    score = blake2b-64(key, endpoint id) / 2**64, a fixed pseudo-random
    number in [0, 1) per (key, endpoint). The highest-scoring candidate is
    the key's rendezvous (highest-random-weight) owner, so a max-score
    picker sends a key to the same endpoint for as long as that endpoint is
    a candidate, and removing an endpoint moves only the keys it owned
    (Thaler and Ravishankar, "Using Name-Based Mappings to Increase Hit
    Rates", 1998). The score is the hash itself rather than 1 for the owner
    and 0 elsewhere, so that it is absolute: it does not depend on which
    other endpoints are candidates (STYLE.md 6).

    `key`: "session" (the request's session id), "tenant", or
    "session-or-tenant" (the session if set, else the tenant). A request
    without its key (no session, for "session") scores 0 everywhere.
    blake2b, not Python's `hash()`, so placements agree across processes.
    O(candidates) hashes.
    """

    key: str = attrs.field(default="session-or-tenant", validator=attrs.validators.in_(_HASH_KEYS))

    def score(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[float]:
        request = ctx.request
        if self.key == "tenant":
            value: str | None = request.tenant
        elif self.key == "session":
            value = request.session
        else:
            value = request.session if request.session is not None else request.tenant
        if value is None:
            return [0.0] * len(candidates)
        return self._hashes(value, [e.id for e in candidates])

    def score_rows(self, ctx: RouteContext, rows: Rows) -> Scores:
        """`score`'s hashes, one per row (nothing to vectorise in blake2b)."""
        value = self._key(ctx)
        if value is None:
            return np.zeros(len(rows))
        ids = _table(ctx).ids
        return np.array(self._hashes(value, [ids[i] for i in rows.tolist()]), dtype=np.float64)

    def _key(self, ctx: RouteContext) -> str | None:
        request = ctx.request
        if self.key == "tenant":
            return request.tenant
        if self.key == "session":
            return request.session
        return request.session if request.session is not None else request.tenant

    @staticmethod
    def _hashes(value: str, ids: list[str]) -> list[float]:
        raw = value.encode()
        prefix = len(raw).to_bytes(4, "big") + raw  # length-prefixed: no (key, id) ambiguity
        out = []
        for eid in ids:
            digest = hashlib.blake2b(prefix + eid.encode(), digest_size=8).digest()
            out.append(int.from_bytes(digest, "big") / _TWO_64)
        return out


@attrs.frozen
class KVCostScorer:
    """Dynamo KV router's cost, lowest best, as a score. Type `kv-cost-scorer`.

    cost = overlap_score_weight * prefill_blocks + decode_blocks
    score = 1 / (1 + cost / scale)

    prefill_blocks = the request's full blocks minus those the endpoint
    already holds (`ctx.matches`); decode_blocks = the router's in-flight
    tokens on the endpoint / tokens per block. The score falls as the cost
    rises, so a max-score picker takes the lowest cost, as Dynamo does at
    its default temperature 0 (Dynamo breaks exact ties by the smaller
    indexer tree, then at random; a max-score picker at random).

    Approximations of Dynamo's terms: Dynamo's decode term counts the KV
    blocks of the endpoint's active sequences plus the new request's
    (`ActiveSequences`, prompt blocks deduplicated across requests, output
    blocks optional); here it is the router's in-flight token work (uncached
    prompt plus expected output) in blocks, and leaves out the new request's
    own blocks, the same for every endpoint. Dynamo's prefill term also adds
    the endpoint's other not-yet-prefilled tokens; here it is this request's
    uncached blocks only. O(candidates).
    """

    overlap_score_weight: float = attrs.field(default=1.0, validator=attrs.validators.ge(0.0))
    scale: float = attrs.field(default=64.0, validator=attrs.validators.gt(0.0))

    @overlap_score_weight.validator
    def _finite(self, attr: attrs.Attribute[float], value: float) -> None:
        if not math.isfinite(value):
            raise ValueError(f"overlap_score_weight must be finite, got {value!r}")

    def score(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[float]:
        total, matches, weight = ctx.total_blocks, ctx.matches, self.overlap_score_weight
        tokens = ctx.load.tokens_view()
        per_block = 1.0 / ctx.tokens_per_block
        inv_scale = 1.0 / self.scale
        out = []
        for e in candidates:
            m = matches.get(e.id)
            prefill = total - (m.blocks if m is not None else 0)
            cost = weight * prefill + tokens.get(e.id, 0) * per_block
            out.append(1.0 / (1.0 + cost * inv_scale))
        return out

    def score_rows(self, ctx: RouteContext, rows: Rows) -> Scores:
        """Vectorised, in `score`'s order of operations."""
        table = _table(ctx)
        total, weight = ctx.total_blocks, self.overlap_score_weight
        row = table.row
        held = np.zeros(len(table), dtype=np.int64)
        for eid, m in ctx.matches.items():
            i = row.get(eid)
            if i is not None:
                held[i] = m.blocks
        prefill = total - held[rows]
        per_block = 1.0 / ctx.tokens_per_block
        inv_scale = 1.0 / self.scale
        cost = weight * prefill + table.tokens_at(ctx.load, rows) * per_block
        out: Scores = 1.0 / (1.0 + cost * inv_scale)
        return out


UNIT_ROW_SCORERS: frozenset[type] = frozenset(
    {
        ColdSpreadScorer,
        ConsistentHashScorer,
        InflightScorer,
        KVUtilisationScorer,
        LoraAffinityScorer,
        PrefixAffinityScorer,
        QueueDepthScorer,
        SessionAffinityScorer,
    }
)
"""The scorers (exactly these classes, not subclasses) whose `score_rows` is
within [0, 1] and never NaN by construction, so a profile of them alone skips
the clamp's check (`Profile.score_rows`): each is a ratio `x / (1 + y)` with
`0 <= x <= 1 <= 1 + y`, a sum of two such terms whose numerators sum to at
most 1 (`InflightScorer`: `(1 - w) + w` rounds to at most 1), a 0/1
indicator, `1 - v` for a validated `v` in [0, 1] (`kv_usage`,
`exp(-t)` with `t >= 0`), a 64-bit hash over 2**64, or clamped where it is
computed (`PrefixAffinityScorer`). `KVCostScorer` is left out: its bound
leans on the index's matches being no longer than the chain."""
