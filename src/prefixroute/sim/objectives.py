"""The clients' latency objectives in a scenario, put on every request, and judged after.

A scenario's `objectives` are what its clients ask of the fleet, the same
for every policy compared (a header a client sends, not a router setting)::

    objectives:
      ttft_ms: 500                # time to first token, every tenant
      tpot_ms: 50                 # time per output token after the first
      tenants:                    # per tenant; an axis not given is the default's
        t0000: {ttft_ms: 200}

`ObjectiveSource` wraps a workload and sets each request's `slo_ttft_s` /
`slo_tpot_s` (what the gateway reads from `x-slo-ttft-ms` /
`x-slo-tpot-ms`, as llm-d's predicted-latency scheduler accepts them), so
the predictive policies can act on them; other policies ignore them.

`met` judges requests as the report counts them: a request with an
objective meets it when it was served (status 200), its TTFT is at most
its TTFT objective, and its time per output token, (E2E - TTFT) /
(output tokens - 1), is at most its TPOT objective. A one-token answer has
no TPOT and is judged on TTFT alone; a rejected, failed or timed-out
request misses. The same rule as the router's ledger
(`prefixroute.latency.Objectives.met`, where an axis without a
measurement is not judged).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import attrs
import numpy as np
import numpy.typing as npt

from prefixroute.sim.schema import Fields, ScenarioError
from prefixroute.sim.source import SimRequest, Source

__all__ = ["ClientObjectives", "ObjectiveSource", "met", "parse_objectives", "tpot"]

_Pair = tuple[float | None, float | None]


@attrs.frozen
class ClientObjectives:
    """Objectives in seconds (None: none on that axis): the default and per tenant.

    A tenant's entry wins per axis; an axis it does not give is the
    default's. O(1) per lookup.
    """

    ttft_s: float | None = None
    tpot_s: float | None = None
    tenants: Mapping[str, _Pair] = attrs.field(factory=dict)

    @property
    def any(self) -> bool:
        """Whether any request gets an objective."""
        return (
            self.ttft_s is not None
            or self.tpot_s is not None
            or any(a is not None or b is not None for a, b in self.tenants.values())
        )

    def for_tenant(self, tenant: str) -> _Pair:
        """`(ttft_s, tpot_s)` for a request of `tenant`."""
        own = self.tenants.get(tenant)
        if own is None:
            return self.ttft_s, self.tpot_s
        ttft, tpot = own
        return (self.ttft_s if ttft is None else ttft, self.tpot_s if tpot is None else tpot)

    def check_tenants(self, names: set[str] | None) -> None:
        """ScenarioError for a per-tenant entry naming no tenant of the workload.

        `names` None means the workload's tenants are not known ahead.
        """
        if names is None:
            return
        for name in self.tenants:
            if name not in names:
                shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
                raise ScenarioError(
                    f"objectives.tenants.{name}", f"is not one of the scenario's tenants ({shown})"
                )


def _axes(f: Fields) -> _Pair:
    ttft = f.number("ttft_ms", 0.0, above=0) / 1e3 if f.has("ttft_ms") else None
    tpot = f.number("tpot_ms", 0.0, above=0) / 1e3 if f.has("tpot_ms") else None
    return ttft, tpot


def parse_objectives(f: Fields) -> ClientObjectives:
    """A scenario's `objectives` mapping (module docstring); ScenarioError names the field."""
    ttft, tpot = _axes(f)
    tenants: dict[str, _Pair] = {}
    per = f.sub("tenants")
    for name in list(per.doc):
        t = per.sub(name)
        per.raw(name)
        tenants[name] = _axes(t)
        t.done()
    per.done()
    f.done()
    return ClientObjectives(ttft_s=ttft, tpot_s=tpot, tenants=tenants)


class ObjectiveSource:
    """A `Source` whose requests carry their tenant's objectives (`Request.slo_*_s`).

    Arrivals and follow-ups of `base`, each request copied with its
    objectives set (O(prompt) per request, as building it was); requests
    without any objective pass unchanged.
    """

    def __init__(self, base: Source, objectives: ClientObjectives) -> None:
        self.base = base
        self.objectives = objectives

    def _stamp(self, sim: SimRequest) -> SimRequest:
        ttft, tpot = self.objectives.for_tenant(sim.request.tenant)
        if ttft is None and tpot is None:
            return sim
        request = attrs.evolve(sim.request, slo_ttft_s=ttft, slo_tpot_s=tpot)
        return attrs.evolve(sim, request=request)

    def arrivals(self) -> Iterator[SimRequest]:
        """The base source's arrivals, with objectives."""
        return map(self._stamp, self.base.arrivals())

    def follow_up(self, done: SimRequest, finished_s: float, ok: bool) -> SimRequest | None:
        """The base source's follow-up, with objectives."""
        nxt = self.base.follow_up(done, finished_s, ok)
        return None if nxt is None else self._stamp(nxt)


Floats = npt.NDArray[np.float64]


def tpot(ttft_s: Floats, e2e_s: Floats, output_tokens: npt.NDArray[np.int64]) -> Floats:
    """Time per output token after the first, per request; NaN for one-token answers."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(output_tokens > 1, (e2e_s - ttft_s) / (output_tokens - 1), np.nan)


def met(
    ok: npt.NDArray[np.bool_],
    ttft_s: Floats,
    tpot_s: Floats,
    slo_ttft_s: Floats,
    slo_tpot_s: Floats,
) -> npt.NDArray[np.bool_]:
    """Per request: served and within every objective it has (module docstring). O(n).

    Objectives and measurements are NaN where absent; a request without any
    objective is never `met` (it is not judged at all).
    """
    has = ~np.isnan(slo_ttft_s) | ~np.isnan(slo_tpot_s)
    with np.errstate(invalid="ignore"):
        ttft_ok = np.isnan(slo_ttft_s) | (ttft_s <= slo_ttft_s)
        tpot_ok = np.isnan(slo_tpot_s) | np.isnan(tpot_s) | (tpot_s <= slo_tpot_s)
    return has & ok & ttft_ok & tpot_ok
