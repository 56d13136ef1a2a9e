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

from prefixroute.plugins import Filter, Picker, Scorer

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
    for drivers that retry (0 disables fallbacks).
    """

    name: str
    filters: tuple[tuple[str, Filter], ...] = attrs.field(converter=_filters, default=())
    scorers: tuple[WeightedScorer, ...] = attrs.field(converter=_scorers, default=())
    picker: tuple[str, Picker] | None = None
    max_fallbacks: int = attrs.field(default=2, validator=attrs.validators.ge(0))

    def __attrs_post_init__(self) -> None:
        if not self.name:
            raise ValueError("profile name must be non-empty")
        _unique([n for n, _ in self.filters], "filter")
        _unique([s.name for s in self.scorers], "scorer")
        if self.picker is None:
            from prefixroute.pickers import MaxScorePicker

            object.__setattr__(self, "picker", ("max-score-picker", MaxScorePicker()))

    @property
    def picker_name(self) -> str:
        """The picker's instance name."""
        assert self.picker is not None
        return self.picker[0]
