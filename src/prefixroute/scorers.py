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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

from prefixroute.endpoint import EndpointState
from prefixroute.plugins import RouteContext

__all__ = [
    "ColdSpreadScorer",
    "InflightScorer",
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
