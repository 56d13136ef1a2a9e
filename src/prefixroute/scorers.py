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
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import attrs

from prefixroute.endpoint import EndpointState
from prefixroute.plugins import RouteContext

__all__ = [
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


@attrs.frozen
class PrefixAffinityScorer:
    """Prefers endpoints holding the request's prefix. Type `prefix-affinity-scorer`.

    score = (1 - length_weight) * weighted_matched / total
            + length_weight * min(1, weighted_matched * tokens_per_block / length_ref_tokens)

    `weighted_matched` counts each matched block at its tier's weight (GPU 1).
    A request with no full block scores 0 everywhere. O(candidates).
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
                out.append(ratio_w * w + lw * min(1.0, w * length_w))
        return out


@attrs.frozen
class QueueDepthScorer:
    """Prefers short engine queues (scraped `waiting`). Type `queue-depth-scorer`.

    score = 1 / (1 + waiting / scale).
    """

    scale: float = attrs.field(default=8.0, validator=attrs.validators.gt(0.0))

    def score(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[float]:
        inv = 1.0 / self.scale
        return [1.0 / (1.0 + e.waiting * inv) for e in candidates]


@attrs.frozen
class KVUtilisationScorer:
    """Prefers free KV cache: 1 - kv_usage (scraped). Type `kv-utilisation-scorer`."""

    def score(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[float]:
        return [1.0 - e.kv_usage for e in candidates]


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
        raw = value.encode()
        prefix = len(raw).to_bytes(4, "big") + raw  # length-prefixed: no (key, id) ambiguity
        out = []
        for e in candidates:
            digest = hashlib.blake2b(prefix + e.id.encode(), digest_size=8).digest()
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
