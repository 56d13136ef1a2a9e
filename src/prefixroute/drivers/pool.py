"""The endpoints a gateway routes over, and what it last scraped from each.

`EndpointPool` holds the configured endpoints (a static list and/or YAML
files reloaded when their modification time changes) and keeps, per endpoint,
the load its engine last reported and whether it is healthy. `states()` turns
that into the `EndpointState` snapshots `Router.route` takes, once per change:
the list is cached, so the per-request call is O(1) while nothing changed.

Scraping. Every `interval_s` (default 50 ms, the Gateway API Inference
Extension's `--refresh-metrics-interval`, GIE `pkg/epp/server/runserver.go`
`DefaultRefreshMetricsInterval`) each endpoint's Prometheus `/metrics` is
fetched (one request in flight per endpoint: a slow engine delays only its
own scrape) and parsed with `prometheus_client`'s text parser. Read:

- `vllm:num_requests_waiting`, `vllm:num_requests_running` (summed over the
  samples, e.g. several `engine` label values of one data-parallel server);
- `vllm:kv_cache_usage_perc` (vLLM v1), else the older
  `vllm:gpu_cache_usage_perc` (both fractions in [0, 1]; averaged over samples);
- `vllm:cache_config_info` labels `num_gpu_blocks` (summed over distinct
  `engine` values) -> `kv_capacity_blocks`, and `block_size`;
- SGLang's `sglang:num_queue_reqs`, `sglang:num_running_reqs`,
  `sglang:token_usage` when vLLM's are absent.

Only lines of these families reach the parser (GIE's data layer filters
families the same way before parsing), so a large `/metrics` page costs a
line scan. `observed_at` is the gateway's monotonic time of the last good
scrape. A failed scrape changes nothing: the endpoint keeps its last values
and their old `observed_at`, and the router's `stale-metrics-filter` decides
what stale means (GIE's default metrics staleness threshold is 2 s,
`DefaultMetricsStalenessThreshold`; `stale_after_s` here is for exporters).

Health. Every `health_interval_s`, `GET health_path`; `unhealthy_after`
consecutive failures (connection error, timeout, non-2xx; redirects are not
followed, so a 3xx fails too) mark the endpoint
unhealthy, one success marks it healthy again. Passive: `mark_failed` (the
gateway's connection failures) marks it unhealthy at once, until the next
good health check. A new endpoint starts healthy.

Context length. After each good health check (so at start-up and every
`health_interval_s`, and at once when a restarted engine answers again),
`GET /v1/models`: the largest `data[].max_model_len` (vLLM's `ModelCard`
field, `vllm/entrypoints/openai/protocol.py`) becomes the endpoint's
`max_model_len`. An answer without the field (an engine that does not say)
clears it; a failed request keeps the last value. The drivers refuse prompts
longer than every endpoint of the model takes (`prefixroute.drivers.context`).

Models. Which model names the pool serves (`served_models`, `serves`) is
what each endpoint's config says (`models`), else what its engine lists at
`/v1/models` (the `id` of each entry: vLLM lists its served model names and
loaded LoRA adapters), read with `max_model_len` above; an endpoint with
neither (no `models` configured, no listing read yet, an engine without the
route) may serve any name. The drivers answer 404 `model_not_found` for a
name no endpoint serves (only when every endpoint's names are known), and
only served names take a metrics label. The same names are the endpoint's
`EndpointState.models`, so the router's `model-filter` never sends a model
to an engine that does not list it (an adapter loaded at run time is served
once the next listing shows it). A failed request keeps the last listing;
an answer that is not a listing clears it.

For tests and other drivers the timers are optional: `scrape_once()`,
`check_health_once()` and `reload_if_changed()` do one round each.

HTTP is aiohttp's client (one `ClientSession`, made on the pool's event loop
unless one is passed in), as for the gateway's upstream hop: per request it
costs about a third of the CPU httpx's client does, and at the default 20
scrapes a second per endpoint that adds up on the gateway's one event loop.
`timeout_s` bounds each scrape or check as a whole (connecting, waiting and
reading the body).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import yaml
from prometheus_client.parser import text_string_to_metric_families

from prefixroute.config import ConfigError
from prefixroute.drivers.kvevents import KVEventSource
from prefixroute.drivers.sections import build_section, positive_number
from prefixroute.endpoint import MAX_COUNT, EndpointId, EndpointState

__all__ = [
    "EndpointPool",
    "EndpointSpec",
    "EngineMetrics",
    "ScrapeConfig",
    "load_endpoint_file",
    "parse_max_model_len",
    "parse_metrics",
    "parse_model_names",
    "read_endpoints",
]

log = logging.getLogger(__name__)

_WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
_RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
_CACHE_INFO = "vllm:cache_config_info"
MODELS_PATH = "/v1/models"
"""Where an OpenAI-compatible engine lists its models (with vLLM, their `max_model_len`)."""
_WANTED = frozenset((*_WAITING, *_RUNNING, *_KV_USAGE, _CACHE_INFO))

_SCRAPE_KEYS = {
    "interval_s": "float",
    "timeout_s": "float",
    "stale_after_s": "float",
    "metrics_path": "str",
    "health_path": "str",
    "health_interval_s": "float",
    "unhealthy_after": "int",
}


# -- values -----------------------------------------------------------------------


def _url_path(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if not value.startswith("/"):
        raise ValueError(f"{attr.name} must start with '/', got {value!r}")


@attrs.frozen
class ScrapeConfig:
    """How often and how patiently endpoints are scraped and health-checked.

    Defaults: `interval_s` 0.05 (GIE's refresh-metrics interval), `timeout_s`
    1.0 per scrape or check (in total), `stale_after_s` 2.0 (GIE's staleness threshold;
    read by exporters, the router's filter has its own `max_age_s`),
    `metrics_path` "/metrics", `health_path` "/health", `health_interval_s`
    1.0, `unhealthy_after` 3 consecutive failures.
    """

    interval_s: float = attrs.field(default=0.05, validator=positive_number)
    timeout_s: float = attrs.field(default=1.0, validator=positive_number)
    stale_after_s: float = attrs.field(default=2.0, validator=positive_number)
    metrics_path: str = attrs.field(default="/metrics", validator=_url_path)
    health_path: str = attrs.field(default="/health", validator=_url_path)
    health_interval_s: float = attrs.field(default=1.0, validator=positive_number)
    unhealthy_after: int = attrs.field(default=3, validator=attrs.validators.ge(1))

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> ScrapeConfig:
        """Read the config document's `scrape` section; ConfigError naming the field."""
        config: ScrapeConfig = build_section(doc, "scrape", _SCRAPE_KEYS, cls)
        return config


@attrs.frozen
class EndpointSpec:
    """One configured endpoint: its id (default: the address), `host:port`, models served.

    An empty `models` means any model (the router's `model-filter` lets it
    serve every request). `kv_events`: where its engine publishes KV-cache
    events (`prefixroute.drivers.kvevents.KVEventSource`; None: no events,
    the endpoint stays approximate).
    """

    address: str
    id: EndpointId = attrs.field(
        default=attrs.Factory(lambda self: EndpointId(self.address), takes_self=True)
    )
    models: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    kv_events: KVEventSource | None = None

    def __attrs_post_init__(self) -> None:
        EndpointState(id=self.id, address=self.address)  # the core's address and id checks

    @classmethod
    def from_document(cls, doc: object, path: str) -> EndpointSpec:
        """Read `{address, id?, models?, kv_events?}`; ConfigError naming the field."""
        if not isinstance(doc, Mapping):
            raise ConfigError(path, "must be a mapping {address, id?, models?} or {file}")
        for key in doc:
            if key not in ("address", "id", "models", "kv_events"):
                raise ConfigError(
                    f"{path}.{key}", "unknown key (allowed: address, id, models, kv_events)"
                )
        address = doc.get("address")
        if not isinstance(address, str) or not address:
            raise ConfigError(f"{path}.address", "must be host:port")
        eid = doc.get("id", address)
        if not isinstance(eid, str) or not eid:
            raise ConfigError(f"{path}.id", "must be a non-empty string")
        models = doc.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise ConfigError(f"{path}.models", "must be a list of model names")
        kv_events = doc.get("kv_events")
        if kv_events is not None:
            kv_events = KVEventSource.from_document(kv_events, f"{path}.kv_events")
        try:
            return cls(
                address=address, id=EndpointId(eid), models=frozenset(models), kv_events=kv_events
            )
        except ValueError as exc:
            raise ConfigError(f"{path}.address", str(exc)) from exc


def read_endpoints(
    value: object, *, base_dir: str | os.PathLike[str] = "."
) -> tuple[tuple[EndpointSpec, ...], tuple[Path, ...]]:
    """The config's `endpoints` list: static specs, and endpoint files (relative to `base_dir`).

    Each file is read once here, so a missing or malformed file is a
    ConfigError at startup; later changes are the pool's to reload. Ids must
    be distinct across all of them.
    """
    if value is None:
        value = []
    if not isinstance(value, list):
        raise ConfigError("endpoints", "must be a list of {address, id?, models?} or {file}")
    specs: list[EndpointSpec] = []
    files: list[Path] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        path = f"endpoints[{i}]"
        if isinstance(item, Mapping) and "file" in item:
            if set(item) != {"file"}:
                raise ConfigError(path, "a file entry holds only `file`")
            if not isinstance(item["file"], str) or not item["file"]:
                raise ConfigError(f"{path}.file", "must be a path")
            file = Path(base_dir, item["file"])
            found = load_endpoint_file(file)
            files.append(file)
        else:
            found = [EndpointSpec.from_document(item, path)]
            specs.extend(found)
        for spec in found:
            if spec.id in seen:
                raise ConfigError(path, f"duplicate endpoint id {spec.id!r}")
            seen.add(spec.id)
    return tuple(specs), tuple(files)


def load_endpoint_file(path: str | os.PathLike[str]) -> list[EndpointSpec]:
    """The endpoints in a YAML file: a list of `{address, id?, models?}` or `{endpoints: [..]}`."""
    try:
        doc: object = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read endpoint file: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"not valid YAML: {exc}") from exc
    if doc is None:  # an empty file is more likely caught mid-write than meant
        raise ConfigError(str(path), "the endpoint file is empty (write [] for no endpoints)")
    if isinstance(doc, Mapping):
        if set(doc) - {"endpoints"}:
            raise ConfigError(str(path), "an endpoint file holds a list (or {endpoints: [...]})")
        doc = doc.get("endpoints") or []
    if not isinstance(doc, list):
        raise ConfigError(str(path), "an endpoint file holds a list of {address, id?, models?}")
    specs = [EndpointSpec.from_document(item, f"{path}[{i}]") for i, item in enumerate(doc)]
    if len({s.id for s in specs}) != len(specs):
        raise ConfigError(str(path), "duplicate endpoint ids")
    return specs


_MISSING = (-1, -1)  # the stamp of an endpoint file that could not be read (logged once)


@attrs.frozen
class EngineMetrics:
    """What one scrape of an engine's `/metrics` said (None: the engine did not say)."""

    waiting: int = 0
    running: int = 0
    kv_usage: float | None = None
    kv_capacity_blocks: int | None = None
    block_size: int | None = None


def parse_metrics(text: str) -> EngineMetrics:
    """Parse vLLM (or SGLang) Prometheus text into `EngineMetrics` (see the module docstring).

    O(lines) for the family filter plus the parser over the kept lines.
    ValueError on text the Prometheus parser refuses, or without any of the
    families read (not an engine we understand: better stale than zeros).
    """
    kept = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[2] in _WANTED:
                kept.append(line)
        elif line.split("{", 1)[0].split(" ", 1)[0] in _WANTED:
            kept.append(line)
    if not kept:
        raise ValueError("no vLLM or SGLang load metrics on the page")
    samples: dict[str, list[tuple[Mapping[str, str], float]]] = {}
    for family in text_string_to_metric_families("\n".join(kept) + "\n"):
        for s in family.samples:
            if s.name in _WANTED and math.isfinite(s.value):
                samples.setdefault(s.name, []).append((s.labels, float(s.value)))

    def first(names: Sequence[str]) -> list[float] | None:
        for name in names:
            if name in samples:
                return [v for _, v in samples[name]]
        return None

    waiting = first(_WAITING) or [0.0]
    running = first(_RUNNING) or [0.0]
    usage = first(_KV_USAGE)
    kv_usage = None if usage is None else min(1.0, max(0.0, sum(usage) / len(usage)))
    capacity: int | None = None
    block_size: int | None = None
    blocks_by_engine: dict[str, int] = {}
    for labels, _ in samples.get(_CACHE_INFO, []):
        with contextlib.suppress(KeyError, ValueError):
            blocks_by_engine[labels.get("engine", "")] = int(labels["num_gpu_blocks"])
        with contextlib.suppress(KeyError, ValueError):
            block_size = block_size or int(labels["block_size"])
    if blocks_by_engine and 0 < sum(blocks_by_engine.values()) <= MAX_COUNT:
        capacity = sum(blocks_by_engine.values())  # an absurd capacity is no capacity
    if block_size is not None and not 0 < block_size <= MAX_COUNT:
        block_size = None
    return EngineMetrics(
        waiting=_count(waiting),
        running=_count(running),
        kv_usage=kv_usage,
        kv_capacity_blocks=capacity,
        block_size=block_size,
    )


def _count(values: Sequence[float]) -> int:
    """A request count from summed samples, within what `EndpointState` accepts.

    An engine reporting nonsense (1e300 waiting requests) saturates the
    count rather than failing every routing decision.
    """
    total = sum(values)
    if not math.isfinite(total):
        return MAX_COUNT if total > 0 else 0
    return min(MAX_COUNT, max(0, round(total)))


def parse_max_model_len(doc: object) -> int | None:
    """The largest `max_model_len` in a `GET /v1/models` answer, None if no card has one.

    vLLM answers `{"object": "list", "data": [{"id", ..., "max_model_len"}]}`
    (one card for the model, one per LoRA adapter, each with the engine's
    limit). Anything else (not that shape, a value that is not a positive
    integer) counts as not saying. O(cards).
    """
    cards = doc.get("data") if isinstance(doc, Mapping) else None
    if not isinstance(cards, list):
        return None
    found = [
        card["max_model_len"]
        for card in cards
        if isinstance(card, Mapping)
        and isinstance(card.get("max_model_len"), int)
        and not isinstance(card.get("max_model_len"), bool)
        and 0 < card["max_model_len"] <= MAX_COUNT
    ]
    return max(found) if found else None


MAX_LISTED_MODELS = 1024
"""Most model names kept from one engine's listing (the rest are ignored)."""


def parse_model_names(doc: object) -> frozenset[str] | None:
    """The model names of a `GET /v1/models` answer (each `data[].id`); None if not a listing.

    At most `MAX_LISTED_MODELS` entries are read; entries without a string
    `id` are skipped. O(entries).
    """
    data = doc.get("data") if isinstance(doc, Mapping) else None
    if not isinstance(data, list):
        return None
    names = (e.get("id") for e in data[:MAX_LISTED_MODELS] if isinstance(e, Mapping))
    return frozenset(n for n in names if isinstance(n, str) and n)


# -- the pool ---------------------------------------------------------------------


class _Slot:
    """One endpoint's mutable state (internal)."""

    __slots__ = (
        "failures",
        "listed",
        "max_model_len",
        "observed_at",
        "passive",
        "scraped",
        "source",
        "spec",
    )

    def __init__(self, spec: EndpointSpec, source: Path | None) -> None:
        self.spec = spec
        self.source = source  # the file it came from; None for a static endpoint
        self.scraped = EngineMetrics()
        self.observed_at: float | None = None
        self.failures = 0  # consecutive failed health checks
        self.passive = False  # marked failed by the gateway since the last good check
        self.max_model_len: int | None = None  # from the engine's /v1/models
        self.listed: frozenset[str] | None = None  # its model names, from the same answer

    def healthy(self, unhealthy_after: int) -> bool:
        return not self.passive and self.failures < unhealthy_after

    def served(self) -> frozenset[str] | None:
        """The names this endpoint serves: configured, else listed; None: any name."""
        return self.spec.models or self.listed


class EndpointPool:
    """The endpoints, their scraped load and health; `states()` for the router.

    Single event loop: every method runs on the loop that called `start()`
    (or, without `start()`, the caller's). `on_removed(id)` is called for
    each endpoint that a reloaded file no longer lists (the gateway tells the
    router `EndpointRemoved`). Cost: `states()` O(1) while nothing changed,
    O(endpoints) to rebuild after a change; one scrape parses one page.
    """

    def __init__(
        self,
        endpoints: Iterable[EndpointSpec] = (),
        *,
        files: Iterable[str | os.PathLike[str]] = (),
        scrape: ScrapeConfig | None = None,
        client: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_removed: Callable[[EndpointId], None] | None = None,
        on_health_change: Callable[[EndpointId, bool], None] | None = None,
    ) -> None:
        self.scrape = scrape if scrape is not None else ScrapeConfig()
        self._client = client
        self._owns_client = client is None
        self._timeout = aiohttp.ClientTimeout(total=self.scrape.timeout_s)
        self._clock = clock
        self._on_removed = on_removed
        self.on_health_change = on_health_change
        self._slots: dict[EndpointId, _Slot] = {}
        self._files: dict[Path, tuple[int, int] | None] = {Path(f): None for f in files}
        self._pending: dict[Path, tuple[int, int]] = {}
        self._states: list[EndpointState] | None = None
        self._catalog: tuple[frozenset[str], bool] | None = None  # (served names, all known)
        self._tasks: list[asyncio.Task[None]] = []
        for spec in endpoints:
            self._add(spec, None)
        for file in self._files:
            self._reload_file(file, strict=True)

    # -- reading --------------------------------------------------------------------

    def states(self) -> list[EndpointState]:
        """Snapshots of every endpoint for `Router.route` (a cached list: do not mutate)."""
        states = self._states
        if states is None:
            after = self.scrape.unhealthy_after
            states = self._states = [
                EndpointState(
                    id=s.spec.id,
                    address=s.spec.address,
                    models=s.served() or frozenset(),
                    waiting=s.scraped.waiting,
                    running=s.scraped.running,
                    kv_usage=s.scraped.kv_usage or 0.0,
                    kv_capacity_blocks=s.scraped.kv_capacity_blocks,
                    block_size=s.scraped.block_size,
                    healthy=s.healthy(after),
                    observed_at=s.observed_at,
                    max_model_len=s.max_model_len,
                )
                for s in self._slots.values()
            ]
        return states

    def served_models(self) -> frozenset[str]:
        """Every model name some endpoint serves (configured or listed; a cached set).

        O(1) while nothing changed, O(endpoints x names) to rebuild after a
        change of the pool or of a listing.
        """
        return self._models()[0]

    def serves(self, model: str) -> bool | None:
        """Whether some endpoint serves `model`: True, False, or None when unknowable.

        False only when every endpoint's names are known (configured or
        listed) and none has `model`; None when the pool is empty or an
        endpoint may serve any name. O(1) on average.
        """
        names, closed = self._models()
        if model in names:
            return True
        return False if closed and self._slots else None

    def _models(self) -> tuple[frozenset[str], bool]:
        catalog = self._catalog
        if catalog is None:
            served = [s.served() for s in self._slots.values()]
            names = frozenset[str]().union(*(n for n in served if n is not None))
            catalog = self._catalog = (names, all(n is not None for n in served))
        return catalog

    def specs(self) -> list[EndpointSpec]:
        """The configured spec of every endpoint in the pool. O(endpoints)."""
        return [s.spec for s in self._slots.values()]

    def address(self, endpoint: EndpointId) -> str | None:
        """The `host:port` of `endpoint`, None if it is not (or no longer) in the pool."""
        slot = self._slots.get(endpoint)
        return slot.spec.address if slot is not None else None

    def is_stale(self, state: EndpointState, now: float) -> bool:
        """Whether `state`'s metrics are older than `stale_after_s` (or were never scraped)."""
        return state.observed_at is None or now - state.observed_at > self.scrape.stale_after_s

    def __len__(self) -> int:
        return len(self._slots)

    # -- passive health ---------------------------------------------------------------

    def mark_failed(self, endpoint: EndpointId) -> None:
        """A request to `endpoint` failed to connect: unhealthy until a health check passes."""
        slot = self._slots.get(endpoint)
        if slot is not None and not slot.passive:
            was = slot.healthy(self.scrape.unhealthy_after)
            slot.passive = True
            self._states = None
            log.warning("endpoint %s marked unhealthy after a failed connection", endpoint)
            if was and self.on_health_change is not None:
                self.on_health_change(endpoint, False)

    # -- one round of each job ------------------------------------------------------

    async def scrape_once(self) -> None:
        """Scrape every endpoint's metrics once, concurrently."""
        await asyncio.gather(*(self._scrape(s) for s in list(self._slots.values())))

    async def check_health_once(self) -> None:
        """Health-check every endpoint once, concurrently."""
        await asyncio.gather(*(self._check(s) for s in list(self._slots.values())))

    def reload_if_changed(self) -> bool:
        """Re-read every endpoint file whose mtime or size changed; True if the pool changed.

        A file that cannot be read or parsed is logged and its endpoints are
        kept as they were. O(files) `stat` calls when nothing changed.
        """
        changed = False
        for file in self._files:
            changed |= self._reload_file(file, strict=False)
        return changed

    # -- timers ---------------------------------------------------------------------

    async def start(self) -> None:
        """One scrape and health round, then background loops for both."""
        self._http()  # the client belongs to this loop
        await asyncio.gather(self.scrape_once(), self.check_health_once())
        self._tasks = [
            asyncio.create_task(self._loop(self.scrape.interval_s, self._scrape, reload=True)),
            asyncio.create_task(self._loop(self.scrape.health_interval_s, self._check)),
        ]

    async def stop(self) -> None:
        """Cancel the loops (and close the HTTP client if the pool made it)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._owns_client and self._client is not None:
            await self._client.close()
            self._client = None

    async def _loop(
        self,
        period: float,
        job: Callable[[_Slot], Coroutine[Any, Any, None]],
        *,
        reload: bool = False,
    ) -> None:
        """Every `period`, start `job` for each endpoint whose previous one has finished."""
        busy: dict[EndpointId, asyncio.Task[None]] = {}
        try:
            while True:
                if reload:
                    self.reload_if_changed()
                for eid, slot in list(self._slots.items()):
                    task = busy.get(eid)
                    if task is None or task.done():
                        busy[eid] = asyncio.create_task(job(slot))
                for eid in [e for e in busy if e not in self._slots]:
                    busy.pop(eid).cancel()
                await asyncio.sleep(period)
        finally:
            for task in busy.values():
                task.cancel()
            await asyncio.gather(*busy.values(), return_exceptions=True)

    # -- the jobs -------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        """The HTTP client, made on first use (on the running loop: aiohttp binds it there)."""
        if self._client is None:
            # no connection cap: at most one scrape and one check per endpoint are in flight
            self._client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._client

    async def _scrape(self, slot: _Slot) -> None:
        url = f"http://{slot.spec.address}{self.scrape.metrics_path}"
        try:
            async with self._http().get(
                url, timeout=self._timeout, allow_redirects=False
            ) as response:
                response.raise_for_status()
                text = await response.text(errors="replace")
            metrics = parse_metrics(text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("scraping %s failed: %r", url, exc)
            return
        slot.scraped = metrics
        slot.observed_at = self._clock()
        if self._slots.get(slot.spec.id) is slot:
            self._states = None

    async def _check(self, slot: _Slot) -> None:
        url = f"http://{slot.spec.address}{self.scrape.health_path}"
        after = self.scrape.unhealthy_after
        was = slot.healthy(after)
        try:
            async with self._http().get(
                url, timeout=self._timeout, allow_redirects=False
            ) as response:
                await response.read()  # the whole (small) body: the connection is kept
                ok = 200 <= response.status < 300
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        if ok:
            slot.failures = 0
            slot.passive = False
            await self._read_models(slot)
        else:
            slot.failures += 1
        now = slot.healthy(after)
        if now != was and self._slots.get(slot.spec.id) is slot:
            self._states = None
            log.warning("endpoint %s is %s", slot.spec.id, "healthy" if now else "unhealthy")
            if self.on_health_change is not None:
                self.on_health_change(slot.spec.id, now)

    async def _read_models(self, slot: _Slot) -> None:
        """Read the engine's `max_model_len` and model names from `/v1/models` (module doc)."""
        url = f"http://{slot.spec.address}{MODELS_PATH}"
        try:
            async with self._http().get(
                url, timeout=self._timeout, allow_redirects=False
            ) as response:
                body = await response.read()
                if response.status == 404:  # no model list: an engine that does not say
                    doc: object = None
                else:
                    response.raise_for_status()
                    doc = json.loads(body)
        except (aiohttp.ClientError, TimeoutError, ValueError, RecursionError) as exc:
            log.debug("reading %s failed: %r", url, exc)
            return
        listed = parse_model_names(doc)
        if listed != slot.listed:
            slot.listed = listed
            if self._slots.get(slot.spec.id) is slot:
                self._states = self._catalog = None
        found = parse_max_model_len(doc)
        if found != slot.max_model_len:
            slot.max_model_len = found
            if self._slots.get(slot.spec.id) is slot:
                self._states = None
            log.info("endpoint %s: max_model_len %s", slot.spec.id, found)

    # -- membership -----------------------------------------------------------------

    def _add(self, spec: EndpointSpec, source: Path | None) -> None:
        self._slots[spec.id] = _Slot(spec, source)
        self._states = self._catalog = None

    def _remove(self, endpoint: EndpointId) -> None:
        del self._slots[endpoint]
        self._states = self._catalog = None
        if self._on_removed is not None:
            self._on_removed(endpoint)

    def _reload_file(self, file: Path, *, strict: bool) -> bool:
        """Apply `file` if it changed. Outside start-up (`strict`), a changed file is
        applied only once the same (mtime, size) is seen twice in a row, so a file
        caught half-written is not applied; an unreadable one is logged once."""
        try:
            st = file.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError as exc:
            if strict:
                raise ConfigError(str(file), f"cannot read endpoint file: {exc}") from exc
            if self._files[file] != _MISSING:
                log.warning("endpoint file %s cannot be read, keeping its endpoints: %s", file, exc)
                self._files[file] = _MISSING
            return False
        if stamp == self._files[file]:
            return False
        if not strict and self._pending.get(file) != stamp:
            self._pending[file] = stamp  # maybe still being written: apply once it holds still
            return False
        self._files[file] = stamp
        try:
            specs = load_endpoint_file(file)
        except (ConfigError, OSError) as exc:
            if strict:
                raise ConfigError(str(file), str(exc)) from exc
            log.warning("endpoint file %s not reloaded, keeping its endpoints: %s", file, exc)
            return False
        return self._apply(file, specs)

    def _apply(self, file: Path, specs: list[EndpointSpec]) -> bool:
        """Make the endpoints that came from `file` exactly `specs`."""
        wanted = {s.id: s for s in specs}
        changed = False
        for eid, slot in list(self._slots.items()):
            if slot.source != file:
                continue
            new = wanted.get(eid)
            if new is None or new.address != slot.spec.address:
                self._remove(eid)  # gone, or a different pod under the same id
                changed = True
            elif new != slot.spec:
                slot.spec = new
                self._states = self._catalog = None
                changed = True
        for eid, spec in wanted.items():
            current = self._slots.get(eid)
            if current is None:
                self._add(spec, file)
                changed = True
            elif current.source != file:
                log.warning("endpoint file %s repeats endpoint id %s: ignored", file, eid)
        if changed:
            log.info("endpoint file %s reloaded: %d endpoints in the pool", file, len(self._slots))
        return changed
