"""Admission: whether a request may be routed now, must wait, or is refused.

Every policy implements `AdmissionPolicy.admit` (`prefixroute.plugins`) and
reads only its `AdmissionContext`: time is `ctx.now`, never a clock. The
built-ins:

- `AlwaysAdmit`, the default.
- `TokenBucketAdmission`: per-tenant token buckets on requests/s and on
  tokens/s. Burst defaults to one second's worth of the rate, as Guava's
  `RateLimiter.create` (`SmoothBursty`, `maxBurstSeconds` 1.0); unlike
  Guava, a request that does not fit is refused (429) rather than served on
  credit, so the bucket never goes into debt.
- `ConcurrencyAdmission`: a per-tenant cap on requests in flight.
- `SheddingAdmission`: when the pool is saturated, requests with a negative
  priority are refused, after the Gateway API Inference Extension's
  saturation detector and its sheddable requests (GIE
  `pkg/epp/saturationdetector`; here with the `saturation-filter`'s
  thresholds, see the class).
- `AdmissionChain`: asks several policies in order (the config loader
  builds one per profile).

Fair queueing, which defers instead of refusing, lives in
`prefixroute.fairqueue`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Protocol

import attrs

from prefixroute.decision import Decision, Deferral, Rejection
from prefixroute.endpoint import EndpointState
from prefixroute.load import LoadTracker
from prefixroute.plugins import (
    AdmissionContext,
    AdmissionPolicy,
    CompletionListener,
    Deferring,
    TenantView,
)
from prefixroute.request import Request, Usage
from prefixroute.schema import DocumentError, join

__all__ = [
    "DEFAULT_MAX_TENANTS",
    "SLACK_S",
    "AdmissionChain",
    "AlwaysAdmit",
    "ConcurrencyAdmission",
    "SharedBuckets",
    "SheddingAdmission",
    "TokenBucketAdmission",
]

DEFAULT_MAX_TENANTS = 100_000
SLACK_S = 1e-6
"""Bucket times closer than this count as equal (see `TokenBucketAdmission`)."""


@attrs.frozen
class AlwaysAdmit:
    """Admits every request. Type `always-admit`."""

    def admit(self, ctx: AdmissionContext) -> Rejection | Deferral | None:
        return None


# -- the chain ----------------------------------------------------------------------


def _policies(value: Iterable[AdmissionPolicy]) -> tuple[AdmissionPolicy, ...]:
    out = tuple(value)
    for p in out:
        if not isinstance(p, AdmissionPolicy):
            raise TypeError(f"policies must be admission policies, got {type(p).__name__}")
    return out


@attrs.frozen
class AdmissionChain:
    """Asks each policy in order; the first answer that is not None wins.

    Built by the config loader from a profile's admission references. A
    policy's answer is final: the ones after it are not asked, and a policy
    that admitted before it keeps what it charged (a token bucket does not
    refund a request a later policy refused), so put stateless checks
    (shedding, concurrency) before stateful ones (rate limits).

    The chain forwards the optional capabilities: `on_complete` to every
    member that is a `CompletionListener`, `release` to every member that is
    `Deferring` (their answers concatenated, in member order). At most one
    deferring member is expected, and it should be the last: a request it
    releases later is routed without asking any member again, so per-tenant
    concurrency caps belong in the queue (`fair-queue-admission`'s
    `max_in_flight_per_tenant`), which applies them at release.
    The chain has both methods whatever its members, so with no deferring
    member `release` returns an empty list. O(members) per call.
    """

    policies: tuple[AdmissionPolicy, ...] = attrs.field(converter=_policies)

    def admit(self, ctx: AdmissionContext) -> Rejection | Deferral | None:
        for policy in self.policies:
            verdict = policy.admit(ctx)
            if verdict is not None:
                if isinstance(verdict, Deferral) and not isinstance(policy, Deferring):
                    raise TypeError(
                        f"{type(policy).__name__} deferred a request but cannot release it "
                        "(it does not implement Deferring.release)"
                    )
                return verdict
        return None

    def on_complete(self, decision: Decision, usage: Usage, now: float) -> None:
        """Tell every member that listens for completions."""
        for policy in self.policies:
            if isinstance(policy, CompletionListener):
                policy.on_complete(decision, usage, now)

    def release(
        self,
        endpoints: Sequence[EndpointState],
        load: LoadTracker,
        tenants: TenantView,
        now: float,
    ) -> list[tuple[Request, Rejection | None]]:
        """Every deferring member's released requests, member by member."""
        out: list[tuple[Request, Rejection | None]] = []
        for policy in self.policies:
            if isinstance(policy, Deferring):
                out.extend(policy.release(endpoints, load, tenants, now))
        return out


# -- shared parameter checks -------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _rate(name: str, value: object) -> float | None:
    """A rate or burst: a number > 0, or None (unlimited / derived)."""
    if value is None:
        return None
    if not _is_number(value) or not value > 0 or value == float("inf"):  # type: ignore[operator]
        raise ValueError(
            f"{name} must be a finite number > 0, or null for unlimited, got {value!r}"
        )
    return float(value)  # type: ignore[arg-type]


def _check_rate(_inst: object, attr: attrs.Attribute[float | None], value: object) -> None:
    _rate(attr.name, value)


def _check_request_burst(_inst: object, attr: attrs.Attribute[float | None], value: object) -> None:
    burst = _rate(attr.name, value)
    if burst is not None and burst < 1:
        raise ValueError(f"{attr.name} must be >= 1 (one request), got {value!r}")


def _tenant_key(field: str, tenant: object) -> str:
    if not isinstance(tenant, str) or not tenant:
        raise ValueError(
            f"{field} keys must be tenant names (non-empty strings; quote numbers in YAML), "
            f"got {tenant!r}"
        )
    return tenant


# -- token buckets ------------------------------------------------------------------

_BUCKET_KEYS = ("requests_per_s", "request_burst", "tokens_per_s", "token_burst")


def _bucket_overrides(value: object) -> Mapping[str, Mapping[str, float | None]]:
    if not isinstance(value, Mapping):
        raise ValueError(
            f"overrides must map tenant names to {{requests_per_s, request_burst, "
            f"tokens_per_s, token_burst}}, got {value!r}"
        )
    out: dict[str, Mapping[str, float | None]] = {}
    for tenant, limits in value.items():
        _tenant_key("overrides", tenant)
        if not isinstance(limits, Mapping):
            raise DocumentError(tenant, f"must be a mapping, got {limits!r}")
        parsed: dict[str, float | None] = {}
        for key, limit in limits.items():
            if key not in _BUCKET_KEYS:
                raise DocumentError(
                    join(tenant, str(key)), f"unknown key (allowed: {', '.join(_BUCKET_KEYS)})"
                )
            try:
                parsed[key] = _rate(key, limit)
            except ValueError as exc:
                raise DocumentError(join(tenant, key), str(exc)) from exc
        burst = parsed.get("request_burst")
        if burst is not None and burst < 1:
            raise DocumentError(join(tenant, "request_burst"), f"must be >= 1, got {burst!r}")
        out[tenant] = MappingProxyType(parsed)
    return MappingProxyType(out)


@attrs.frozen(slots=True)
class _Limits:
    """One tenant's effective limits (None = that bucket is unlimited)."""

    request_rate: float | None
    request_burst: float
    token_rate: float | None
    token_burst: float

    @property
    def unlimited(self) -> bool:
        return self.request_rate is None and self.token_rate is None


class _Bucket:
    """One tenant's two levels and the time they were last brought up to date."""

    __slots__ = ("requests", "stamp", "tokens")

    def __init__(self, requests: float, tokens: float, stamp: float) -> None:
        self.requests = requests
        self.tokens = tokens
        self.stamp = stamp


def _wait(level: float, cost: float, rate: float, burst: float) -> float:
    """Seconds until a bucket at `level` holds `cost` (0: it does now).

    A cost above the burst can never fit: the answer is then the full-refill
    time, burst / rate.
    """
    if cost > burst:
        return burst / rate
    if level + rate * SLACK_S >= cost:
        return 0.0
    return (cost - level) / rate


def _effective(
    requests_per_s: float | None,
    request_burst: float | None,
    tokens_per_s: float | None,
    token_burst: float | None,
) -> _Limits:
    """Limits with derived bursts: one second's worth of the rate (at least one request)."""
    return _Limits(
        request_rate=requests_per_s,
        request_burst=request_burst or max(1.0, requests_per_s or 1.0),
        token_rate=tokens_per_s,
        token_burst=token_burst or (tokens_per_s or 1.0),
    )


class SharedBuckets(Protocol):
    """Where `TokenBucketAdmission` takes its charges when several replicas share buckets.

    A driver implements it over a shared store (issue 15:
    `prefixroute.drivers.coordinator`); the core stays pure, so the store's
    answer must already be at hand when `admit` runs (the driver fetches it
    in its one round trip just before `Router.route`).
    """

    @property
    def share(self) -> float:
        """The fraction of each rate a replica may use on its own (1 / live replicas)."""
        ...

    def take(self, tenant: str, cost: int, now: float) -> tuple[float, float] | None:
        """The store's (request wait, token wait) for this request, in seconds.

        (0, 0) means admitted and already charged in the store; anything
        else refused. None means the store had no answer (down, slow, or no
        verdict fetched for this request): the policy then uses its local
        bucket at `share` of the rates.
        """
        ...


def _shared_limits(limits: _Limits, share: float) -> _Limits:
    """`limits` scaled by `share`: rates and bursts (a request burst of at least one request).

    Bursts too: while a shared store answers, the local buckets are not
    charged and sit full, so with unscaled bursts N replicas falling back at
    once would each let a whole burst through. A request costing more than
    its share of the token burst then waits for the store (429).
    """
    if share >= 1.0:
        return limits
    return _Limits(
        request_rate=None if limits.request_rate is None else limits.request_rate * share,
        request_burst=max(1.0, limits.request_burst * share),
        token_rate=None if limits.token_rate is None else limits.token_rate * share,
        token_burst=limits.token_burst * share,
    )


@attrs.define(on_setattr=attrs.setters.frozen)
class TokenBucketAdmission:
    """Per-tenant token buckets on requests/s and tokens/s. Type `token-bucket-admission`.

    Each tenant has two buckets, refilled continuously from `ctx.now`: one of
    `request_burst` requests refilling at `requests_per_s`, one of
    `token_burst` tokens refilling at `tokens_per_s`. A request costs one
    request and `prompt_tokens + max_tokens` tokens (`default_output_tokens`
    when the request gives no `max_tokens`). It is admitted, and charged, when
    both buckets hold its cost; otherwise it is refused with 429 (`kind`
    `rate-limit`), a reason naming the tenant and the limit, and
    `retry_after_s` = the time until both buckets hold enough (assuming the
    tenant sends nothing else meanwhile). A request costing more than the
    token burst can never be admitted: it is refused with 400 (`kind`
    `too-large`) and no retry-after, and the reason tells the client its
    prompt plus `max_tokens` exceed the tenant's burst (retrying would
    never help).

    Limits: None (YAML `null`) means unlimited, the default for both rates;
    0 is refused (there is no "block everything" rate: cap the tenant at 0
    in flight with `concurrency-admission` instead). A burst left at None is
    one second's worth of its rate (at least one request). `overrides` maps
    a tenant to any of the four limits; keys it leaves out take the
    top-level values (so a tenant can be made unlimited with
    `{requests_per_s: null, tokens_per_s: null}`). A tenant with no limit at
    all costs nothing and keeps no state.

    Memory: buckets live in an LRU of at most `max_tenants` tenants. A
    bucket refilled to full carries no information (a new tenant starts
    full), so evicting the least recently used one is exact whenever it has
    been idle for its full-refill time, burst / rate: always, unless more than
    `max_tenants` distinct tenants arrive within that time. Otherwise the
    evicted tenant comes back to a full bucket: a leniency of at most one
    burst per eviction.

    Times: `ctx.now` only (assumed monotonic); a `now` earlier than a
    bucket's last update refills nothing. Levels within `rate` x 1 us of a
    request's cost count as enough (`SLACK_S`), so a client that retries
    exactly after `retry_after_s` gets in despite float rounding; over any
    window [t0, t1] a tenant is admitted at most
    `burst + rate * (t1 - t0 + 1e-6)` of each unit. O(1) per decision.

    Shared across replicas (`share_with`): the buckets live in a shared
    store and the driver fetches the store's verdict for each request
    (`cost` and `limits` give it the script's arguments); `admit` turns
    that verdict into the same admission, 429 or 400 as a local bucket
    would. When the store has no answer, the local bucket is used at the
    replica's share of each rate and burst (1/N with N replicas), so N
    replicas together still admit about the limit.
    """

    requests_per_s: float | None = attrs.field(default=None, validator=_check_rate)
    request_burst: float | None = attrs.field(default=None, validator=_check_request_burst)
    tokens_per_s: float | None = attrs.field(default=None, validator=_check_rate)
    token_burst: float | None = attrs.field(default=None, validator=_check_rate)
    default_output_tokens: int = attrs.field(default=256, validator=attrs.validators.ge(0))
    overrides: Mapping[str, Mapping[str, float | None]] = attrs.field(
        factory=dict, converter=_bucket_overrides
    )
    max_tenants: int = attrs.field(default=DEFAULT_MAX_TENANTS, validator=attrs.validators.ge(1))
    # State, not parameters. `_default` and `_limits` (the overridden tenants') are the
    # effective limits, derived once after validation; `_buckets` is an LRU (least
    # recently used first) of at most `max_tenants` tenants' buckets.
    _default: _Limits = attrs.field(
        init=False, eq=False, repr=False, on_setattr=attrs.setters.NO_OP
    )
    _limits: dict[str, _Limits] = attrs.field(
        init=False, eq=False, repr=False, on_setattr=attrs.setters.NO_OP
    )
    _buckets: OrderedDict[str, _Bucket] = attrs.field(
        init=False, factory=OrderedDict, eq=False, repr=False
    )
    _shared: list[SharedBuckets] = attrs.field(init=False, factory=list, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        top = {
            "requests_per_s": self.requests_per_s,
            "request_burst": self.request_burst,
            "tokens_per_s": self.tokens_per_s,
            "token_burst": self.token_burst,
        }
        self._default = _effective(**top)
        self._limits = {tenant: _effective(**{**top, **o}) for tenant, o in self.overrides.items()}

    def _bucket(self, tenant: str, limits: _Limits, now: float) -> _Bucket:
        """The tenant's bucket refilled to `now` and marked most recently used. O(1).

        A tenant without one (new, or evicted) starts full at `now`. A `now`
        earlier than the bucket's stamp refills nothing and keeps the stamp,
        so a clock that steps back creates no tokens.
        """
        buckets = self._buckets
        bucket = buckets.get(tenant)
        if bucket is None:
            bucket = buckets[tenant] = _Bucket(limits.request_burst, limits.token_burst, now)
            if len(buckets) > self.max_tenants:
                buckets.popitem(last=False)
            return bucket
        buckets.move_to_end(tenant)
        elapsed = now - bucket.stamp
        if elapsed > 0:
            if limits.request_rate is not None:
                bucket.requests = min(
                    limits.request_burst, bucket.requests + limits.request_rate * elapsed
                )
            if limits.token_rate is not None:
                bucket.tokens = min(limits.token_burst, bucket.tokens + limits.token_rate * elapsed)
            bucket.stamp = now
        return bucket

    def share_with(self, shared: SharedBuckets | None) -> None:
        """Take charges from `shared` from now on (None: back to local buckets only)."""
        self._shared[:] = [] if shared is None else [shared]

    def cost(self, request: Request, prompt_tokens: int) -> int:
        """What `request` costs the tenant's token bucket: prompt plus (expected) output tokens."""
        out = request.max_tokens
        return prompt_tokens + (self.default_output_tokens if out is None else out)

    def limits(self, tenant: str) -> tuple[float | None, float, float | None, float]:
        """`tenant`'s effective (requests_per_s, request_burst, tokens_per_s, token_burst)."""
        lim = self._limits.get(tenant, self._default)
        return lim.request_rate, lim.request_burst, lim.token_rate, lim.token_burst

    def tracked_tenants(self) -> int:
        """Tenants holding a bucket now (at most `max_tenants`)."""
        return len(self._buckets)

    def admit(self, ctx: AdmissionContext) -> Rejection | Deferral | None:
        request = ctx.request
        tenant = request.tenant
        limits = self._limits.get(tenant, self._default)
        if limits.unlimited:
            return None
        cost = self.cost(request, ctx.prompt_tokens)
        now = ctx.now
        if self._shared:
            shared = self._shared[0]
            verdict = shared.take(tenant, cost, now)
            if verdict is not None:
                return self._verdict(tenant, limits, cost, *verdict, retry_base=0.0)
            local = _shared_limits(limits, shared.share)
            return self._take_local(tenant, limits, local, cost, now)
        return self._take_local(tenant, limits, limits, cost, now)

    def _take_local(
        self, tenant: str, limits: _Limits, local: _Limits, cost: int, now: float
    ) -> Rejection | None:
        """Charge the local bucket (refilled under `local`, which may be a share of `limits`)."""
        bucket = self._bucket(tenant, local, now)
        wait_r = wait_t = 0.0
        if local.request_rate is not None:
            wait_r = _wait(bucket.requests, 1.0, local.request_rate, local.request_burst)
        if local.token_rate is not None:
            wait_t = _wait(bucket.tokens, cost, local.token_rate, local.token_burst)
        if wait_r == 0.0 and wait_t == 0.0:
            if local.request_rate is not None:
                bucket.requests -= 1.0
            if local.token_rate is not None:
                bucket.tokens -= cost
            return None
        return self._verdict(
            tenant, limits, cost, wait_r, wait_t, retry_base=max(0.0, bucket.stamp - now)
        )

    @staticmethod
    def _verdict(
        tenant: str, limits: _Limits, cost: int, wait_r: float, wait_t: float, *, retry_base: float
    ) -> Rejection | None:
        """None when both waits are 0, else the 400 (can never fit) or 429 (retry later)."""
        if wait_r <= 0.0 and wait_t <= 0.0:
            return None
        if limits.token_rate is not None and cost > limits.token_burst:
            # Retrying cannot help: the client must ask for less (a smaller max_tokens).
            return Rejection(400, _refusal(tenant, limits, cost, wait_r, wait_t), kind="too-large")
        return Rejection(
            429,
            _refusal(tenant, limits, cost, wait_r, wait_t),
            retry_after_s=max(wait_r, wait_t) + retry_base,
            kind="rate-limit",
        )

    def check_invariants(self) -> None:
        """Raise AssertionError unless the LRU is bounded and every level is in range."""
        if len(self._buckets) > self.max_tenants:
            raise AssertionError(
                f"{len(self._buckets)} buckets over max_tenants {self.max_tenants}"
            )
        for tenant, b in self._buckets.items():
            lim = self._limits.get(tenant, self._default)
            if lim.unlimited:
                raise AssertionError(f"unlimited tenant {tenant!r} holds a bucket")
            for level, rate, burst in (
                (b.requests, lim.request_rate, lim.request_burst),
                (b.tokens, lim.token_rate, lim.token_burst),
            ):
                low = -(rate or 0.0) * SLACK_S * (1 + 1e-9)
                if not low <= level <= burst:
                    raise AssertionError(
                        f"tenant {tenant!r} level {level} outside [{low}, {burst}]"
                    )


def _refusal(tenant: str, limits: _Limits, cost: int, wait_r: float, wait_t: float) -> str:
    if limits.token_rate is not None and cost > limits.token_burst:
        return (
            f"a request of {cost} tokens exceeds tenant {tenant!r}'s token burst of "
            f"{limits.token_burst:g} ({limits.token_rate:g} tokens/s): it can never be admitted"
        )
    over = []
    if wait_r > 0:
        over.append(f"{limits.request_rate:g} requests/s (burst {limits.request_burst:g})")
    if wait_t > 0:
        over.append(f"{limits.token_rate:g} tokens/s (burst {limits.token_burst:g})")
    return f"tenant {tenant!r} is over its rate limit of {' and '.join(over)}"


# -- concurrency --------------------------------------------------------------------


def _cap(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, or null for unlimited, got {value!r}")
    return value


def _check_cap(_inst: object, attr: attrs.Attribute[int | None], value: object) -> None:
    _cap(attr.name, value)


def _cap_overrides(value: object) -> Mapping[str, int | None]:
    if not isinstance(value, Mapping):
        raise ValueError(f"overrides must map tenant names to in-flight caps, got {value!r}")
    out: dict[str, int | None] = {}
    for tenant, cap in value.items():
        try:
            out[_tenant_key("overrides", tenant)] = _cap("cap", cap)
        except ValueError as exc:
            raise DocumentError(str(tenant), str(exc)) from exc
    return MappingProxyType(out)


def _check_retry_after(_inst: object, attr: attrs.Attribute[float], value: object) -> None:
    if not _is_number(value) or not 0 <= value < float("inf"):  # type: ignore[operator]
        raise ValueError(f"{attr.name} must be a finite number >= 0, got {value!r}")


@attrs.frozen
class ConcurrencyAdmission:
    """A per-tenant cap on requests in flight. Type `concurrency-admission`.

    A request whose tenant already has `cap` requests in flight
    (`ctx.tenants.in_flight`, the router's exact count) is refused with 429,
    `kind` `concurrency`, and `retry_after_s` (a fixed hint: when a slot
    frees depends on the tenant's own requests). The cap is
    `overrides[tenant]` when listed, else `max_in_flight`; None (`null`) is
    unlimited (the default) and 0 refuses every request of that tenant.
    Stateless, O(1).

    Shared across replicas (`share_with`), the count adds the other
    replicas' in-flight requests of the tenant as last synced (a driver's
    shared store), so the cap holds for the fleet, give or take what
    arrived within one sync interval.
    """

    max_in_flight: int | None = attrs.field(default=None, validator=_check_cap)
    overrides: Mapping[str, int | None] = attrs.field(
        factory=dict, converter=_cap_overrides, hash=False
    )
    retry_after_s: float = attrs.field(default=1.0, validator=_check_retry_after)
    _peers: list[Callable[[str], int]] = attrs.field(
        init=False, factory=list, eq=False, hash=False, repr=False
    )

    def share_with(self, peers: Callable[[str], int] | None) -> None:
        """Count `peers(tenant)` more requests in flight (other replicas'); None: none."""
        self._peers[:] = [] if peers is None else [peers]

    def admit(self, ctx: AdmissionContext) -> Rejection | Deferral | None:
        tenant = ctx.request.tenant
        cap = self.overrides.get(tenant, self.max_in_flight)
        if cap is None:
            return None
        n = ctx.tenants.in_flight(tenant)
        if self._peers:
            n += self._peers[0](tenant)
        if n < cap:
            return None
        return Rejection(
            429,
            f"tenant {tenant!r} has {n} requests in flight, its limit is {cap}",
            retry_after_s=self.retry_after_s,
            kind="concurrency",
        )


# -- saturation shedding ------------------------------------------------------------


@attrs.frozen
class SheddingAdmission:
    """Sheds sheddable requests while the pool is saturated. Type `shedding-admission`.

    The pool is saturated when every endpoint that could serve the request
    (healthy and serving its model) has `waiting > max_waiting` or
    `kv_usage > max_kv_usage`; with no such endpoint it is not (the filters
    answer 503 then). While saturated, a request with `priority < 0` is
    refused with 429, `kind` `saturated` and `retry_after_s`; priority >= 0
    is never shed by this policy. The thresholds default to the
    `saturation-filter`'s, so sheddable requests are shed exactly when that
    filter would have to fail open and queue them on a saturated endpoint;
    GIE's saturation detector uses stricter ones (5 waiting, 0.8 KV) and
    also counts stale metrics as saturated (chain a `stale-metrics-filter`
    in the profile for that). Stateless, O(endpoints).
    """

    max_waiting: int = attrs.field(default=128, validator=attrs.validators.ge(0))
    max_kv_usage: float = attrs.field(
        default=0.95, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)]
    )
    retry_after_s: float = attrs.field(default=1.0, validator=_check_retry_after)

    def saturated(self, request: Request, endpoints: Sequence[EndpointState]) -> bool:
        """Whether every endpoint that could serve `request` is over a threshold."""
        q, kv = self.max_waiting, self.max_kv_usage
        model = request.model
        usable = [e for e in endpoints if e.healthy and e.serves(model)]
        return bool(usable) and all(e.waiting > q or e.kv_usage > kv for e in usable)

    def admit(self, ctx: AdmissionContext) -> Rejection | Deferral | None:
        request = ctx.request
        if request.priority >= 0 or not self.saturated(request, ctx.endpoints):
            return None
        return Rejection(
            429,
            f"every endpoint is saturated (waiting > {self.max_waiting} or KV usage > "
            f"{self.max_kv_usage:g}): shedding priority {request.priority} request",
            retry_after_s=self.retry_after_s,
            kind="saturated",
        )
