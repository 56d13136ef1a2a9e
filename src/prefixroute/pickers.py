"""Built-in pickers: choose one candidate (and an order of fallbacks) from weighted scores.

Every picker returns all candidate indexes: the chosen one first, the rest by
descending score (ties by candidate order), which the router cuts to its
fallback count. Randomness comes only from `ctx.rng`, so decisions are
reproducible given the router's seed.

Sources: power of two choices (Mitzenmacher, "The Power of Two Choices in
Randomized Load Balancing", 2001; Finagle's P2C balancer); softmax/Boltzmann
selection as in the llm-d router's weighted-random pickers.

Baselines, so that other routers' policies run as configs of this library (the
simulator compares them): `RoundRobinPicker` and `RandomPicker` (the
`round_robin` and `random` policies of SGLang's router and vLLM
production-stack), and `CacheAwarePicker`, SGLang router's `cache_aware`
policy (sgl-project/sglang, `sgl-model-gateway/src/policies/cache_aware.rs`,
formerly `sgl-router/src/policies/cache_aware.rs`; sglang-router 0.3.x). These
ignore the totals when choosing (the totals still order the fallbacks) and
keep mutable state, so they are mutable attrs classes whose state lives in
slots outside their attrs fields: the fields are the parameters a config may
set, nothing else.

`CacheAwarePicker`, step by step (the source's order):

1. load = the router's in-flight requests per candidate (SGLang's
   `Worker::load()`, the router's own count). Imbalanced when
   ``max - min > balance_abs_threshold and max > min * balance_rel_threshold``:
   then the least-loaded candidate wins.
2. Otherwise match the request's text (its prompt, else its token ids, one
   code point per token) in an approximate radix tree of what was sent where
   (`prefixroute.radix.RadixTree`). If the best match rate, matched length /
   sequence length, is above `cache_threshold`, the candidate with the
   longest match wins; otherwise the least-loaded one. (sglang-router up to
   0.2.x sent misses to the endpoint with the smallest tree,
   `get_smallest_tenant`; sglang PR #14650 "cache-aware router should pick
   min load instead of min tenant size", of 2025-12-08, made it the
   least-loaded worker ahead of the 0.3.0 release, PR #15781 of 2025-12-24.)
3. Insert the sequence into the tree for the winner at `ctx.now`.

Defaults are sglang-router 0.3.x's (`sgl-model-gateway/bindings/python/src/
sglang_router/router_args.py`, `RouterArgs`): cache_threshold 0.3,
balance_abs_threshold 64, balance_rel_threshold 1.5, eviction_interval_secs
60, max_tree_size 2**26. (The Rust binary's clap default for the eviction
interval, `sgl-model-gateway/src/main.rs`, is 120 s; the Python entry point
passes 60.)
Deviations, deliberate: no eviction thread (the core is pure) — instead,
when `ctx.now` has advanced `eviction_interval_s` since the last eviction, the
next pick evicts every tree to `max_tree_size` first; 0 disables eviction, as
in SGLang. Loads, matches and the winner are taken over the filtered
candidates only (SGLang computes min/max load over all workers, healthy or
not, and may name a matched worker that then fails its health check). Ties
break at random by `ctx.rng` (SGLang takes the first minimum, or whichever
tenant its concurrent map yields first). One tree per model, as in the
source.

Every built-in picker also has `pick_top(ctx, totals, count)`
(`plugins.TopPicker`): the first `count + 1` entries of what `pick` returns,
from a float64 array of totals, drawing the same random numbers. The router
keeps only the chosen endpoint and `max_fallbacks` runners-up, so ranking
every candidate (a sort, O(n log n) in Python) is wasted: `_top` finds the
runners-up with `numpy.argpartition` (O(n)) and sorts only those, with the
same tie order (descending total, then candidate order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import numpy as np
import numpy.typing as npt

from prefixroute.plugins import RouteContext
from prefixroute.radix import RadixTree, token_text

__all__ = [
    "CacheAwarePicker",
    "MaxScorePicker",
    "PowerOfTwoPicker",
    "RandomPicker",
    "RoundRobinPicker",
    "SoftmaxPicker",
    "WeightedRandomPicker",
]


def _ranked(totals: Sequence[float], first: int) -> list[int]:
    """`first`, then every other index by descending total (stable: ties keep their order)."""
    order = sorted(range(len(totals)), key=totals.__getitem__, reverse=True)
    order.remove(first)
    order.insert(0, first)
    return order


Totals = npt.NDArray[np.float64]
_PARTITION = 256  # from this many candidates on, partition first instead of sorting all
_SMALL = 16  # up to this many, Python's sort of a list beats numpy's per-call overheads


def _head(totals: Totals, m: int) -> list[int]:
    """The first `m` indexes of the stable descending order `_ranked` sorts by.

    That order is (descending total, then ascending index): numpy's stable
    argsort of the negated totals gives it (-0.0 and 0.0 compare equal in
    both). Totals are never NaN (the profile clamps scores, weights are
    finite), so the order is total. Below `_PARTITION` candidates one
    argsort, O(n log n) in C; from there `argpartition` finds the `m`
    largest in O(n), every index tied with the smallest of them joins, and
    only those are sorted, which gives the same head.
    """
    n = len(totals)
    if n <= _SMALL:
        return sorted(range(n), key=totals.tolist().__getitem__, reverse=True)[:m]
    if n < _PARTITION or m >= n:
        return np.argsort(-totals, kind="stable")[:m].tolist()  # type: ignore[no-any-return]
    part = np.argpartition(totals, n - m)[n - m :]
    near = np.flatnonzero(totals >= totals[part].min())
    return near[np.argsort(-totals[near], kind="stable")][:m].tolist()  # type: ignore[no-any-return]


def _top(totals: Totals, first: int, count: int, head: list[int] | None = None) -> list[int]:
    """`_ranked(totals.tolist(), first)[: count + 1]`, without ranking everyone.

    `head`: `_head(totals, m)` for some m >= count + 1, when the caller has it.
    """
    if count <= 0 or len(totals) == 1:
        return [first]
    if head is None:
        head = _head(totals, count + 1)
    return [first, *[i for i in head if i != first][:count]]


def _sample(weights: Sequence[float], u: float) -> int:
    total = sum(weights)
    if not total > 0:
        return int(u * len(weights)) % len(weights)
    target = u * total
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w
        if target < acc:
            return i
    return len(weights) - 1


@attrs.frozen
class MaxScorePicker:
    """The highest total wins; ties within `tolerance` break at random. Type `max-score-picker`."""

    tolerance: float = attrs.field(default=1e-9, validator=attrs.validators.ge(0.0))

    def pick(self, ctx: RouteContext, totals: Sequence[float]) -> list[int]:
        best = max(totals)
        floor = best - self.tolerance
        tied = [i for i, t in enumerate(totals) if t >= floor]
        first = tied[0] if len(tied) == 1 else tied[ctx.rng.randrange(len(tied))]
        return _ranked(totals, first)

    def pick_top(self, ctx: RouteContext, totals: Totals, count: int) -> list[int]:
        """One argsort gives the best, whether it is tied, and the runners-up."""
        if len(totals) <= _SMALL:
            return self.pick(ctx, totals.tolist())[: count + 1]
        head = _head(totals, max(2, count + 1))
        first = head[0]
        floor = float(totals[first]) - self.tolerance
        if len(head) > 1 and totals[head[1]] >= floor:  # tied: `pick`'s draw, in index order
            tied = np.flatnonzero(totals >= floor).tolist()
            first = tied[ctx.rng.randrange(len(tied))]
        return _top(totals, first, count, head)


@attrs.frozen
class WeightedRandomPicker:
    """Picks with probability proportional to the total score. Type `weighted-random-picker`.

    All-zero totals pick uniformly.
    """

    def pick(self, ctx: RouteContext, totals: Sequence[float]) -> list[int]:
        first = _sample([max(0.0, t) for t in totals], ctx.rng.random())
        return _ranked(totals, first)

    def pick_top(self, ctx: RouteContext, totals: Totals, count: int) -> list[int]:
        first = _sample([max(0.0, t) for t in totals.tolist()], ctx.rng.random())
        return _top(totals, first, count)


@attrs.frozen
class PowerOfTwoPicker:
    """Samples two distinct candidates, keeps the better. Type `power-of-two-picker`."""

    def pick(self, ctx: RouteContext, totals: Sequence[float]) -> list[int]:
        n = len(totals)
        if n == 1:
            return [0]
        a, b = ctx.rng.sample(range(n), 2)
        first = a if totals[a] >= totals[b] else b
        return _ranked(totals, first)

    def pick_top(self, ctx: RouteContext, totals: Totals, count: int) -> list[int]:
        n = len(totals)
        if n == 1:
            return [0]
        a, b = ctx.rng.sample(range(n), 2)
        first = a if totals[a] >= totals[b] else b
        return _top(totals, first, count)


@attrs.frozen
class SoftmaxPicker:
    """Picks with probability proportional to exp(total / temperature). Type `softmax-picker`.

    Low temperatures approach max-score; high ones approach uniform.
    """

    temperature: float = attrs.field(default=0.1, validator=attrs.validators.gt(0.0))

    def pick(self, ctx: RouteContext, totals: Sequence[float]) -> list[int]:
        return _ranked(totals, self._first(ctx, totals))

    def pick_top(self, ctx: RouteContext, totals: Totals, count: int) -> list[int]:
        return _top(totals, self._first(ctx, totals.tolist()), count)

    def _first(self, ctx: RouteContext, totals: Sequence[float]) -> int:
        top = max(totals)
        t = self.temperature
        return _sample([math.exp((x - top) / t) for x in totals], ctx.rng.random())


@attrs.frozen
class RandomPicker:
    """Uniform over the candidates, ignoring the totals. Type `random-picker`."""

    def pick(self, ctx: RouteContext, totals: Sequence[float]) -> list[int]:
        return _ranked(totals, ctx.rng.randrange(len(totals)))

    def pick_top(self, ctx: RouteContext, totals: Totals, count: int) -> list[int]:
        return _top(totals, ctx.rng.randrange(len(totals)), count)


@attrs.define
class RoundRobinPicker:
    """Candidate `turn mod n`, then `turn += 1`, ignoring the totals. Type `round-robin-picker`.

    One counter over all decisions, as SGLang's and production-stack's
    round-robin policies keep; when the candidate set changes size the
    cycle shifts (production-stack notes the same). O(candidates) for the
    fallback ranking.
    """

    # State, not a parameter: decisions taken so far.
    _turn: int = attrs.field(init=False, default=0, eq=False, repr=False)

    def pick(self, ctx: RouteContext, totals: Sequence[float]) -> list[int]:
        turn = self._turn
        self._turn = turn + 1
        return _ranked(totals, turn % len(totals))

    def pick_top(self, ctx: RouteContext, totals: Totals, count: int) -> list[int]:
        turn = self._turn
        self._turn = turn + 1
        return _top(totals, turn % len(totals), count)


def _least(values: Sequence[int], ctx: RouteContext) -> int:
    """The index of the smallest value, ties at random by `ctx.rng`."""
    low = min(values)
    tied = [i for i, v in enumerate(values) if v == low]
    return tied[0] if len(tied) == 1 else tied[ctx.rng.randrange(len(tied))]


@attrs.define
class CacheAwarePicker:
    """SGLang router's `cache_aware` policy (see the module docstring). Type `cache-aware-picker`.

    Needs `ctx.candidates` (one per total). Cost per pick: O(candidates) for
    the loads, one tree walk and one insert, O(len(sequence)); every
    `eviction_interval_s`, one eviction pass over each tree.
    """

    cache_threshold: float = attrs.field(
        default=0.3, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)]
    )
    balance_abs_threshold: int = attrs.field(default=64, validator=attrs.validators.ge(0))
    balance_rel_threshold: float = attrs.field(default=1.5, validator=attrs.validators.ge(0.0))
    eviction_interval_s: float = attrs.field(default=60.0, validator=attrs.validators.ge(0.0))
    max_tree_size: int = attrs.field(default=2**26, validator=attrs.validators.ge(1))
    # State, not parameters: one tree per model, and when the trees were last evicted.
    _trees: dict[str, RadixTree] = attrs.field(init=False, factory=dict, eq=False, repr=False)
    _evicted_at: float | None = attrs.field(init=False, default=None, eq=False, repr=False)

    def tree(self, model: str) -> RadixTree | None:
        """The approximate tree kept for `model`, if any request for it was routed."""
        return self._trees.get(model)

    def _tree(self, model: str) -> RadixTree:
        tree = self._trees.get(model)
        if tree is None:
            tree = self._trees[model] = RadixTree()
        return tree

    def _evict_when_due(self, now: float, interval: float, max_size: int) -> None:
        """Evict every tree to `max_size` once `interval` has passed since the last time.

        The first call starts the clock; an interval of 0 never evicts.
        """
        if interval <= 0:
            return
        if self._evicted_at is None:
            self._evicted_at = now
        elif now - self._evicted_at >= interval:
            for tree in self._trees.values():
                tree.evict(max_size)
            self._evicted_at = now

    def pick(self, ctx: RouteContext, totals: Sequence[float]) -> list[int]:
        return _ranked(totals, self._first(ctx, len(totals)))

    def pick_top(self, ctx: RouteContext, totals: Totals, count: int) -> list[int]:
        return _top(totals, self._first(ctx, len(totals)), count)

    def _first(self, ctx: RouteContext, n: int) -> int:
        """SGLang's choice (the module docstring), recorded in the tree."""
        candidates = ctx.candidates
        if len(candidates) != n:
            raise ValueError(
                f"cache-aware-picker needs ctx.candidates, one per total: "
                f"got {len(candidates)} candidates for {n} totals"
            )
        self._evict_when_due(ctx.now, self.eviction_interval_s, self.max_tree_size)
        request = ctx.request
        tree = self._tree(request.model)
        inflight = ctx.load.requests_view()
        loads = [inflight.get(e.id, 0) for e in candidates]
        low, high = min(loads), max(loads)
        if request.prompt is not None:
            seq = request.prompt
        else:
            assert request.token_ids is not None  # a Request has one or the other
            seq = token_text(request.token_ids)

        if high - low > self.balance_abs_threshold and high > low * self.balance_rel_threshold:
            first = _least(loads, ctx)
        else:
            matched = tree.match(seq)
            lengths = [matched.get(e.id, 0) for e in candidates]
            best = max(lengths)
            if seq and best / len(seq) > self.cache_threshold:
                first = _least([best - n for n in lengths], ctx)
            else:
                first = _least(loads, ctx)
        if seq:
            tree.insert(seq, candidates[first].id, ctx.now)
        return first
