"""Plugins that route on predicted latency: `predicted-latency-scorer` and `slo-filter`.

Both ask the router's `LatencyModel` (`prefixroute.latency`) what each
candidate would give this request: its TTFT, from the uncached tokens the
prefix index predicts there, the endpoint's prefill backlog, its in-flight
requests and scraped queue; and its TPOT. The scorer prefers the lowest
predicted latency; the filter keeps the endpoints predicted to meet the
request's objectives, as llm-d's SLO scorer routes to pods with positive
headroom (llm-d, guides/predicted-latency-based-scheduling), and decides
what happens when none will (`on_miss`).

Per request, `Request.predictive` (the `x-prediction-based-scheduling`
header) turns both on or off; None leaves it to their `enabled` parameter.
Turned off, the scorer gives every candidate 0 and the filter keeps them
all, so the rest of the profile decides. As in llm-d, enabled without
objectives means "lowest predicted latency".

Both have their array twins (`score_rows`, `filter_rows`) computing the
same float64 expressions on the same values, so the two paths agree bit
for bit (tests/test_profile_rows.py). O(candidates) vectorised per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs
import numpy as np
import numpy.typing as npt

from prefixroute.decision import Rejection
from prefixroute.endpoint import EndpointState, Rows
from prefixroute.latency import LatencyModel, z_score
from prefixroute.plugins import RouteContext
from prefixroute.request import Request

__all__ = ["PredictedLatencyScorer", "SloFilter", "predict_candidates", "predict_rows"]

_Floats = npt.NDArray[np.float64]
_FALLBACK = LatencyModel()
_NO_BLOCKS = np.zeros(0)  # for plugins driven without a router (tests, `explain`)


def _quantile(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    z_score(value)  # ValueError outside (0, 1)


def _enabled(request: Request, default: bool) -> bool:
    return default if request.predictive is None else request.predictive


def _model(ctx: RouteContext) -> LatencyModel:
    return ctx.latency if ctx.latency is not None else _FALLBACK


_Predicted = tuple[_Floats, "_Floats | None", "_Floats | None", "_Floats | None"]


def _predict(
    ctx: RouteContext,
    model: LatencyModel,
    slots: npt.NDArray[np.intp],
    blocks: _Floats,
    requests: _Floats,
    tokens: _Floats | None,
    waiting: _Floats,
    *,
    tpot: bool,
    spread: bool,
) -> _Predicted:
    """`LatencyModel.predict_slots` with the request's figures from `ctx`."""
    return model.predict_slots(
        slots,
        blocks,
        ctx.prompt_tokens,
        ctx.tokens_per_block,
        ctx.now,
        requests,
        tokens,
        waiting,
        tpot=tpot,
        spread=spread,
    )


def predict_candidates(
    ctx: RouteContext,
    candidates: Sequence[EndpointState],
    *,
    tpot: bool = True,
    spread: bool = True,
) -> _Predicted:
    """Mean TTFT, mean TPOT and their spreads for `candidates` (seconds). O(n).

    `tpot` / `spread` False leave those out (None), as `LatencyModel.predict_slots`.
    """
    n = len(candidates)
    matches = ctx.matches
    blocks = _NO_BLOCKS
    if matches:
        blocks = np.fromiter(
            (m.blocks if (m := matches.get(e.id)) is not None else 0 for e in candidates),
            dtype=np.float64,
            count=n,
        )
    load = ctx.load
    requests = np.fromiter((load.requests(e.id) for e in candidates), dtype=np.float64, count=n)
    tokens = None
    if tpot:
        tokens = np.fromiter((load.tokens(e.id) for e in candidates), dtype=np.float64, count=n)
    waiting = np.fromiter((e.waiting for e in candidates), dtype=np.float64, count=n)
    model = _model(ctx)
    slots = model.slots(e.id for e in candidates)
    return _predict(ctx, model, slots, blocks, requests, tokens, waiting, tpot=tpot, spread=spread)


def predict_rows(
    ctx: RouteContext, rows: Rows, *, tpot: bool = True, spread: bool = True
) -> _Predicted:
    """`predict_candidates` for rows of the router's table, the same values bit for bit. O(n)."""
    table = ctx.table
    if table is None:
        raise ValueError("predict_rows needs ctx.table (the router's EndpointTable)")
    model = _model(ctx)
    entry = table.memo(("latency", id(model)), lambda: [-1, None, None])
    if entry[0] != model.generation:  # a slot was taken or freed: map the ids again
        entry[0] = model.generation
        entry[1] = model.slots(table.ids)
        entry[2] = table.waiting.astype(np.float64)
    everything = rows is table.all_rows
    slots = entry[1] if everything else entry[1][rows]
    waiting = entry[2] if everything else entry[2][rows]
    blocks = _NO_BLOCKS
    if ctx.matches:
        full = np.zeros(len(table))
        row = table.row
        for eid, m in ctx.matches.items():
            i = row.get(eid)
            if i is not None:
                full[i] = m.blocks
        blocks = full if everything else full[rows]
    requests = table.requests_at(ctx.load, rows).astype(np.float64, copy=False)
    tokens = table.tokens_at(ctx.load, rows).astype(np.float64, copy=False) if tpot else None
    return _predict(ctx, model, slots, blocks, requests, tokens, waiting, tpot=tpot, spread=spread)


@attrs.frozen
class PredictedLatencyScorer:
    """Prefers the lowest predicted latency. Type `predicted-latency-scorer`.

    score = 1 / (1 + objective / scale), objective = TTFT_q + tpot_weight x TPOT_q,

    with TTFT_q and TPOT_q the model's `quantile` predictions for this request
    at the candidate (seconds) and `scale` = `scale_ms` / 1000 (the score is
    0.5 at that latency). `tpot_weight` counts output tokens whose time joins
    the objective (0: TTFT alone; the request's expected output length gives
    end-to-end latency). Scores are absolute, so a candidate's score does not
    depend on the others (STYLE.md 6); with this scorer alone, the max-score
    picker takes the lowest predicted objective.
    """

    scale_ms: float = attrs.field(default=500.0, validator=attrs.validators.gt(0.0))
    tpot_weight: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    quantile: float = attrs.field(default=0.5, validator=_quantile)
    enabled: bool = True

    def score(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[float]:
        if not _enabled(ctx.request, self.enabled):
            return [0.0] * len(candidates)
        predicted = predict_candidates(ctx, candidates, tpot=self._tpot, spread=self._spread)
        out: list[float] = self._scores(*predicted).tolist()
        return out

    def score_rows(self, ctx: RouteContext, rows: Rows) -> _Floats:
        if not _enabled(ctx.request, self.enabled):
            return np.zeros(len(rows))
        return self._scores(*predict_rows(ctx, rows, tpot=self._tpot, spread=self._spread))

    @property
    def _tpot(self) -> bool:
        return self.tpot_weight > 0.0

    @property
    def _spread(self) -> bool:
        return self.quantile != 0.5

    def _scores(
        self,
        ttft: _Floats,
        tpot: _Floats | None,
        ttft_sd: _Floats | None,
        tpot_sd: _Floats | None,
    ) -> _Floats:
        z = z_score(self.quantile)
        objective = ttft if ttft_sd is None else ttft + z * ttft_sd
        if tpot is not None:
            objective = objective + self.tpot_weight * (
                tpot if tpot_sd is None else tpot + z * tpot_sd
            )
        if ttft_sd is not None:  # a low quantile can fall below 0
            objective = np.maximum(objective, 0.0)
        out: _Floats = 1.0 / (1.0 + objective * (1000.0 / self.scale_ms))
        return out


@attrs.frozen
class SloFilter:
    """Keeps the endpoints predicted to meet the request's latency objectives. Type `slo-filter`.

    A candidate meets them when its `quantile` TTFT prediction is within
    the request's TTFT objective and its TPOT prediction within the TPOT
    objective (each when set). A request without objectives, or with the
    filter turned off for it, keeps every candidate. When no candidate is
    predicted to meet them, `on_miss` decides: ``best-effort`` keeps them
    all (the scorers pick the least bad), ``shed`` drops them all for a
    request whose priority is below `shed_below_priority` when not even
    the optimistic `shed_quantile` prediction of any candidate meets them
    (the router then answers 503 with kind ``slo`` and a retry-after;
    higher priorities, and requests that might still make it, are routed
    best-effort). Shedding on the optimistic quantile, not `quantile`,
    because a request shed is a certain miss: on the `overload` scenario
    shedding at p10 kept 72% of requests within objective and shedding at
    p90 64% (docs/simulator.md). With `prefer` off the filter only sheds:
    it keeps every candidate while one is predicted to make it, and leaves
    the choice to the scorers (keeping only the endpoints predicted to meet
    a tight objective moves requests off the endpoints holding their
    prefix: 5 points of hit rate on `heldout-agentic`). O(candidates)
    vectorised.
    """

    quantile: float = attrs.field(default=0.9, validator=_quantile)
    shed_quantile: float = attrs.field(default=0.1, validator=_quantile)
    on_miss: Literal["best-effort", "shed"] = attrs.field(
        default="best-effort", validator=attrs.validators.in_(("best-effort", "shed"))
    )
    shed_below_priority: int = 0
    retry_after_s: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))
    prefer: bool = True
    enabled: bool = True

    @property
    def empty_rejection(self) -> Rejection:
        """What the router answers when this filter leaves no candidate."""
        return Rejection(
            503,
            "no endpoint is predicted to meet the request's latency objectives",
            retry_after_s=self.retry_after_s,
            kind="slo",
        )

    def filter(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[EndpointState]:
        if not self._active(ctx):
            return list(candidates)
        tpot = ctx.objectives.tpot_s is not None
        predicted = predict_candidates(ctx, candidates, tpot=tpot)
        keep = self._meets(ctx, self.quantile, *predicted)
        if keep.any():
            if not self.prefer:
                return list(candidates)
            return [e for e, k in zip(candidates, keep.tolist(), strict=True) if k]
        return [] if self._shed(ctx, predicted) else list(candidates)

    def filter_rows(self, ctx: RouteContext, rows: Rows) -> Rows:
        if not self._active(ctx):
            return rows
        predicted = predict_rows(ctx, rows, tpot=ctx.objectives.tpot_s is not None)
        keep = self._meets(ctx, self.quantile, *predicted)
        if keep.any():
            if not self.prefer:
                return rows
            out: Rows = rows[keep]
            return out
        return rows[:0] if self._shed(ctx, predicted) else rows

    def _active(self, ctx: RouteContext) -> bool:
        return ctx.objectives.any and _enabled(ctx.request, self.enabled)

    def _shed(self, ctx: RouteContext, predicted: _Predicted) -> bool:
        if self.on_miss != "shed" or ctx.request.priority >= self.shed_below_priority:
            return False
        return not self._meets(ctx, self.shed_quantile, *predicted).any()

    def _meets(
        self,
        ctx: RouteContext,
        quantile: float,
        ttft: _Floats,
        tpot: _Floats | None,
        ttft_sd: _Floats | None,
        tpot_sd: _Floats | None,
    ) -> npt.NDArray[np.bool_]:
        z = z_score(quantile)
        keep = np.ones(len(ttft), dtype=np.bool_)
        objectives = ctx.objectives
        if objectives.ttft_s is not None:
            assert ttft_sd is not None
            keep &= ttft + z * ttft_sd <= objectives.ttft_s
        if objectives.tpot_s is not None:
            assert tpot is not None and tpot_sd is not None
            keep &= tpot + z * tpot_sd <= objectives.tpot_s
        return keep
