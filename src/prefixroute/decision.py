"""What the router answers: a `Decision` to forward, or a `Rejection`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs
import numpy as np
import numpy.typing as npt

from prefixroute.endpoint import EndpointId
from prefixroute.latency import NO_OBJECTIVES, LatencyNote, Objectives
from prefixroute.request import Request

__all__ = ["CandidateIds", "Decision", "Deferral", "Rejection"]


class CandidateIds:
    """A decision's candidate ids before anyone asked for them: `ids[i]` for i in `rows`.

    The router passes one to `Decision(candidates=...)` so a decision costs
    no per-candidate Python work unless `Decision.candidates` is read.
    """

    __slots__ = ("_ids", "_rows")

    def __init__(self, ids: Sequence[EndpointId], rows: npt.NDArray[np.intp]) -> None:
        self._ids = ids
        self._rows = rows

    def ids(self) -> tuple[EndpointId, ...]:
        """The ids, as a tuple. O(len(rows))."""
        ids = self._ids
        return tuple([ids[i] for i in self._rows.tolist()])


@attrs.frozen(slots=True)
class Rejection:
    """The router will not serve the request: answer the client with `status`.

    `status` is an HTTP status: 429 (admission: over a rate, concurrency or
    saturation limit), 503 (no endpoint can serve), 400 (the request itself
    is unusable). `retry_after_s` is the hint for a `Retry-After` header.
    """

    status: int = attrs.field(validator=attrs.validators.in_((400, 429, 503)))
    reason: str
    retry_after_s: float | None = None
    kind: str = "rejected"
    """A short stable label for metrics (`rate-limit`, `concurrency`, `saturated`,
    `queue-full`, `deadline`, `no-endpoint`, `no-candidate`); `reason` is for people."""


@attrs.frozen(slots=True)
class Deferral:
    """The request waits in the admission policy's queue instead of being routed now.

    The driver holds the client and calls `Router.release` when capacity
    frees (and periodically, so deadlines fire); the request comes back from
    there as a `Decision`, or as a `Rejection` (503) once `deadline` passes.
    """

    reason: str
    deadline: float


_REPR = (
    "endpoint",
    "fallbacks",
    "matched_blocks",
    "total_blocks",
    "predicted_cached_tokens",
    "prompt_tokens",
    "request",
    "profile",
    "picker",
    "candidates",
    "scorer_names",
    "weights",
    "decided_at",
)


@attrs.frozen(slots=True, eq=False, repr=False)
class Decision:
    """Where one request goes, with everything needed to explain and settle it.

    `candidates` are the endpoints that passed the filters, in the order the
    scorers saw them; `raw[k, i]` (a read-only numpy array) is scorer
    `scorer_names[k]`'s clamped score
    in [0, 1] for candidate i, `weights[k]` its weight in the profile and
    `totals[i]` the weighted sum the picker saw (the per-endpoint views are
    the `scores` and `totals_by_endpoint` properties, built on demand so the
    hot path does not pay for them). `matched_blocks` and
    `predicted_cached_tokens` describe the chosen endpoint's prefix match;
    `matches` every endpoint's. The driver passes the whole `Decision` back to
    `Router.on_complete`; `epoch` is the chosen endpoint's generation, so the
    router can tell whether it was removed since. `serial` numbers the
    decisions of the router that made it and `issuer` is that router's
    private token: together they let the router settle each of its own
    decisions exactly once (`Router.on_complete` raises `SettlementError`
    otherwise). Equality is identity.

    `candidates`, `totals` and `block_keys` are tuples for their readers, but
    the router hands over its arrays (`CandidateIds`, a float64 and a uint64
    array) and the tuples are built on first read: most decisions are
    forwarded and settled without anyone reading them. `keys` is the block
    keys as the router's read-only uint64 array.

    `latency` is the latency model's note for the chosen endpoint (its
    predicted TTFT and TPOT, also as `predicted_ttft_s` / `predicted_tpot_s`,
    and the features it learns from at completion); `objectives` the latency
    objectives the request is held to (its own, else its tenant's default).
    """

    endpoint: EndpointId
    fallbacks: tuple[EndpointId, ...]
    matched_blocks: int
    total_blocks: int
    predicted_cached_tokens: int
    prompt_tokens: int
    request: Request
    profile: str
    picker: str
    _candidates: tuple[EndpointId, ...] | CandidateIds = attrs.field(alias="candidates")
    scorer_names: tuple[str, ...]
    weights: tuple[float, ...]
    raw: npt.NDArray[np.float64] = attrs.field(repr=False)
    _totals: tuple[float, ...] | npt.NDArray[np.float64] = attrs.field(repr=False, alias="totals")
    matches: Mapping[EndpointId, int] = attrs.field(repr=False)
    decided_at: float
    load_tokens: int = attrs.field(repr=False)
    _block_keys: tuple[int, ...] | npt.NDArray[np.uint64] = attrs.field(
        repr=False, alias="block_keys"
    )
    epoch: int = attrs.field(default=0, repr=False)
    serial: int = attrs.field(default=0, repr=False)
    issuer: object = attrs.field(default=None, repr=False)
    latency: LatencyNote | None = attrs.field(default=None, repr=False)
    objectives: Objectives = attrs.field(default=NO_OBJECTIVES, repr=False)

    @property
    def predicted_ttft_s(self) -> float | None:
        """The model's mean TTFT for the chosen endpoint at decision time, seconds."""
        return None if self.latency is None else self.latency.ttft_s

    @property
    def predicted_tpot_s(self) -> float | None:
        """The model's mean TPOT for the chosen endpoint at decision time, seconds."""
        return None if self.latency is None else self.latency.tpot_s

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in _REPR)
        return f"Decision({fields})"

    @property
    def candidates(self) -> tuple[EndpointId, ...]:
        """The candidates' ids, in the order the scorers saw them. O(1) after the first read."""
        value = self._candidates
        if not isinstance(value, tuple):
            value = value.ids()
            object.__setattr__(self, "_candidates", value)
        return value

    @property
    def totals(self) -> tuple[float, ...]:
        """The weighted totals the picker saw, per candidate. O(1) after the first read."""
        value = self._totals
        if not isinstance(value, tuple):
            value = tuple(value.tolist())
            object.__setattr__(self, "_totals", value)
        return value

    @property
    def block_keys(self) -> tuple[int, ...]:
        """The request's block keys (Python ints). O(1) after the first read."""
        value = self._block_keys
        if not isinstance(value, tuple):
            value = tuple(value.tolist())
            object.__setattr__(self, "_block_keys", value)
        return value

    @property
    def keys(self) -> npt.NDArray[np.uint64]:
        """The request's block keys as a read-only uint64 array (what the router settles with)."""
        value = self._block_keys
        if isinstance(value, tuple):
            return np.array(value, dtype=np.uint64)
        return value

    @property
    def scores(self) -> dict[EndpointId, dict[str, float]]:
        """Per candidate endpoint, per scorer: the clamped score in [0, 1]."""
        columns = self.raw.T.tolist()
        return {
            eid: dict(zip(self.scorer_names, columns[i], strict=True))
            for i, eid in enumerate(self.candidates)
        }

    @property
    def totals_by_endpoint(self) -> dict[EndpointId, float]:
        """Per candidate endpoint: the weighted total the picker saw."""
        return dict(zip(self.candidates, self.totals, strict=True))

    def explain(self) -> str:
        """A human-readable account: the choice, the match, and each candidate's scores."""
        req = self.request
        lines = [
            f"request {req.request_id or '-'} tenant={req.tenant} model={req.model}: "
            f"{self.prompt_tokens} prompt tokens, {self.total_blocks} full blocks",
            f"  -> {self.endpoint} (profile {self.profile}, picker {self.picker}): "
            f"matched {self.matched_blocks}/{self.total_blocks} blocks, "
            f"~{self.predicted_cached_tokens} tokens predicted cached",
        ]
        if self.fallbacks:
            lines.append(f"  fallbacks: {', '.join(self.fallbacks)}")
        header = ["endpoint", "total", "blocks"]
        header += [f"{n}*{w:g}" for n, w in zip(self.scorer_names, self.weights, strict=True)]
        rows = [header]
        order = sorted(range(len(self.candidates)), key=lambda i: -self.totals[i])
        for i in order:
            eid = self.candidates[i]
            row = [str(eid), f"{self.totals[i]:.3f}", str(self.matches.get(eid, 0))]
            row += [f"{x:.3f}" for x in self.raw[:, i].tolist()]
            rows.append(row)
        widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
        for r in rows:
            mark = "*" if r[0] == self.endpoint else " "
            cells = "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
            lines.append(f"  {mark} {cells}".rstrip())
        return "\n".join(lines)
