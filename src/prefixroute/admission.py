"""Admission: whether a request may be routed at all.

This module holds the default, `AlwaysAdmit`. Rate limits, concurrency caps,
saturation shedding and fair queueing implement the same `AdmissionPolicy`
protocol (`prefixroute.plugins`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from prefixroute.decision import Rejection
from prefixroute.endpoint import EndpointState
from prefixroute.plugins import AdmissionPolicy
from prefixroute.request import Request

__all__ = ["AdmissionChain", "AlwaysAdmit"]


@attrs.frozen
class AlwaysAdmit:
    """Admits every request. Type `always-admit`."""

    def admit(
        self, request: Request, endpoints: Sequence[EndpointState], now: float
    ) -> Rejection | None:
        return None


def _policies(value: Iterable[AdmissionPolicy]) -> tuple[AdmissionPolicy, ...]:
    return tuple(value)


@attrs.frozen
class AdmissionChain:
    """Asks each policy in order; the first rejection wins. Built by the config loader."""

    policies: tuple[AdmissionPolicy, ...] = attrs.field(converter=_policies)

    def admit(
        self, request: Request, endpoints: Sequence[EndpointState], now: float
    ) -> Rejection | None:
        for policy in self.policies:
            rejection = policy.admit(request, endpoints, now)
            if rejection is not None:
                return rejection
        return None
