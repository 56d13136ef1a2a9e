"""A scheduling profile: named filters, weighted scorers and one picker.

The profile owns composition (STYLE.md 6): it clamps each scorer's output to
[0, 1] (NaN counts as 0), multiplies by the scorer's weight and sums. The
shape follows the Gateway API Inference Extension's scheduling profiles
(`EndpointPickerConfig.schedulingProfiles`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import attrs
import numpy as np
import numpy.typing as npt

from prefixroute.endpoint import EndpointState
from prefixroute.pickers import MaxScorePicker
from prefixroute.plugins import Filter, Picker, RouteContext, Scorer

__all__ = ["Profile", "WeightedScorer"]


@attrs.frozen
class WeightedScorer:
    """A scorer as a profile uses it: its instance name and weight (finite, >= 0)."""

    name: str
    scorer: Scorer
    weight: float = attrs.field(default=1.0, converter=float)

    @weight.validator
    def _check_weight(self, attr: attrs.Attribute[float], value: float) -> None:
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"weight of scorer {self.name!r} must be finite and >= 0, got {value}")


def _filters(value: Iterable[tuple[str, Filter]]) -> tuple[tuple[str, Filter], ...]:
    return tuple(value)


def _scorers(value: Iterable[WeightedScorer]) -> tuple[WeightedScorer, ...]:
    return tuple(value)


def _unique(names: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"duplicate {what} name {n!r} in profile")
        seen.add(n)


@attrs.frozen
class Profile:
    """The pipeline one decision runs: filters in order, weighted scorers, a picker.

    `max_fallbacks` bounds how many runner-up endpoints a decision carries
    for drivers that retry (0 disables fallbacks). The picker defaults to
    max-score.
    """

    name: str
    filters: tuple[tuple[str, Filter], ...] = attrs.field(converter=_filters, default=())
    scorers: tuple[WeightedScorer, ...] = attrs.field(converter=_scorers, default=())
    picker: tuple[str, Picker] = attrs.field(factory=lambda: ("max-score-picker", MaxScorePicker()))
    max_fallbacks: int = attrs.field(default=2, validator=attrs.validators.ge(0))

    def __attrs_post_init__(self) -> None:
        if not self.name:
            raise ValueError("profile name must be non-empty")
        _unique([n for n, _ in self.filters], "filter")
        _unique([s.name for s in self.scorers], "scorer")

    @property
    def scorer_names(self) -> tuple[str, ...]:
        """The scorers' instance names, in order."""
        return tuple(ws.name for ws in self.scorers)

    @property
    def weights(self) -> tuple[float, ...]:
        """The scorers' weights, in order."""
        return tuple(ws.weight for ws in self.scorers)

    def score(
        self, ctx: RouteContext, candidates: Sequence[EndpointState]
    ) -> tuple[npt.NDArray[np.float64], list[float]]:
        """Run every scorer: (clamped scores, weighted totals per candidate).

        The first result has one row per scorer and one column per candidate:
        each scorer's output clamped into [0, 1] (NaN counts as 0). The totals
        are the weighted column sums. O(scorers x candidates); the clamp and
        the weighting are one numpy pass each (measured faster than
        per-scorer Python loops at 7 scorers x 64 candidates).
        """
        n = len(candidates)
        rows = []
        for ws in self.scorers:
            scores = ws.scorer.score(ctx, candidates)
            if len(scores) != n:
                raise ValueError(f"scorer {ws.name!r} returned {len(scores)} scores for {n}")
            rows.append(scores)
        if not rows or n == 0:
            empty = np.zeros((len(rows), n))
            empty.flags.writeable = False
            return empty, [0.0] * n
        try:
            raw = np.array(rows)
        except (ValueError, TypeError, OverflowError):  # ragged or unconvertible
            raw = np.empty(0, dtype=object)
        if raw.ndim != 2 or raw.dtype.kind not in "biuf":
            bad = next(
                (ws.name for ws, row in zip(self.scorers, rows, strict=True) if not _numeric(row)),
                self.scorers[0].name,
            )
            raise ValueError(f"scorer {bad!r} returned scores that are not a list of numbers")
        raw = raw.astype(np.float64)
        if not (raw.min() >= 0.0 and raw.max() <= 1.0):  # NaN fails both comparisons
            raw = np.clip(np.nan_to_num(raw, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
        raw.flags.writeable = False
        totals: list[float] = (np.array(self.weights) @ raw).tolist()
        return raw, totals


def _numeric(row: Sequence[float]) -> bool:
    try:
        arr = np.asarray(row)
    except (ValueError, TypeError, OverflowError):
        return False
    return arr.ndim == 1 and arr.dtype.kind in "biuf"


def score_reference(
    profile: Profile, ctx: RouteContext, candidates: Sequence[EndpointState]
) -> tuple[list[list[float]], list[float]]:
    """`Profile.score` in plain Python: the reference the numpy path is tested against."""
    raw: list[list[float]] = []
    totals = [0.0] * len(candidates)
    for ws in profile.scorers:
        row = []
        for x in ws.scorer.score(ctx, candidates):
            x = float(x)
            row.append(x if 0.0 <= x <= 1.0 else (1.0 if x > 1.0 else 0.0))
        raw.append(row)
        totals = [t + ws.weight * x for t, x in zip(totals, row, strict=True)]
    return raw, totals
