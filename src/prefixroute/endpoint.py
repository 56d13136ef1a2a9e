"""The endpoint model: what the router knows about one serving pod.

`EndpointState` is a frozen snapshot that a driver builds from whatever it
scrapes (Prometheus metrics, health checks, a simulator's engine). The core
never fetches it; drivers pass a fresh sequence of snapshots to every
`Router.route` call.

`EndpointTable` is the same snapshots in columns (numpy arrays of the scraped
figures, one row per endpoint), which the router builds once per change of
the endpoints it is given, so that the built-in filters and scorers run as a
few vectorised operations per request instead of a Python loop per endpoint
(the columnar layout of a dataframe; GIE's scheduler keeps per-endpoint
metrics objects and loops over them, as this library did before).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, NewType, Protocol

import attrs
import numpy as np
import numpy.typing as npt

from prefixroute.request import is_text

__all__ = ["MAX_COUNT", "EndpointId", "EndpointState", "EndpointTable", "Role"]

EndpointId = NewType("EndpointId", str)


class Role(enum.StrEnum):
    """What part of inference an endpoint serves (disaggregated serving)."""

    BOTH = "both"
    PREFILL = "prefill"
    DECODE = "decode"


MAX_COUNT = 2**63 - 1
"""Largest `waiting`, `running`, `kv_capacity_blocks` or `max_model_len` accepted (int64):
beyond it a value is a scrape gone wrong, and float arithmetic on it would overflow."""


def _endpoint_id(value: object) -> EndpointId:
    if not isinstance(value, str) or not value:
        raise ValueError(f"endpoint id must be a non-empty string, got {value!r}")
    if not is_text(value):
        raise ValueError(f"endpoint id must be valid text (no lone surrogates), got {value!r}")
    return EndpointId(value)


def _names(field: str, value: object) -> frozenset[str]:
    """`value` as a frozenset of non-empty strings (a bare string is refused, not split)."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError(f"{field} must be a collection of names, got {value!r}")
    out = frozenset(value)
    for name in out:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{field} must hold non-empty strings, got {name!r}")
    return out


def _models(value: object) -> frozenset[str]:
    return _names("models", value)


def _adapters(value: object) -> frozenset[str]:
    return _names("adapters", value)


def _check_address(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"address must be host:port, got {value!r}")
    host, sep, port = value.rpartition(":")
    if (
        not sep
        or not host
        or not (port.isascii() and port.isdigit())
        or not 0 < int(port) < 65536
        or not is_text(host)
    ):
        raise ValueError(f"address must be host:port, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_fraction(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    if not (_is_real(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{attr.name} must be a number within [0, 1], got {value!r}")


def _check_count(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if not (_is_int(value) and 0 <= value <= MAX_COUNT):
        raise ValueError(f"{attr.name} must be an integer in [0, 2**63), got {value!r}")


def _check_positive(_inst: object, attr: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and not (_is_int(value) and 0 < value <= MAX_COUNT):
        raise ValueError(f"{attr.name} must be an integer in [1, 2**63) or None, got {value!r}")


def _check_time(_inst: object, attr: attrs.Attribute[float | None], value: float | None) -> None:
    if value is not None and not (_is_real(value) and math.isfinite(value)):
        raise ValueError(f"{attr.name} must be a finite number or None, got {value!r}")


def _check_bool(_inst: object, attr: attrs.Attribute[bool], value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{attr.name} must be a boolean, got {value!r}")


@attrs.frozen(slots=True)
class EndpointState:
    """A snapshot of one endpoint as last observed by the driver.

    `models` and `adapters` name what the endpoint serves; an empty `models`
    means "any model" (a driver that does not know). `kv_capacity_blocks` is
    the engine's KV pool size in engine blocks (vLLM's `num_gpu_blocks`), or
    None when unknown. `observed_at` is the driver's time of the metrics
    behind `waiting`, `running` and `kv_usage`, or None if never observed.
    `max_model_len` is the engine's longest context in tokens (vLLM's
    `/v1/models` reports it), or None when unknown. `block_size` is the
    engine's KV block size in tokens (vLLM's `vllm:cache_config_info`
    reports it), or None when unknown.

    Every field is checked at construction: ValueError naming the field for
    a non-integer or negative count (`waiting`, `running`), a `kv_usage`
    outside [0, 1] or NaN, a `kv_capacity_blocks`, `max_model_len` or
    `block_size` that is not a positive integer (inf and NaN included), a non-finite
    `observed_at`, a bare string as `models` or `adapters` (a collection of
    names is expected), or an id or host that is not valid text. Counts are
    bounded by `MAX_COUNT`, so the router's arithmetic on them cannot
    overflow.
    """

    id: EndpointId = attrs.field(converter=_endpoint_id)
    address: str = attrs.field(validator=_check_address)
    role: Role = attrs.field(default=Role.BOTH, converter=Role)
    models: frozenset[str] = attrs.field(default=frozenset(), converter=_models)
    adapters: frozenset[str] = attrs.field(default=frozenset(), converter=_adapters)
    waiting: int = attrs.field(default=0, validator=_check_count)
    running: int = attrs.field(default=0, validator=_check_count)
    kv_usage: float = attrs.field(default=0.0, validator=_check_fraction)
    kv_capacity_blocks: int | None = attrs.field(default=None, validator=_check_positive)
    healthy: bool = attrs.field(default=True, validator=_check_bool)
    observed_at: float | None = attrs.field(default=None, validator=_check_time)
    max_model_len: int | None = attrs.field(default=None, validator=_check_positive)
    block_size: int | None = attrs.field(default=None, validator=_check_positive)

    def serves(self, model: str) -> bool:
        """Whether this endpoint serves `model` (an empty `models` serves all)."""
        return not self.models or model in self.models


def _frozen(array: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    array.flags.writeable = False
    return array


class _Load(Protocol):
    """What the table reads of a `LoadTracker` (structural: load.py imports this module)."""

    def requests_view(self) -> Mapping[EndpointId, int]: ...

    def tokens_view(self) -> Mapping[EndpointId, int]: ...


Rows = npt.NDArray[np.intp]
"""Row numbers of an `EndpointTable`, ascending (a candidate set in the endpoints' order)."""

_EXACT = float(2**53)


_ZEROS = ("zeros",)


class EndpointTable:
    """A sequence of `EndpointState`s in columns, for vectorised filters and scorers.

    Row i is `endpoints[i]`. Columns: `waiting` (int64), `kv_usage` and
    `observed_at` (float64, NaN when never observed), `healthy` (bool);
    `ids` lists the ids and `row` maps an id to its row. `all_rows` is every
    row (the candidates before any filter). `observed_min` / `observed_max`
    bound the observation times (None when no endpoint was observed; the
    minimum is None as soon as one was not), so a freshness check can often
    answer for every row at once; `exact` is False when an `observed_at` is an
    integer too large for a float64, and callers then use the per-endpoint
    path. `inflight_requests` / `inflight_tokens` hold the router's in-flight
    counts per row as float64 (exact: the router stops mirroring a count
    beyond 2**53) and `inflight_total` the requests' sum, when a router keeps
    them in step (`load_owner` is then the `LoadTracker` they mirror), and
    `changed_since` tells which rows' counts changed since a given mark, so a
    scorer of those counts can update its memoised column row by row.

    `memo(key, make)` caches anything derived from the table alone (a
    filter's mask, a scorer's column) for as long as the table lives: the
    router builds a new table whenever the endpoints it is given change, so
    nothing cached here can go stale. Building is O(endpoints); the table
    never changes after that except the in-flight columns.
    """

    __slots__ = (
        "_changes",
        "_changes_base",
        "_memo",
        "all_rows",
        "endpoints",
        "exact",
        "healthy",
        "ids",
        "inflight_requests",
        "inflight_tokens",
        "inflight_total",
        "kv_usage",
        "load_owner",
        "observed_at",
        "observed_max",
        "observed_min",
        "row",
        "waiting",
    )

    def __init__(self, endpoints: Sequence[EndpointState]) -> None:
        self.endpoints: tuple[EndpointState, ...] = tuple(endpoints)
        eps = self.endpoints
        n = len(eps)
        self.ids: list[EndpointId] = [e.id for e in eps]
        self.row: dict[EndpointId, int] = {eid: i for i, eid in enumerate(self.ids)}
        self.all_rows: Rows = np.arange(n, dtype=np.intp)
        self.all_rows.flags.writeable = False
        self.waiting = np.fromiter((e.waiting for e in eps), dtype=np.int64, count=n)
        self.kv_usage = np.fromiter((e.kv_usage for e in eps), dtype=np.float64, count=n)
        self.healthy = np.fromiter((e.healthy for e in eps), dtype=np.bool_, count=n)
        observed = [e.observed_at for e in eps]
        known = [t for t in observed if t is not None]
        self.exact = all(isinstance(t, float) or abs(t) <= _EXACT for t in known)
        self.observed_at = np.fromiter(
            (np.nan if t is None else float(t) for t in observed), dtype=np.float64, count=n
        )
        self.observed_max: float | None = max(known) if known else None
        self.observed_min: float | None = min(known) if len(known) == n and known else None
        self.inflight_requests = np.zeros(n)
        self.inflight_tokens = np.zeros(n)
        self.inflight_total = 0
        self.load_owner: object | None = None
        self._memo: dict[Hashable, Any] = {}
        self._changes: list[int] = []  # rows whose in-flight counts changed, in order
        self._changes_base = 0  # how many changes were dropped from the front of the log

    def note_change(self, row: int) -> None:
        """Log that `row`'s in-flight counts changed (the mirroring tracker calls it). O(1)."""
        changes = self._changes
        changes.append(row)
        if len(changes) > 4 * len(self.endpoints) + 64:  # bounded: readers recompute instead
            self._changes_base += len(changes)
            changes.clear()

    def changed_since(self, mark: int) -> tuple[list[int] | None, int]:
        """(rows changed since `mark`, the mark for next time); None when too old to tell.

        Start with mark -1 (answered None: compute everything). O(changes).
        """
        base, changes = self._changes_base, self._changes
        now = base + len(changes)
        if mark < base:
            return None, now
        return changes[mark - base :], now

    def __len__(self) -> int:
        return len(self.endpoints)

    def memo(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """`make()`, computed once per table and `key` (which must name every input)."""
        memo = self._memo
        try:
            return memo[key]
        except KeyError:
            value = memo[key] = make()
            return value

    def zeros(self, rows: Rows) -> npt.NDArray[np.float64]:
        """Zeros, one per row: a shared read-only array when `rows` is `all_rows`."""
        if rows is self.all_rows:
            found = self._memo.get(_ZEROS)
            if found is None:
                found = self._memo[_ZEROS] = _frozen(np.zeros(len(self.endpoints)))
            return found
        return np.zeros(len(rows))

    def column(self, full: npt.NDArray[np.float64], rows: Rows) -> npt.NDArray[np.float64]:
        """`full[rows]`: `full` itself (which must be read-only) when `rows` is `all_rows`."""
        return full if rows is self.all_rows else full[rows]

    def requests_at(self, load: _Load, rows: Rows) -> npt.NDArray[np.float64 | np.int64]:
        """`load`'s in-flight requests at `rows`: a gather when the columns mirror `load`.

        float64 from the mirror, int64 otherwise: equal values either way, and
        `count * float` converts an int64 as Python converts an int.
        """
        if load is self.load_owner:
            return self.inflight_requests if rows is self.all_rows else self.inflight_requests[rows]
        get, ids = load.requests_view().get, self.ids
        return np.array([get(ids[i], 0) for i in rows.tolist()], dtype=np.int64)

    def tokens_at(self, load: _Load, rows: Rows) -> npt.NDArray[np.float64 | np.int64]:
        """`load`'s in-flight tokens at `rows`: a gather when the columns mirror `load`.

        Counts beyond int64 come as float64 (each `float(count)`, the conversion
        Python's `int * float` makes), so scorers multiplying them by a float
        get the same figures.
        """
        if load is self.load_owner:
            return self.inflight_tokens if rows is self.all_rows else self.inflight_tokens[rows]
        get, ids = load.tokens_view().get, self.ids
        counts = [get(ids[i], 0) for i in rows.tolist()]
        try:
            return np.array(counts, dtype=np.int64)
        except OverflowError:  # beyond int64: as floats, converted as Python's int * float does
            return np.array([float(c) for c in counts], dtype=np.float64)

    def narrow(
        self, key: Hashable, rows: Rows, mask: Callable[[], npt.NDArray[np.bool_]], fail_open: bool
    ) -> Rows:
        """`rows` where the memoised full-table `mask` (named by `key`) holds.

        `rows` itself when all are kept, or when none is and `fail_open`. The
        last answer per key is remembered with its input, so a filter that
        sees the same rows object again (the same candidates as the request
        before) answers in O(1); otherwise O(len(rows)) vectorised.
        """
        memo = self._memo
        last = memo.get(("narrowed", key))
        if last is not None and last[0] is rows:
            return last[1]  # type: ignore[no-any-return]
        full = self.memo(key, mask)
        out: Rows = rows[full[rows]]
        if len(out) == len(rows) or (fail_open and not len(out)):
            out = rows
        memo[("narrowed", key)] = (rows, out)
        return out

    def select(self, rows: Rows) -> list[EndpointState]:
        """The endpoints at `rows`, in that order. O(len(rows))."""
        eps = self.endpoints
        return [eps[i] for i in rows.tolist()]

    def rows_of(self, endpoints: Sequence[EndpointState]) -> Rows | None:
        """The rows of `endpoints` (each one of this table's own objects), else None.

        For a candidate list a third-party filter returned: its rows when the
        array path can take over from there, None when it returned objects
        the table does not hold (or in another order). O(len(endpoints)).
        """
        row, eps = self.row, self.endpoints
        out = []
        last = -1
        for e in endpoints:
            i = row.get(e.id)
            if i is None or eps[i] is not e or i <= last:
                return None
            out.append(i)
            last = i
        return np.array(out, dtype=np.intp)
