"""Built-in pickers: choose one candidate (and an order of fallbacks) from weighted scores.

Every picker returns all candidate indexes: the chosen one first, the rest by
descending score (ties by candidate order), which the router cuts to its
fallback count. Randomness comes only from `ctx.rng`, so decisions are
reproducible given the router's seed.

Sources: power of two choices (Mitzenmacher, "The Power of Two Choices in
Randomized Load Balancing", 2001; Finagle's P2C balancer); softmax/Boltzmann
selection as in the llm-d router's weighted-random pickers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

from prefixroute.plugins import RouteContext

__all__ = ["MaxScorePicker", "PowerOfTwoPicker", "SoftmaxPicker", "WeightedRandomPicker"]


def _ranked(totals: Sequence[float], first: int) -> list[int]:
    """`first`, then every other index by descending total (stable: ties keep their order)."""
    order = sorted(range(len(totals)), key=totals.__getitem__, reverse=True)
    order.remove(first)
    order.insert(0, first)
    return order


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


@attrs.frozen
class WeightedRandomPicker:
    """Picks with probability proportional to the total score. Type `weighted-random-picker`.

    All-zero totals pick uniformly.
    """

    def pick(self, ctx: RouteContext, totals: Sequence[float]) -> list[int]:
        first = _sample([max(0.0, t) for t in totals], ctx.rng.random())
        return _ranked(totals, first)


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


@attrs.frozen
class SoftmaxPicker:
    """Picks with probability proportional to exp(total / temperature). Type `softmax-picker`.

    Low temperatures approach max-score; high ones approach uniform.
    """

    temperature: float = attrs.field(default=0.1, validator=attrs.validators.gt(0.0))

    def pick(self, ctx: RouteContext, totals: Sequence[float]) -> list[int]:
        top = max(totals)
        t = self.temperature
        first = _sample([math.exp((x - top) / t) for x in totals], ctx.rng.random())
        return _ranked(totals, first)
