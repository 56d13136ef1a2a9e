"""Predicted latency: a per-endpoint model of TTFT and TPOT, learned online, and objectives.

Why: summing unitless scores (prefix 3, in-flight 2, ...) cannot know that
2,000 uncached tokens on an idle pod cost less than 200 behind a deep
prefill queue. Seconds can. `LatencyModel` predicts, for each candidate
endpoint, the time to first token and the time per output token a request
would see there, from what the router knows at decision time, and learns
from every completion how wrong it was.

The model, per endpoint (a slot of fixed-size arrays; O(1) memory each):

- TTFT = w . [1, u / 1000, b, r / 10, q / 10], where u is the request's
  uncached prompt tokens on that endpoint (its prompt minus the prefix the
  index predicts cached there), b the endpoint's prefill backlog in seconds,
  r the router's in-flight requests there and q the engine's scraped
  waiting queue. The backlog is a virtual "prefill busy until" horizon:
  each request routed there pushes it forward by its prefill time at the
  prior's rate (`prefill_s_per_token` x u), and time drains it, so b is the queued prefill work
  ahead of a new request, in seconds, without per-request bookkeeping
  (the fluid approximation of a FIFO prefill queue). The push is at the
  prior's prefill rate, fixed: at a learned rate the horizon fed its own
  estimate and ran away (to 10^13 s in the simulator) whenever the
  prompt-length weight was not identifiable; the weight w2 learns how the
  engine's rate compares with the prior's.
- TPOT = v . [1, r / 10, k / 10,000], with k the router's in-flight tokens
  there: a decode step's time grows with the batch it shares and the KV it
  reads (vLLM runs every running sequence's next token in one step).
- Both are learned by recursive least squares with exponential forgetting
  (Haykin, "Adaptive Filter Theory", ch. 10; forgetting factor `forgetting`),
  one small regression per endpoint, updated on each completion from the
  features recorded when that request was routed. Residuals are clipped at
  `clip` running mean absolute residuals before the update (a Huber-style
  guard, so one stalled request does not swing the weights), and the
  covariance's trace is capped so that forgetting cannot wind it up while a
  feature does not vary.
- Predictions use the weights with every load weight clamped at >= 0 (and
  the intercept at >= 0), so a prediction never falls as load, backlog or
  uncached tokens grow. The spread is an exponentially weighted RMS of the
  residuals per endpoint; a quantile q is predicted as mean + z(q) x spread
  (normal approximation), as llm-d's latency predictor targets p90 TTFT and
  TPOT (llm-d, guides/predicted-latency-based-scheduling: sidecars that
  learn p90 TTFT and TPOT online from KV-cache %, input length,
  waiting/running counts and prefix overlap). Ours runs in process: no
  sidecar, no network hop on the decision path.
- Cold start: weights from a `LatencyPrior` (defaults, or an engine
  profile's rates: the simulator derives one from its step cost model);
  an endpoint seen after some endpoint has `CALIBRATED_SAMPLES` samples
  starts from the calibrated endpoints' mean weights instead. Dynamo's KV
  router scores the same two quantities in blocks (prefill blocks to
  compute plus active decode blocks, ai-dynamo/dynamo
  `lib/llm/src/kv_router/scheduler.rs`); this model puts them in seconds
  and learns the exchange rate per endpoint.

Costs: a prediction for n endpoints is a few vectorised O(n) passes; an
update is O(d^2) for d = 5 features; memory is O(endpoints seen and not
forgotten). Pure: no clock, no I/O (the router passes `now`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from statistics import NormalDist

import attrs
import numpy as np
import numpy.typing as npt

from prefixroute import jit
from prefixroute.endpoint import EndpointId
from prefixroute.request import Request

__all__ = [
    "CALIBRATED_SAMPLES",
    "LatencyError",
    "LatencyModel",
    "LatencyNote",
    "LatencyPrior",
    "ObjectivePolicy",
    "Objectives",
    "Prediction",
]

CALIBRATED_SAMPLES = 20  # completions before an endpoint's weights seed newcomers
_TTFT_D = 5
_TPOT_D = 3
_P_INIT = 1.0  # initial covariance scale (weights are in seconds per O(1) feature)
_P_DIAG_MAX = 1.0  # per-direction windup cap (see `_Rls.update`)
_Floats = npt.NDArray[np.float64]


def _positive_or_none(
    _inst: object, attr: attrs.Attribute[float | None], value: float | None
) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{attr.name} must be a number of seconds or None, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{attr.name} must be > 0 and finite, got {value!r}")


@attrs.frozen(slots=True)
class Objectives:
    """A request's latency objectives in seconds; None sets no objective on that axis."""

    ttft_s: float | None = attrs.field(default=None, validator=_positive_or_none)
    tpot_s: float | None = attrs.field(default=None, validator=_positive_or_none)

    @property
    def any(self) -> bool:
        """Whether at least one objective is set."""
        return self.ttft_s is not None or self.tpot_s is not None

    def met(self, ttft_s: float | None, tpot_s: float | None) -> bool:
        """Whether measured latencies meet every set objective.

        A measurement of None (a one-token answer has no TPOT) is not judged
        on that axis; a set objective with no TTFT measured is missed.
        """
        if self.ttft_s is not None and (ttft_s is None or ttft_s > self.ttft_s):
            return False
        return self.tpot_s is None or tpot_s is None or tpot_s <= self.tpot_s


NO_OBJECTIVES = Objectives()


def _objective_map(value: Mapping[str, Objectives]) -> Mapping[str, Objectives]:
    out = dict(value)
    for name, obj in out.items():
        if not isinstance(name, str) or not isinstance(obj, Objectives):
            raise ValueError(f"tenants maps a tenant name to Objectives, got {name!r}: {obj!r}")
    return out


@attrs.frozen(slots=True)
class ObjectivePolicy:
    """Per-tenant default objectives; a request's own objectives win, axis by axis.

    `resolve` is O(1): the request's `slo_ttft_s` / `slo_tpot_s` when set,
    else the tenant's entry in `tenants`, else `default`, per axis.
    """

    default: Objectives = NO_OBJECTIVES
    tenants: Mapping[str, Objectives] = attrs.field(factory=dict, converter=_objective_map)

    def resolve(self, request: Request) -> Objectives:
        """The objectives `request` is held to."""
        default = self.default
        own = self.tenants.get(request.tenant, default)
        ttft = request.slo_ttft_s
        if ttft is None:
            ttft = own.ttft_s if own.ttft_s is not None else default.ttft_s
        tpot = request.slo_tpot_s
        if tpot is None:
            tpot = own.tpot_s if own.tpot_s is not None else default.tpot_s
        if ttft is own.ttft_s and tpot is own.tpot_s:
            return own
        return Objectives(ttft, tpot)


def _nonneg(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{attr.name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{attr.name} must be >= 0 and finite, got {value!r}")


@attrs.frozen(slots=True)
class LatencyPrior:
    """Cold-start rates, in seconds: what an endpoint is assumed to do before it is measured.

    `ttft_base_s`: TTFT of a tiny prompt on an idle engine (front end,
    one step). `prefill_s_per_token`: seconds per uncached prompt token.
    `ttft_s_per_request`: TTFT added per request already running there (the
    decode tokens a prefill step shares). `waiting_prompt_tokens`: the
    uncached tokens assumed per request in the engine's waiting queue.
    `tpot_base_s`: time per output token on an idle engine;
    `tpot_s_per_request` and `tpot_s_per_token`: its growth per running
    request and per in-flight token. The defaults are a mid-size model on
    one data-centre GPU, about 10,000 prefill tokens/s and 20 ms per output
    token; the model replaces them within tens of completions.
    """

    ttft_base_s: float = attrs.field(default=0.03, validator=_nonneg)
    prefill_s_per_token: float = attrs.field(default=1e-4, validator=_nonneg)
    ttft_s_per_request: float = attrs.field(default=0.001, validator=_nonneg)
    waiting_prompt_tokens: float = attrs.field(default=1000.0, validator=_nonneg)
    tpot_base_s: float = attrs.field(default=0.02, validator=_nonneg)
    tpot_s_per_request: float = attrs.field(default=0.0005, validator=_nonneg)
    tpot_s_per_token: float = attrs.field(default=1e-7, validator=_nonneg)

    def ttft_weights(self) -> _Floats:
        """The TTFT weights these rates give (the module docstring's features)."""
        p = self.prefill_s_per_token
        return np.array(
            [
                self.ttft_base_s,
                p * 1000.0,
                1.0,
                self.ttft_s_per_request * 10.0,
                p * self.waiting_prompt_tokens * 10.0,
            ]
        )

    def tpot_weights(self) -> _Floats:
        """The TPOT weights these rates give."""
        return np.array(
            [self.tpot_base_s, self.tpot_s_per_request * 10.0, self.tpot_s_per_token * 1e4]
        )


@attrs.frozen(slots=True)
class Prediction:
    """Predicted TTFT and TPOT at one endpoint: means and spreads (RMS residuals), seconds."""

    ttft_s: float
    tpot_s: float
    ttft_spread_s: float = 0.0
    tpot_spread_s: float = 0.0

    def ttft_at(self, quantile: float) -> float:
        """The TTFT `quantile` (normal approximation around the mean)."""
        return self.ttft_s + z_score(quantile) * self.ttft_spread_s

    def tpot_at(self, quantile: float) -> float:
        """The TPOT `quantile`."""
        return self.tpot_s + z_score(quantile) * self.tpot_spread_s


@attrs.frozen(slots=True)
class LatencyNote:
    """What the model predicted for a routed request, and the features it learns from later."""

    ttft_s: float
    tpot_s: float
    ttft_spread_s: float
    tpot_spread_s: float
    ttft_x: tuple[float, ...] = attrs.field(repr=False)
    tpot_x: tuple[float, ...] = attrs.field(repr=False)

    @property
    def prediction(self) -> Prediction:
        """The prediction as a `Prediction` value."""
        return Prediction(self.ttft_s, self.tpot_s, self.ttft_spread_s, self.tpot_spread_s)


@attrs.frozen(slots=True)
class LatencyError:
    """Running sums of prediction errors (prediction mean minus measured), seconds.

    MAE = `ttft_abs_s / ttft_samples`, bias = `ttft_signed_s / ttft_samples`
    (positive: the model predicts slower than what happens); the same for
    TPOT. The samples and absolute sums only grow (Prometheus counters); the
    signed sums can fall, so the drivers export them as gauges.
    """

    ttft_samples: int = 0
    ttft_abs_s: float = 0.0
    ttft_signed_s: float = 0.0
    tpot_samples: int = 0
    tpot_abs_s: float = 0.0
    tpot_signed_s: float = 0.0

    @property
    def ttft_mae_s(self) -> float | None:
        return self.ttft_abs_s / self.ttft_samples if self.ttft_samples else None

    @property
    def ttft_bias_s(self) -> float | None:
        return self.ttft_signed_s / self.ttft_samples if self.ttft_samples else None

    @property
    def tpot_mae_s(self) -> float | None:
        return self.tpot_abs_s / self.tpot_samples if self.tpot_samples else None

    @property
    def tpot_bias_s(self) -> float | None:
        return self.tpot_signed_s / self.tpot_samples if self.tpot_samples else None

    def __add__(self, other: LatencyError) -> LatencyError:
        return LatencyError(
            self.ttft_samples + other.ttft_samples,
            self.ttft_abs_s + other.ttft_abs_s,
            self.ttft_signed_s + other.ttft_signed_s,
            self.tpot_samples + other.tpot_samples,
            self.tpot_abs_s + other.tpot_abs_s,
            self.tpot_signed_s + other.tpot_signed_s,
        )


def z_score(quantile: float) -> float:
    """The standard normal quantile; ValueError outside (0, 1)."""
    if not (0.0 < quantile < 1.0):
        raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
    z = _Z.get(quantile)
    if z is None:
        z = _Z[quantile] = NormalDist().inv_cdf(quantile)
    return z


_Z: dict[float, float] = {0.5: 0.0}


def _ttft_numpy(
    slots: npt.NDArray[np.intp],
    w: _Floats,
    busy: _Floats,
    blocks: _Floats,
    prompt: float,
    tokens_per_block: float,
    requests: _Floats,
    waiting: _Floats,
    now: float,
    out: _Floats,
) -> None:
    """Mean TTFT at `slots` into `out`, in numpy: `_ttft_kernel`'s twin, operation for operation.

    `blocks` holds each candidate's matched blocks (empty: none matched);
    the uncached tokens are the prompt minus the reusable prefix, which
    never includes the prompt's last token.
    """
    if len(blocks):
        cap = prompt - 1.0 if prompt > 1.0 else 0.0
        uncached = prompt - np.minimum(blocks * tokens_per_block, cap)
    else:
        uncached = np.full(len(slots), prompt)
    g = np.take(w, slots, axis=1)
    backlog = busy[slots] - now
    np.maximum(backlog, 0.0, out=backlog)
    out[:] = (
        g[0]
        + g[1] * (uncached / 1000.0)
        + g[2] * backlog
        + g[3] * (requests / 10.0)
        + g[4] * (waiting / 10.0)
    )


@jit.njit
def _ttft_kernel(
    slots: npt.NDArray[np.intp],
    w: _Floats,
    busy: _Floats,
    blocks: _Floats,
    prompt: float,
    tokens_per_block: float,
    requests: _Floats,
    waiting: _Floats,
    now: float,
    out: _Floats,
) -> None:  # pragma: no cover - compiled
    """Mean TTFT at `slots` into `out`: one compiled pass (numpy's dozen calls cost ~20 us)."""
    matched = blocks.shape[0] > 0
    cap = prompt - 1.0 if prompt > 1.0 else 0.0
    for i in range(slots.shape[0]):
        s = slots[i]
        b = busy[s] - now
        if b < 0.0:
            b = 0.0
        u = prompt
        if matched:
            reusable = blocks[i] * tokens_per_block
            u = prompt - (reusable if reusable < cap else cap)
        out[i] = (
            w[0, s]
            + w[1, s] * (u / 1000.0)
            + w[2, s] * b
            + w[3, s] * (requests[i] / 10.0)
            + w[4, s] * (waiting[i] / 10.0)
        )


class _Rls:
    """Recursive least squares with forgetting, one state per slot.

    The update runs on Python floats (d <= 5: a few dozen multiply-adds,
    cheaper than as many numpy calls on tiny arrays); `clamped` and
    `spread` mirror each slot's weights and spread as numpy rows for the
    vectorised predictions.
    """

    __slots__ = (
        "clamped",
        "d",
        "dirty",
        "err",
        "p",
        "prior",
        "scale",
        "spread",
        "spread2",
        "w",
        "wc",
    )

    def __init__(self, d: int, prior: _Floats) -> None:
        self.d = d
        self.prior = [float(v) for v in prior]
        self.w: list[list[float]] = []  # raw weights per slot
        self.wc: list[list[float]] = []  # clamped weights per slot (Python floats)
        self.p: list[list[float]] = []  # covariance per slot, row-major d x d
        self.spread2: list[float] = []  # EW mean squared (clipped) residual
        self.scale: list[float] = []  # EW mean absolute residual (the clip's unit)
        self.err: list[list[float]] = []  # samples, abs error sum, signed error sum
        self.clamped = np.zeros((d, 0))  # weight j of slot s at [j, s]: row gathers are contiguous
        self.spread = np.zeros(0)
        self.dirty: set[int] = set()  # slots whose numpy mirrors are behind

    def grow(self, n: int) -> None:
        old = len(self.w)
        if n <= old:
            return
        d = self.d
        for _ in range(n - old):
            self.w.append([0.0] * d)
            self.wc.append([0.0] * d)
            self.p.append([0.0] * (d * d))
            self.spread2.append(0.0)
            self.scale.append(0.0)
            self.err.append([0.0, 0.0, 0.0])
        self.clamped = np.concatenate([self.clamped, np.zeros((d, n - old))], axis=1)
        self.spread = np.concatenate([self.spread, np.zeros(n - old)])

    def reset(self, slot: int, w: list[float]) -> None:
        d = self.d
        self.w[slot] = list(w)
        self.p[slot] = [_P_INIT if i % (d + 1) == 0 else 0.0 for i in range(d * d)]
        first = max(w[0], 0.0) * 0.5
        self.spread2[slot] = first * first
        self.scale[slot] = first
        self.err[slot] = [0.0, 0.0, 0.0]
        self._mirror(slot)

    def _mirror(self, slot: int) -> None:
        self.wc[slot] = [v if v > 0.0 else 0.0 for v in self.w[slot]]
        self.dirty.add(slot)

    def sync(self) -> None:
        """Copy the slots changed since the last call into the numpy mirrors. O(changed)."""
        dirty = self.dirty
        if not dirty:
            return
        for slot in dirty:
            self.clamped[:, slot] = self.wc[slot]
            self.spread[slot] = math.sqrt(self.spread2[slot])
        dirty.clear()

    def mean(self, slots: list[int]) -> list[float]:
        n = len(slots)
        return [sum(self.w[s][j] for s in slots) / n for j in range(self.d)]

    def update(
        self, slot: int, x: tuple[float, ...], y: float, lam: float, clip: float, predicted: float
    ) -> None:
        """One RLS step (Haykin ch. 10) with a clipped residual.

        `predicted` is what the model predicted for this request when it was
        routed: its error counts in `err` (the weights may have moved since).
        Windup: forgetting divides P by lambda at every step, so a direction
        no feature excites (a queue that stays empty) grows without bound
        and, capped as a whole, would switch forgetting off in the others.
        Each direction is capped alone instead: a diagonal entry above twice
        `_P_DIAG_MAX` scales its row and column down to it (once every ~70
        updates at lambda 0.99), which keeps P symmetric and positive definite.
        Rounding drifts P from symmetry and, over thousands of updates with
        features that hardly vary, from positive definiteness (the simulator's
        `seed` diverged to weights of 10^22): P is symmetrised at every update
        and restarted when x'Px turns negative. Plain loops over Python
        floats: for d <= 5 they beat numpy's per-call overhead several times.
        """
        d = self.d
        w, p = self.w[slot], self.p[slot]
        pred = 0.0
        px = [0.0] * d
        xpx = 0.0
        for i in range(d):
            xi = x[i]
            pred += w[i] * xi
            acc = 0.0
            row = i * d
            for j in range(d):
                acc += p[row + j] * x[j]
            px[i] = acc
            xpx += xi * acc
        if not xpx >= 0.0:  # P lost positive definiteness (rounding): start this slot's P again
            p[:] = [_P_INIT if k % (d + 1) == 0 else 0.0 for k in range(d * d)]
            px = [_P_INIT * xi for xi in x]
            xpx = sum(xi * v for xi, v in zip(x, px, strict=True))
        error = predicted - y
        r = y - pred
        s = self.scale[slot]
        limit = clip * s if s > 0.0 else abs(r)
        rc = -limit if r < -limit else (limit if r > limit else r)
        den = lam + xpx
        inv = 1.0 / lam
        capped: list[int] = []
        for i in range(d):  # P is symmetric: P x = (x' P)'
            ki = px[i] / den
            w[i] += ki * rc
            row = i * d
            for j in range(d):
                p[row + j] = (p[row + j] - ki * px[j]) * inv
            if not p[row + i] <= 2.0 * _P_DIAG_MAX:  # NaN included; hysteresis: rarely
                capped.append(i)
        for i in range(d):  # keep P symmetric: the update's rounding drifts it apart
            for j in range(i + 1, d):
                ij = i * d + j
                ji = j * d + i
                v = (p[ij] + p[ji]) * 0.5
                p[ij] = v
                p[ji] = v
        for i in capped:  # scale row and column i: p_ii becomes the cap, P stays symmetric
            v = p[i * (d + 1)]
            if not (math.isfinite(v) and v > 0.0):
                p[:] = [_P_INIT if k % (d + 1) == 0 else 0.0 for k in range(d * d)]
                break
            f = math.sqrt(_P_DIAG_MAX / v)
            for j in range(d):
                p[i * d + j] *= f
                p[j * d + i] *= f
        a = 0.05
        ar = abs(r)
        self.scale[slot] = (1 - a) * s + a * (ar if s <= 0.0 or ar < 10 * s else 10 * s)
        self.spread2[slot] = (1 - a) * self.spread2[slot] + a * rc * rc
        e = self.err[slot]
        e[0] += 1.0
        e[1] += abs(error)
        e[2] += error
        self._mirror(slot)


class LatencyModel:
    """Per-endpoint online TTFT and TPOT model (see the module docstring).

    - `predict(endpoint, uncached_tokens, now, requests=, tokens=, waiting=)`:
      a `Prediction` for one endpoint. O(1).
    - `predict_many(endpoints, uncached, now, requests, tokens, waiting)`:
      mean TTFT and TPOT and their spreads as arrays, vectorised. O(n).
    - `on_route(...)`: a request was routed to `endpoint`: returns its
      `LatencyNote` and pushes the endpoint's prefill backlog. O(1).
    - `on_complete(endpoint, note, ttft_s, tpot_s)`: learn from a completion.
      O(d^2).
    - `forget(endpoint)`: drop an endpoint's slot (it was removed).
    - `error()` / `error_by_endpoint()`: running prediction errors.

    Parameters: `prior` (cold start), `forgetting` (RLS factor in (0, 1];
    0.99 weighs the last ~100 completions of an endpoint), `clip` (residual
    clip in running mean absolute residuals), `compiled` (the vectorised TTFT
    in one numba call, `_ttft_kernel`, or in numpy, `_ttft_numpy`: the same
    floats bit for bit, tests/test_latency.py; default: numba when installed).
    """

    def __init__(
        self,
        prior: LatencyPrior | None = None,
        *,
        forgetting: float = 0.99,
        clip: float = 4.0,
        compiled: bool | None = None,
    ) -> None:
        if not (0.5 <= forgetting <= 1.0):
            raise ValueError(f"forgetting must be in [0.5, 1], got {forgetting!r}")
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip must be > 0, got {clip!r}")
        self.prior = prior if prior is not None else LatencyPrior()
        if compiled and not jit.AVAILABLE:
            raise ValueError("compiled=True needs numba (the `fast` extra), which is not installed")
        self.compiled = jit.AVAILABLE if compiled is None else bool(compiled)
        self.forgetting = forgetting
        self.clip = clip
        self._slots: dict[EndpointId, int] = {}
        self._free: list[int] = []
        self._ttft = _Rls(_TTFT_D, self.prior.ttft_weights())
        self._tpot = _Rls(_TPOT_D, self.prior.tpot_weights())
        self._busy = np.zeros(0)  # prefill busy-until horizon per slot
        self._push_rate = self.prior.prefill_s_per_token  # seconds per routed uncached token
        self._samples = np.zeros(0, dtype=np.int64)
        self._retired = LatencyError()  # errors of forgotten endpoints
        self.generation = 0  # bumped when a slot is taken or freed (callers' caches)

    # -- slots -------------------------------------------------------------------------

    def slot(self, endpoint: EndpointId) -> int:
        """`endpoint`'s slot, created on first sight (from calibrated peers or the prior)."""
        s = self._slots.get(endpoint)
        if s is not None:
            return s
        if self._free:
            s = self._free.pop()
        else:
            s = len(self._slots)
            n = max(8, 2 * s) if s >= len(self._busy) else len(self._busy)
            self._ttft.grow(n)
            self._tpot.grow(n)
            if n > len(self._busy):
                self._busy = np.concatenate([self._busy, np.zeros(n - len(self._busy))])
                self._samples = np.concatenate(
                    [self._samples, np.zeros(n - len(self._samples), dtype=np.int64)]
                )
        calibrated = [i for i in self._slots.values() if self._samples[i] >= CALIBRATED_SAMPLES]
        if calibrated:
            self._ttft.reset(s, self._ttft.mean(calibrated))
            self._tpot.reset(s, self._tpot.mean(calibrated))
        else:
            self._ttft.reset(s, self._ttft.prior)
            self._tpot.reset(s, self._tpot.prior)
        self._busy[s] = -math.inf
        self._samples[s] = 0
        self._slots[endpoint] = s
        self.generation += 1
        return s

    def slots(self, endpoints: Iterable[EndpointId]) -> npt.NDArray[np.intp]:
        """The slots of `endpoints`, in order, as an index array. O(n)."""
        return np.fromiter((self.slot(e) for e in endpoints), dtype=np.intp)

    def forget(self, endpoint: EndpointId) -> None:
        """Drop `endpoint`'s slot (its errors stay in `error()`). O(1)."""
        s = self._slots.pop(endpoint, None)
        if s is None:
            return
        self._retired = self._retired + self._slot_error(s)
        self._free.append(s)
        self.generation += 1

    def __len__(self) -> int:
        return len(self._slots)

    # -- prediction --------------------------------------------------------------------

    def predict_slots(
        self,
        slots: npt.NDArray[np.intp],
        blocks: _Floats,
        prompt_tokens: float,
        tokens_per_block: float,
        now: float,
        requests: _Floats,
        tokens: _Floats | None,
        waiting: _Floats,
        *,
        tpot: bool = True,
        spread: bool = True,
    ) -> tuple[_Floats, _Floats | None, _Floats | None, _Floats | None]:
        """Mean TTFT, mean TPOT and their spreads at `slots`, vectorised. O(n).

        `blocks` holds the prefix blocks each candidate is predicted to hold
        (an empty array: none), of `tokens_per_block` tokens each, for a
        prompt of `prompt_tokens`. `tpot` / `spread` False skip what the
        caller does not need (None in their place; `tokens` may then be None).
        """
        a = self._ttft
        a.sync()
        ttft = np.empty(len(slots))
        args = (slots, a.clamped, self._busy, blocks, float(prompt_tokens), float(tokens_per_block))
        if self.compiled:
            _ttft_kernel(*args, requests, waiting, now, ttft)
        else:
            _ttft_numpy(*args, requests, waiting, now, ttft)
        tpot_out = ttft_sd = tpot_sd = None
        if tpot:
            b = self._tpot
            b.sync()
            v = np.take(b.clamped, slots, axis=1)
            assert tokens is not None
            tpot_out = v[0] + v[1] * (requests / 10.0) + v[2] * (tokens / 1e4)
            if spread:
                tpot_sd = b.spread[slots]
        if spread:
            ttft_sd = a.spread[slots]
        return ttft, tpot_out, ttft_sd, tpot_sd

    def predict(
        self,
        endpoint: EndpointId,
        uncached_tokens: float,
        now: float,
        *,
        requests: float = 0,
        tokens: float = 0,
        waiting: float = 0,
    ) -> Prediction:
        """The prediction for one request of `uncached_tokens` at `endpoint`. O(1)."""
        return self._note(
            self.slot(endpoint), uncached_tokens, now, requests, tokens, waiting
        ).prediction

    def _note(
        self, s: int, uncached: float, now: float, requests: float, tokens: float, waiting: float
    ) -> LatencyNote:
        backlog = float(self._busy[s]) - now
        x = (
            1.0,
            uncached / 1000.0,
            backlog if backlog > 0.0 else 0.0,
            requests / 10.0,
            waiting / 10.0,
        )
        y = (1.0, requests / 10.0, tokens / 1e4)
        a, b = self._ttft, self._tpot
        wa, wb = a.wc[s], b.wc[s]
        return LatencyNote(
            wa[0] + wa[1] * x[1] + wa[2] * x[2] + wa[3] * x[3] + wa[4] * x[4],
            wb[0] + wb[1] * y[1] + wb[2] * y[2],
            math.sqrt(a.spread2[s]),
            math.sqrt(b.spread2[s]),
            x,
            y,
        )

    # -- learning ----------------------------------------------------------------------

    def on_route(
        self,
        endpoint: EndpointId,
        uncached_tokens: float,
        now: float,
        *,
        requests: float = 0,
        tokens: float = 0,
        waiting: float = 0,
    ) -> LatencyNote:
        """A request was routed to `endpoint`: note its features, push the prefill backlog. O(1).

        `requests`, `tokens` and `waiting` are the endpoint's load before this
        request (as the scorer saw it).
        """
        s = self._slots.get(endpoint)
        if s is None:
            s = self.slot(endpoint)
        note = self._note(s, uncached_tokens, now, requests, tokens, waiting)
        self._push(s, uncached_tokens, now)
        return note

    def push_backlog(self, endpoint: EndpointId, uncached_tokens: float, now: float) -> None:
        """Add a request's predicted prefill time to `endpoint`'s backlog. O(1)."""
        self._push(self.slot(endpoint), uncached_tokens, now)

    def _push(self, s: int, uncached_tokens: float, now: float) -> None:
        # At the prior's rate, not the learned one: a learned rate that overshoots (the
        # prompt-length weight is not identifiable when every prompt is alike) would push
        # the horizon faster than time drains it, without bound; the backlog weight (w2)
        # learns how the prior's rate compares with the engine's instead.
        busy = float(self._busy[s])
        start = busy if busy > now else now
        self._busy[s] = start + self._push_rate * uncached_tokens

    def on_complete(
        self,
        endpoint: EndpointId,
        note: LatencyNote,
        *,
        ttft_s: float | None,
        tpot_s: float | None,
    ) -> None:
        """Learn from one completion measured at `endpoint`. O(d^2).

        None, negative or non-finite measurements are skipped; an endpoint
        forgotten since the decision learns nothing.
        """
        s = self._slots.get(endpoint)
        if s is None:
            return
        learned = False
        if ttft_s is not None and math.isfinite(ttft_s) and ttft_s >= 0:
            self._ttft.update(s, note.ttft_x, ttft_s, self.forgetting, self.clip, note.ttft_s)
            learned = True
        if tpot_s is not None and math.isfinite(tpot_s) and tpot_s >= 0:
            self._tpot.update(s, note.tpot_x, tpot_s, self.forgetting, self.clip, note.tpot_s)
        if learned:
            self._samples[s] += 1

    # -- errors ------------------------------------------------------------------------

    def _slot_error(self, s: int) -> LatencyError:
        a, b = self._ttft.err[s], self._tpot.err[s]
        return LatencyError(
            int(a[0]), float(a[1]), float(a[2]), int(b[0]), float(b[1]), float(b[2])
        )

    def error(self) -> LatencyError:
        """Errors summed over every endpoint, forgotten ones included. O(endpoints)."""
        total = self._retired
        for s in self._slots.values():
            total = total + self._slot_error(s)
        return total

    def error_by_endpoint(self) -> dict[EndpointId, LatencyError]:
        """Errors of each endpoint the model holds. O(endpoints)."""
        return {eid: self._slot_error(s) for eid, s in self._slots.items()}

    def samples(self, endpoint: EndpointId) -> int:
        """Completions `endpoint`'s TTFT model learned from (0 if unknown). O(1)."""
        s = self._slots.get(endpoint)
        return 0 if s is None else int(self._samples[s])

    def weights(self, endpoint: EndpointId) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """`endpoint`'s clamped TTFT and TPOT weights (for explanations and tests)."""
        s = self.slot(endpoint)
        return tuple(self._ttft.wc[s]), tuple(self._tpot.wc[s])
