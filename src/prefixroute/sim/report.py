"""Summaries of simulation runs: the figures, the comparison table, JSON and plots.

`summarize` reduces one run to the figures a user compares policies by:
the engines' prefix-cache hit rate (cached prompt tokens over prompt tokens,
as vLLM counts them), TTFT / inter-token / end-to-end latency percentiles,
throughput, failures, and tenant fairness.

Tenant figures: tenants are ranked by how many requests they sent; the
tail is the less active half (the `floor(n / 2)` tenants with the fewest
requests, ties broken by name), the head the rest. A group's hit rate is
its cached tokens over its prompt tokens. `jain_hit_rate` is Jain's
fairness index of the per-tenant hit rates, (sum x)^2 / (n sum x^2) (Jain,
Chiu and Hawe, DEC-TR-301, 1984): 1 when every tenant hits equally, 1/n
when one tenant gets all hits.

`prediction_bias` and `prediction_mae` come from the router's own
`TenantLedger`: (predicted - actual cached tokens) / prompt tokens, signed
and absolute, i.e. how well the router's index foresaw the engines' hits.
With several router replicas they are over every replica's ledger (the
ledgers' totals summed).

`routers` records the run's router replicas (`prefixroute.sim.replicas`):
their count, balancer, sharing and delay, and how many requests the
balancer sent each (`requests`). Reports name a run by its policy, and by
`run_label` (e.g. `prefixroute x4 decisions`) when it has several replicas.

`prediction` compares, per served request, the cached tokens the router
predicted at its decision (`Decision.predicted_cached_tokens`) with those
the engine reported: the totals, `over_prediction` ((predicted - actual) /
actual, the issue's "over-predicts by 24%"), the share of requests
predicted exactly, over and under, and the tokens over- and
under-predicted. `kv_events` counts the event batches published, lost,
replayed, the gaps and clears the receiver saw, and the engine restarts
with the requests they moved (`retried`) or failed (`simulation` module).

`starved` counts tenants none of whose requests was served (they are
absent from both Jain indexes, which only rate tenants that got service).

`jain_ttft` is Jain's index of per-tenant TTFT slowdown (a tenant's mean
TTFT over the mean of all tenants' means): 1 when every tenant waits
alike. `per_tenant` lists the most active tenants, `tail` aggregates the
tail tenants' requests.

`slo` judges every request that carries latency objectives (the
scenario's `objectives`, `prefixroute.sim.objectives`) on its own
objectives and its measured TTFT and time per output token ((E2E - TTFT) /
(output tokens - 1); a one-token answer is judged on TTFT alone): `requests`
with objectives, `met` (served within all of them; rejected, failed and
timed-out requests miss), `attainment` (met / requests) and `goodput_rps`
(met requests per second over the same span as `throughput_rps`: from 0
to the last completion). The tail and each listed tenant have their own
`slo` (without goodput), and `tenants.head_attainment` /
`tail_attainment` sit beside the head and tail hit rates.

`latency_model` is the routers' latency models' own prediction error
(`prefixroute.latency.LatencyModel.error`, summed over the replicas): the
TTFT and TPOT `samples`, mean absolute error and bias (prediction minus
measurement, seconds), from the means the models predicted at each
decision for the chosen endpoint.

Percentiles are numpy's linear interpolation over the served requests;
inter-token latency is weighted per token (each decode step's duration
counts once for every sequence it advanced).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from prefixroute.latency import LatencyError
from prefixroute.sim.objectives import met as objectives_met
from prefixroute.sim.objectives import tpot as measured_tpot
from prefixroute.sim.replicas import DEFAULT_CARRY, Routers
from prefixroute.sim.simulation import Outcomes, Simulation

__all__ = [
    "TOP_TENANTS",
    "format_fairness",
    "format_table",
    "format_tenants",
    "plot_runs",
    "run_label",
    "summarize",
]

TOP_TENANTS = 10  # tenants listed one by one in reports (the rest are in the tail figures)


def _dist(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(values.mean())}


def _weighted_dist(values: np.ndarray, weights: np.ndarray) -> dict[str, float | None]:
    if values.size == 0 or weights.sum() == 0:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    cum = np.cumsum(w)
    total = cum[-1]

    def q(p: float) -> float:
        return float(v[min(len(v) - 1, int(np.searchsorted(cum, p * total)))])

    return {"p50": q(0.5), "p95": q(0.95), "p99": q(0.99), "mean": float((v * w).sum() / total)}


def jain(values: Sequence[float]) -> float | None:
    """Jain's fairness index of `values` (None for no values; 1.0 when all are zero)."""
    if not values:
        return None
    s = sum(values)
    sq = sum(x * x for x in values)
    return 1.0 if sq == 0 else s * s / (len(values) * sq)


def _slo_columns(out: Outcomes) -> tuple[np.ndarray, np.ndarray]:
    """Per request: whether it has any objective, and whether it met them all."""
    ok = np.asarray(out.status) == 200
    ttft = np.asarray(out.ttft_s, dtype=np.float64)
    slo_ttft = np.asarray(out.slo_ttft_s, dtype=np.float64)
    slo_tpot = np.asarray(out.slo_tpot_s, dtype=np.float64)
    tpot = measured_tpot(
        ttft, np.asarray(out.e2e_s, dtype=np.float64), np.asarray(out.output_tokens, np.int64)
    )
    has = ~np.isnan(slo_ttft) | ~np.isnan(slo_tpot)
    return has, objectives_met(ok, ttft, tpot, slo_ttft, slo_tpot)


def _attainment(idx: np.ndarray, has: np.ndarray, met: np.ndarray) -> dict[str, Any]:
    n = int(has[idx].sum())
    m = int(met[idx].sum())
    return {"requests": n, "met": m, "attainment": m / n if n else None}


def _group(
    rows: Sequence[int],
    out: Any,
    ok: np.ndarray,
    ttft: np.ndarray,
    e2e: np.ndarray,
    slo: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """Figures of the requests at `rows` (indexes into the outcome columns)."""
    idx = np.asarray(rows, dtype=np.int64)
    served = idx[ok[idx]]
    prompt = int(np.asarray(out.prompt_tokens)[served].sum()) if served.size else 0
    cached = int(np.asarray(out.cached_tokens)[served].sum()) if served.size else 0
    status = np.asarray(out.status)[idx]
    t = ttft[served]
    return {
        "requests": int(idx.size),
        "completed": int(served.size),
        "rejected_429": int((status == 429).sum()),
        "failed_other": int(((status != 200) & (status != 429)).sum()),
        "hit_rate": cached / prompt if prompt else None,
        "ttft_s": _dist(t),
        "e2e_s": _dist(e2e[served]),
        "slo": _attainment(idx, *slo),
    }


def _tenants(sim: Simulation, top_k: int = TOP_TENANTS) -> dict[str, Any]:
    out = sim.outcomes
    status = np.asarray(out.status)
    ok = status == 200
    ttft = np.asarray(out.ttft_s)
    e2e = np.asarray(out.e2e_s)
    slo = _slo_columns(out)
    rows: dict[str, list[int]] = {}
    for i, tenant in enumerate(out.tenant):
        rows.setdefault(tenant, []).append(i)
    ranked = sorted(rows, key=lambda t: (len(rows[t]), t))
    tail = ranked[: len(ranked) // 2]
    head = ranked[len(ranked) // 2 :]
    prompt = np.asarray(out.prompt_tokens)
    cached = np.asarray(out.cached_tokens)

    def rate(group: Sequence[str]) -> float | None:
        idx = [i for t in group for i in rows[t] if ok[i]]
        p = int(prompt[idx].sum()) if idx else 0
        return int(cached[idx].sum()) / p if p else None

    rates = []
    mean_ttft = []
    for t in ranked:
        idx = [i for i in rows[t] if ok[i]]
        p = int(prompt[idx].sum()) if idx else 0
        if p:
            rates.append(int(cached[idx].sum()) / p)
        if idx:
            mean_ttft.append(float(ttft[idx].mean()))
    tail_rows = [i for t in tail for i in rows[t]]
    head_rows = [i for t in head for i in rows[t]]
    starved = sum(1 for t in ranked if not any(ok[i] for i in rows[t]))

    def attained(group_rows: list[int]) -> float | None:
        idx = np.asarray(group_rows, dtype=np.int64)
        return _attainment(idx, *slo)["attainment"] if idx.size else None

    return {
        "count": len(ranked),
        "starved": starved,
        "head_hit_rate": rate(head),
        "tail_hit_rate": rate(tail),
        "head_attainment": attained(head_rows),
        "tail_attainment": attained(tail_rows),
        "jain_hit_rate": jain(rates),
        "jain_ttft": jain(mean_ttft),  # Jain's index is scale-free: means = slowdowns
        "tail": _group(tail_rows, out, ok, ttft, e2e, slo) if tail_rows else None,
        "per_tenant": [
            {"tenant": t, **_group(rows[t], out, ok, ttft, e2e, slo)}
            for t in sorted(rows, key=lambda t: (-len(rows[t]), t))[:top_k]
        ],
    }


def _ledger(sim: Simulation) -> dict[str, Any]:
    """What the routers' own tenant ledgers say (the figures an exporter would read)."""
    if len(sim.replicas) == 1:
        fairness = sim.router.ledger.snapshot().fairness
        return {
            "prediction_bias": fairness.prediction_bias,
            "prediction_mae": fairness.prediction_mae,
        }
    totals = [r.ledger.snapshot().total for r in sim.replicas]
    den = sum(t.completed_prompt_tokens for t in totals)
    predicted = sum(t.completed_predicted_cached_tokens for t in totals)
    cached = sum(t.cached_tokens for t in totals)
    error = sum(t.prediction_abs_error_tokens for t in totals)
    return {
        "prediction_bias": (predicted - cached) / den if den else None,
        "prediction_mae": error / den if den else None,
    }


def _routers(sim: Simulation) -> dict[str, Any]:
    """The run's router replicas and the requests the balancer sent each."""
    return {**sim.routing.as_dict(), "requests": list(sim.replica_requests)}


def run_label(result: dict[str, Any]) -> str:
    """A run's name in reports: its policy, plus its replicas when it has several."""
    routers = result.get("routers")
    if not routers or routers["replicas"] == 1:
        return str(result["policy"])
    label = Routers(
        replicas=routers["replicas"],
        balance=routers["balance"],
        sharing=routers["sharing"],
        delay_s=routers["delay_s"],
        carry=routers.get("carry", DEFAULT_CARRY),
    ).label
    return f"{result['policy']} {label}"


def _prediction(sim: Simulation) -> dict[str, Any]:
    """Predicted vs actual cached tokens over the served requests."""
    out = sim.outcomes
    ok = np.asarray(out.status) == 200
    predicted = np.asarray(out.predicted_tokens, dtype=np.int64)[ok]
    actual = np.asarray(out.cached_tokens, dtype=np.int64)[ok]
    n = int(ok.sum())
    p, a = int(predicted.sum()), int(actual.sum())
    diff = predicted - actual
    return {
        "predicted_tokens": p,
        "actual_tokens": a,
        "over_prediction": (p - a) / a if a else None,
        "exact": float((diff == 0).mean()) if n else None,
        "over": float((diff > 0).mean()) if n else None,
        "under": float((diff < 0).mean()) if n else None,
        "over_tokens": int(diff[diff > 0].sum()),
        "under_tokens": int(-diff[diff < 0].sum()),
    }


def _slo(sim: Simulation, makespan: float) -> dict[str, Any]:
    """Attainment of the requests' own latency objectives, and goodput (module docstring)."""
    has, met = _slo_columns(sim.outcomes)
    figures = _attainment(np.arange(has.size), has, met)
    return {**figures, "goodput_rps": figures["met"] / makespan if makespan else 0.0}


def _latency_model(sim: Simulation) -> dict[str, Any]:
    """The routers' latency models' prediction errors, summed over the replicas."""
    total = LatencyError()
    for router in sim.replicas:
        total = total + router.latency.error()
    return {
        "samples": total.ttft_samples,
        "ttft_mae_s": total.ttft_mae_s,
        "ttft_bias_s": total.ttft_bias_s,
        "tpot_samples": total.tpot_samples,
        "tpot_mae_s": total.tpot_mae_s,
        "tpot_bias_s": total.tpot_bias_s,
    }


def _events(sim: Simulation) -> dict[str, Any]:
    """The run's KV-event link and what happened on it, and its restarts."""
    st = sim.event_stats
    return {
        "enabled": sim.kv_events,
        "precise": sim.precise,
        "delay_s": sim.link.delay_s,
        "loss": sim.link.loss,
        "replay": sim.link.replay,
        "batches": st.batches,
        "lost": st.lost,
        "gaps": st.gaps,
        "replayed": st.replayed,
        "cleared": st.cleared,
        "restarts": st.restarts,
        "retried": st.retried,
        "failed": st.failed,
    }


def summarize(sim: Simulation, *, scenario: str, policy: str, wall_s: float) -> dict[str, Any]:
    """The figures of one finished run (the `--json` record)."""
    out = sim.outcomes
    status = np.asarray(out.status)
    ok = status == 200
    ttft = np.asarray(out.ttft_s)[ok]
    e2e = np.asarray(out.e2e_s)[ok]
    finished = np.asarray(out.finished_s)[ok]
    makespan = float(finished.max()) if finished.size else 0.0
    engines = sim.all_engines  # restarted engines' counters count too
    queries = sum(e.stats.prefix_queries for e in engines)
    hits = sum(e.stats.prefix_hits for e in engines)
    itl_v = np.concatenate([np.asarray(e.itl_steps) for e in engines]) if engines else np.empty(0)
    itl_w = np.concatenate([np.asarray(e.itl_tokens) for e in engines]) if engines else np.empty(0)
    outputs = int(np.asarray(out.output_tokens)[ok].sum())
    predicted = int(np.asarray(out.predicted_tokens)[ok].sum())
    cached_ok = int(np.asarray(out.cached_tokens)[ok].sum())
    split = Counter(e for e, s in zip(out.endpoint, out.status, strict=True) if s == 200)
    failures = Counter(int(s) for s in status[~ok])
    return {
        "scenario": scenario,
        "policy": policy,
        "requests": int(status.size),
        "completed": int(ok.sum()),
        "failed": int((~ok).sum()),
        "failures_by_status": {str(k): v for k, v in sorted(failures.items())},
        "hit_rate": hits / queries if queries else 0.0,
        "predicted_hit_accuracy": predicted / cached_ok if cached_ok else None,
        "prediction": _prediction(sim),
        "kv_events": _events(sim),
        "ttft_s": _dist(ttft),
        "itl_s": _weighted_dist(itl_v, itl_w),
        "e2e_s": _dist(e2e),
        "throughput_rps": float(ok.sum()) / makespan if makespan else 0.0,
        "output_tokens_per_s": outputs / makespan if makespan else 0.0,
        "slo": _slo(sim, makespan),
        "latency_model": _latency_model(sim),
        "tenants": {**_tenants(sim), **_ledger(sim)},
        "routers": _routers(sim),
        "endpoint_requests": [split.get(i, 0) for i in range(len(sim.engines))],
        "preemptions": sum(e.stats.preemptions for e in engines),
        "events": sim.events,
        "events_per_s": sim.events / wall_s if wall_s > 0 else None,
        "wall_s": wall_s,
    }


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table, one row per run (times in milliseconds).

    When any run's requests carry latency objectives, two more columns:
    their attainment (`slo met`) and goodput (`good/s`, met requests per second).
    """
    w = max([20, *(len(run_label(r)) for r in results)])
    slo = any((r.get("slo") or {}).get("requests") for r in results)
    head = (
        f"{'policy':<{w}} {'hit':>6} {'ttft p50':>8} {'p95':>7} {'p99':>7} {'itl p50':>7} "
        f"{'e2e p50':>8} {'p99':>7} {'req/s':>7} {'failed':>6} {'tail hit':>8} {'jain':>5}"
    )
    if slo:
        head += f" {'slo met':>7} {'good/s':>7}"
    lines = [head, "-" * len(head)]
    for r in results:
        t = r["tenants"]
        jain_s = "-" if t["jain_hit_rate"] is None else f"{t['jain_hit_rate']:.2f}"
        line = (
            f"{run_label(r):<{w}} {_pct(r['hit_rate']):>6} {_ms(r['ttft_s']['p50']):>8} "
            f"{_ms(r['ttft_s']['p95']):>7} {_ms(r['ttft_s']['p99']):>7} "
            f"{_ms(r['itl_s']['p50']):>7} {_ms(r['e2e_s']['p50']):>8} "
            f"{_ms(r['e2e_s']['p99']):>7} {r['throughput_rps']:>7.1f} {r['failed']:>6} "
            f"{_pct(t['tail_hit_rate']):>8} {jain_s:>5}"
        )
        if slo:
            figures = r.get("slo") or {}
            line += f" {_pct(figures.get('attainment')):>7} {figures.get('goodput_rps', 0.0):>7.1f}"
        lines.append(line)
    return "\n".join(lines)


def format_tenants(result: dict[str, Any]) -> str:
    """The per-tenant table of one run: the most active tenants, then the tail aggregate."""
    t = result["tenants"]
    head = (
        f"{'tenant':<12} {'requests':>8} {'429':>5} {'failed':>6} {'hit':>6} "
        f"{'ttft p50':>8} {'p99':>8} {'e2e p99':>8}"
    )
    lines = [head, "-" * len(head)]
    rows = list(t["per_tenant"])
    if t["tail"] is not None:
        rows.append({"tenant": f"tail ({t['count'] // 2})", **t["tail"]})
    for r in rows:
        lines.append(
            f"{r['tenant']:<12} {r['requests']:>8} {r['rejected_429']:>5} {r['failed_other']:>6} "
            f"{_pct(r['hit_rate']):>6} {_ms(r['ttft_s']['p50']):>8} {_ms(r['ttft_s']['p99']):>8} "
            f"{_ms(r['e2e_s']['p99']):>8}"
        )
    jh, jt = t["jain_hit_rate"], t["jain_ttft"]
    lines.append(
        f"Jain's index: hit rate {'-' if jh is None else f'{jh:.2f}'}, "
        f"TTFT slowdown {'-' if jt is None else f'{jt:.2f}'}"
    )
    return "\n".join(lines)


def format_fairness(results: Sequence[dict[str, Any]]) -> str:
    """Tenant fairness per run: head vs tail, Jain's indexes, the tail's latency, rejections."""
    w = max([20, *(len(run_label(r)) for r in results)])
    slo = any((r.get("slo") or {}).get("requests") for r in results)
    head = (
        f"{'policy':<{w}} {'head hit':>8} {'tail hit':>8} {'jain hit':>8} {'jain ttft':>9} "
        f"{'tail ttft p50':>13} {'p99':>7} {'429s':>6}"
    )
    if slo:
        head += f" {'head slo':>8} {'tail slo':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        t = r["tenants"]
        tail = t["tail"] or {"ttft_s": {"p50": None, "p99": None}}
        rejected = r["failures_by_status"].get("429", 0)

        def j(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f}"

        line = (
            f"{run_label(r):<{w}} {_pct(t['head_hit_rate']):>8} {_pct(t['tail_hit_rate']):>8} "
            f"{j(t['jain_hit_rate']):>8} {j(t['jain_ttft']):>9} "
            f"{_ms(tail['ttft_s']['p50']):>13} {_ms(tail['ttft_s']['p99']):>7} {rejected:>6}"
        )
        if slo:
            line += f" {_pct(t.get('head_attainment')):>8} {_pct(t.get('tail_attainment')):>8}"
        lines.append(line)
    return "\n".join(lines)


def plot_runs(runs: Sequence[tuple[str, Simulation]], path: str) -> None:
    """TTFT CDF per policy, hit rate over time, and per-endpoint load, into one PNG.

    Needs matplotlib (the `plot` extra); ImportError names the extra otherwise.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - exercised without the extra
        raise ImportError("plots need matplotlib: pip install 'prefixroute[plot]'") from exc
    fig, (ax_cdf, ax_hit, ax_load) = plt.subplots(1, 3, figsize=(17, 4.8))
    for name, sim in runs:
        out = sim.outcomes
        ok = np.asarray(out.status) == 200
        ttft = np.sort(np.asarray(out.ttft_s)[ok]) * 1e3
        if ttft.size:
            ax_cdf.plot(ttft, np.arange(1, ttft.size + 1) / ttft.size, label=name)
        done = np.asarray(out.finished_s)[ok]
        if done.size:
            edges = np.linspace(0.0, float(done.max()), 61)
            which = np.clip(np.searchsorted(edges, done, side="right") - 1, 0, 59)
            p = np.bincount(which, np.asarray(out.prompt_tokens)[ok], minlength=60)
            c = np.bincount(which, np.asarray(out.cached_tokens)[ok], minlength=60)
            with np.errstate(invalid="ignore", divide="ignore"):
                ax_hit.plot(edges[1:], np.where(p > 0, c / np.maximum(p, 1), np.nan), label=name)
    ax_cdf.set(xscale="log", xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT CDF")
    ax_hit.set(xlabel="time (s)", ylabel="hit rate", title="prefix-cache hit rate over time")
    ax_hit.set_ylim(0, 1)
    if len(runs) == 1:
        sim = runs[0][1]
        for i, series in enumerate(sim.load):
            ax_load.plot(sim.load_t[: len(series)], series, label=f"e{i}", lw=0.8)
        ax_load.set(xlabel="time (s)", ylabel="running + waiting", title="per-endpoint load")
    else:
        width = 0.8 / len(runs)
        for k, (name, sim) in enumerate(runs):
            out = sim.outcomes
            n = len(sim.engines)
            counts = np.bincount(
                [e for e, s in zip(out.endpoint, out.status, strict=True) if s == 200],
                minlength=n,
            )
            share = counts / max(1, counts.sum())
            ax_load.bar(np.arange(n) + k * width, share, width, label=name)
        ax_load.set(xlabel="endpoint", ylabel="share of requests", title="per-endpoint load")
    for ax in (ax_cdf, ax_hit, ax_load):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
