"""Engines' KV-cache events in, as `IndexEvent`s out: the precise-mode driver.

One ZMQ SUB socket per endpoint that has `kv_events` configured, on the
driver's event loop (`zmq.asyncio`), decodes each message, maps the engine's
blocks to the router's block keys and hands the result to `Router.observe`.
docs/kv-events.md is the user's page (configuration, modes, limits,
performance); this docstring is the implementer's.

Wire format (read from vLLM's `vllm/distributed/kv_events.py`: the 0.32.0
release as installed here, vLLM main, and the older array-shaped releases,
e.g. HabanaAI/vllm-fork; SGLang's `python/sglang/srt/disaggregation/
kv_events.py` publishes the same frames; llm-d's KV-cache indexer,
llm-d/llm-d-kv-cache `pkg/kvevents/engineadapter/vllm_adapter.go`, decodes
them the same way):

- PUB multipart `[topic, seq, payload]`: `seq` 8 bytes big-endian, counting
  up from 0 per publisher (so a restarted engine starts again at 0);
- `payload`: a msgpack `EventBatch`, array-shaped `[ts, events, dp_rank?]`
  (msgspec `array_like`; vLLM 0.32, SGLang without the rank) or map-shaped
  `{ts, events, data_parallel_rank}` (vLLM main);
- each event is a msgspec tagged struct, map-shaped `{"type": "BlockStored",
  "block_hashes": ..., ...}` (vLLM 0.32 and main) or array-shaped
  `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
  lora_id, medium, lora_name, ...]` (older vLLM, SGLang: trailing fields
  absent); `BlockRemoved` `[tag, block_hashes, medium?]`; `AllBlocksCleared`
  `[tag]`. Hashes are 64-bit integers or, with
  `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`, digest bytes: both are accepted
  as opaque keys (a stream uses one kind).
- Replay (`replay_endpoint`, a ROUTER): a DEALER sends `[b"", start_seq]`
  (8 bytes big-endian) and receives `[b"", seq, payload]` per buffered batch
  with `seq >= start_seq` (vLLM 0.32 adds the topic: `[b"", topic, seq,
  payload]`), then an end marker whose seq is -1 (signed, 8 bytes).

Mapping (the team's design for issue 13): the engine's hash is never
recomputed. Per endpoint, `BlockMapper` keeps `engine hash -> (the router
keys of that engine block, its depth in index blocks, copies per tier)`; a
stored block's keys are `Blocker.hash_tokens(its tokens, ns, index block
size, parent=parent's last key, start=parent's depth)`, so they equal the
keys of any request that carries the same token prefix. Copies are counted
because vLLM's block pool (`vllm/v1/core/block_pool.py`) does not
deduplicate: one hash can be cached in two blocks, stored and removed one at
a time; and per tier, the copies that hold each router key, because two
engine blocks can share keys (siblings alike in their first index block
when index blocks are smaller than the engine's; a salted and an unsalted
copy). The map is bounded, least recently stored or extended out first.

Streams (`_Stream`, one per endpoint): sequence numbers tell gaps (repaired
by the replay socket, else the endpoint is cleared or, with `on_gap: keep`,
kept) and restarts (the sequence going back: cleared); on connecting to an
engine not heard from yet the subscriber replays the engine's buffer, so it
knows what an engine that ran before it holds; a ZMQ socket monitor, the
pool's health callback and a silence rule decide precise vs approximate
(docs/kv-events.md "Modes").

Cost per message: one msgpack decode, O(events) Python work, one
`hash_tokens` (one numpy pass) per stored event, and one `Router.observe`
per run of consecutive events of one kind and tier (runs are merged). The
subscribers share the event loop with the requests, so they yield to it
every `_SLICE_S` of work, within a large message too.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import attrs
import numpy as np

from prefixroute.blocks import Blocker, HashMode
from prefixroute.config import ConfigError
from prefixroute.drivers.sections import build_section, positive_number
from prefixroute.endpoint import EndpointId
from prefixroute.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    IndexEvent,
    ModeChanged,
)
from prefixroute.index import Tier

try:  # the `events` extra; only endpoints with `kv_events` need it
    import msgpack
    import zmq
    import zmq.asyncio
    from zmq.utils.monitor import parse_monitor_message
except ImportError:  # pragma: no cover - exercised by a subprocess test without the extra
    msgpack = None
    zmq = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from prefixroute.endpoint import EndpointState
    from prefixroute.router import Router

__all__ = [
    "LAG_BUCKETS",
    "BlockMapper",
    "KVEventSource",
    "KVEventsConfig",
    "KVEventsManager",
    "Malformed",
    "Pool",
    "Stored",
    "StreamSnapshot",
    "decode_batch",
    "medium_tier",
]

log = logging.getLogger(__name__)

END_SEQ = -1
"""The replay socket's end marker (a signed 8-byte -1 where a seq would be)."""
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the event-lag histogram: engine timestamp to applied."""
_SLICE_S = 0.002  # a subscriber yields to the event loop after this much work
_CHUNK = 128  # events mapped between two checks of the slice (a large batch is split)


# -- configuration ------------------------------------------------------------------


_SECTION_KEYS = {
    "silence_s": "float",
    "replay_timeout_s": "float",
    "max_replay_batches": "int",
    "receive_hwm": "int",
    "max_message_bytes": "int",
    "map_slack": "float",
    "default_map_blocks": "int",
    "check_interval_s": "float",
    "on_gap": "str",
}


def _at_least_one(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not (math.isfinite(value) and value >= 1):
        raise ValueError(f"{attr.name} must be a finite number >= 1, got {value!r}")


@attrs.frozen
class KVEventsConfig:
    """The top-level `kv_events` section: timing and memory knobs every subscriber shares.

    `silence_s`: a connected endpoint that the pool saw busy (running or
    waiting requests) for this long without sending one message is demoted
    to approximate (an idle engine publishes nothing, so silence alone never
    demotes). A replay's round ends when the replay socket has been silent
    for `replay_timeout_s`; a reply that stopped short is asked again from
    the first missing batch while rounds bring some; at most
    `max_replay_batches` batches are applied per replay.
    `receive_hwm`: ZMQ's receive queue per subscriber, in messages (beyond
    it ZMQ drops, and the sequence gap is handled as any gap).
    `max_message_bytes`: larger messages are dropped undecoded (counted).
    The engine-hash map of an endpoint holds at most its KV capacity in
    blocks times `map_slack` (`default_map_blocks` while unknown).
    `check_interval_s`: how often the silence and model rules are checked,
    and how often each subscriber pings its engine (ZMTP heartbeats: a
    connection that answers none for `silence_s` is dropped, and retried).
    `on_gap`: what an unrepaired gap does to the endpoint's entries, `clear`
    (drop them and relearn: what is in the index is then all true) or `keep`
    (apply the following messages on top: entries a lost removal should have
    dropped stay until the index evicts them, blocks a lost store announced
    stay unknown, and so do their children).
    """

    silence_s: float = attrs.field(default=5.0, validator=positive_number)
    replay_timeout_s: float = attrs.field(default=1.0, validator=positive_number)
    max_replay_batches: int = attrs.field(default=10_000, validator=attrs.validators.ge(1))
    receive_hwm: int = attrs.field(default=10_000, validator=attrs.validators.ge(1))
    max_message_bytes: int = attrs.field(
        default=8 * 1024 * 1024, validator=attrs.validators.ge(1024)
    )
    map_slack: float = attrs.field(default=1.25, validator=_at_least_one)
    default_map_blocks: int = attrs.field(default=262_144, validator=attrs.validators.ge(16))
    check_interval_s: float = attrs.field(default=0.5, validator=positive_number)
    on_gap: str = attrs.field(default="clear", validator=attrs.validators.in_(("clear", "keep")))

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> KVEventsConfig:
        """Read the config document's `kv_events` section; ConfigError naming the field."""
        config: KVEventsConfig = build_section(doc, "kv_events", _SECTION_KEYS, cls)
        return config


_ZMQ_SCHEMES = ("tcp://", "ipc://", "inproc://")
_NO_EXTRA = "needs the `events` extra: pip install 'prefixroute[events]' (pyzmq, msgpack)"


@attrs.frozen
class KVEventSource:
    """One endpoint's `kv_events` mapping: where its engine publishes, and as which model."""

    endpoint: str
    topic: str = ""
    replay_endpoint: str | None = None
    model: str | None = None

    @classmethod
    def from_document(cls, doc: object, path: str) -> KVEventSource:
        """Read `{endpoint, topic?, replay_endpoint?, model?}`; ConfigError naming the field."""
        allowed = ("endpoint", "topic", "replay_endpoint", "model")
        if not isinstance(doc, Mapping):
            raise ConfigError(
                path, "must be a mapping {endpoint, topic?, replay_endpoint?, model?}"
            )
        for key in doc:
            if key not in allowed:
                raise ConfigError(f"{path}.{key}", f"unknown key (allowed: {', '.join(allowed)})")
        endpoint = doc.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith(_ZMQ_SCHEMES):
            raise ConfigError(f"{path}.endpoint", "must be a ZMQ address such as tcp://host:5557")
        if "*" in endpoint:
            raise ConfigError(f"{path}.endpoint", "write the engine's host, not '*'")
        topic = doc.get("topic", "")
        if topic is None:
            topic = ""
        if not isinstance(topic, str):
            raise ConfigError(f"{path}.topic", "must be a string")
        replay = doc.get("replay_endpoint")
        if replay is not None and (
            not isinstance(replay, str) or not replay.startswith(_ZMQ_SCHEMES)
        ):
            raise ConfigError(f"{path}.replay_endpoint", "must be a ZMQ address or null")
        model = doc.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise ConfigError(f"{path}.model", "must be a model name or null")
        if zmq is None or msgpack is None:  # said when the config is read, not at start-up
            raise ConfigError(path, _NO_EXTRA)
        return cls(endpoint=endpoint, topic=topic, replay_endpoint=replay, model=model)


# -- decoding -----------------------------------------------------------------------


class Malformed(ValueError):
    """A message or event that does not follow the wire format (counted and skipped)."""


class Stored(NamedTuple):
    """An engine's `BlockStored`: `hashes` of consecutive full blocks after `parent`.

    A NamedTuple, not an attrs value: one is made per event on the hot path.
    """

    hashes: list[int | bytes]
    parent: int | bytes | None
    tokens: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


def _hashes(value: object) -> list[int | bytes]:
    if type(value) is not list:
        raise Malformed("block_hashes must be a list")
    if not _HASH_TYPES.issuperset(map(type, value)):  # exact types: no bool, no subclass
        raise Malformed("a block hash must be an integer or bytes")
    return value


def _opt_str(value: object, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise Malformed(f"{name} must be a string or null")


def _stored(raw: dict[str, Any] | list[Any]) -> Stored:
    """A decoded `BlockStored` (either shape) as a `Stored`; Malformed otherwise."""
    if isinstance(raw, dict):
        get = raw.get
        fields = (
            get("block_hashes"),
            get("parent_block_hash"),
            get("token_ids"),
            get("block_size"),
            get("lora_id"),
            get("medium"),
            get("lora_name"),
        )
    elif len(raw) < 5:
        raise Malformed("BlockStored needs at least 5 fields")
    else:
        fields = (*raw[1:8], *(None,) * (8 - len(raw)))
    hashes, parent, tokens, block_size, lora_id, medium, lora_name = fields
    if parent is not None and (not isinstance(parent, int | bytes) or isinstance(parent, bool)):
        raise Malformed("parent_block_hash must be an integer, bytes or null")
    if not isinstance(tokens, list):
        raise Malformed("token_ids must be a list")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise Malformed("block_size must be a positive integer")
    if lora_id is not None and (isinstance(lora_id, bool) or not isinstance(lora_id, int)):
        raise Malformed("lora_id must be an integer or null")
    hashes = _hashes(hashes)
    if len(tokens) != len(hashes) * block_size:
        raise Malformed("token_ids must hold block_size ids per block hash")
    return Stored(
        hashes,
        parent,
        tokens,
        block_size,
        lora_id,
        _opt_str(medium, "medium"),
        _opt_str(lora_name, "lora_name"),
    )


def decode_batch(payload: bytes) -> tuple[float, list[object]]:
    """A payload's `(ts, raw events)`; Malformed when it is not an `EventBatch`.

    Both batch shapes (array `[ts, events, rank?]` and map `{ts, events, ...}`)
    are accepted. The events stay raw: `BlockMapper.apply` checks each, so
    one bad event costs only itself. O(payload bytes).
    """
    if msgpack is None:  # pragma: no cover
        raise RuntimeError(_NO_EXTRA)
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (
        ValueError,
        TypeError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
        RecursionError,
    ) as exc:
        raise Malformed(f"not msgpack: {exc}"[:200]) from None
    if isinstance(batch, list) and len(batch) >= 2:
        ts, events = batch[0], batch[1]
    elif isinstance(batch, dict):
        ts, events = batch.get("ts"), batch.get("events")
    else:
        raise Malformed("an event batch must be [ts, events, ...] or {ts, events}")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise Malformed("the batch timestamp must be a number")
    if not isinstance(events, list):
        raise Malformed("the batch events must be a list")
    return float(ts), events


def medium_tier(medium: str | None) -> Tier | None:
    """The index tier of an event's `medium`: GPU (also when absent), CPU, DISK.

    Case-insensitive; vLLM's `STORAGE` (its offloading medium) and `DISK`
    are the disk tier. None for anything else (the caller counts and skips
    the event rather than guess a tier).
    """
    if medium is None:
        return Tier.GPU
    return _MEDIA.get(medium.upper())


_MEDIA = {"GPU": Tier.GPU, "CPU": Tier.CPU, "DISK": Tier.DISK, "STORAGE": Tier.DISK}
_TIERS: dict[str | None, Tier] = {None: Tier.GPU, "GPU": Tier.GPU, "CPU": Tier.CPU}  # fast path
_HASH_TYPES = frozenset((int, bytes))


# -- mapping ------------------------------------------------------------------------


class _Stats:
    """One endpoint's counters (mutable, internal; read through `StreamSnapshot`)."""

    __slots__ = (
        "blocks_removed",
        "blocks_stored",
        "clears",
        "dropped",
        "events",
        "gaps",
        "lag_buckets",
        "lag_count",
        "lag_sum",
        "malformed",
        "map_evicted",
        "messages",
        "missing",
        "replay_failures",
        "replays",
        "resets",
        "unmapped",
    )

    def __init__(self) -> None:
        self.messages = 0
        self.events = 0
        self.blocks_stored = 0
        self.blocks_removed = 0
        self.clears = 0  # AllBlocksCleared events from the engine
        self.gaps = 0
        self.missing = 0  # messages lost in gaps
        self.replays = 0
        self.replay_failures = 0
        self.resets = 0  # endpoint cleared by us: gap without replay, restart, health
        self.dropped = 0  # messages dropped before decoding (bad frames, too large)
        self.malformed = 0  # messages or events that failed to decode
        self.unmapped = 0  # blocks skipped: unknown parent or hash, LoRA without name, medium
        self.map_evicted = 0
        self.lag_sum = 0.0
        self.lag_count = 0
        self.lag_buckets = [0] * (len(LAG_BUCKETS) + 1)


class BlockMapper:
    """One endpoint's engine-hash -> router-key map (see the module docstring).

    `apply(events)` returns the `IndexEvent`s for the router, a message's
    removals and stores gathered into few of them (see `apply`). `problem` is why this
    endpoint cannot be mapped (None when it can): the index block size must
    divide the engine's, hashing must be in token mode without
    `isolate_tenants`, the model must be known. Bounded: at most
    `max_blocks` engine blocks are remembered (the least recently stored or
    extended first out, in amortised O(1) batches).

    Cost: O(blocks) dict work plus one `hash_tokens` call per stored event.
    """

    def __init__(
        self,
        endpoint: EndpointId,
        blocker: Blocker,
        *,
        model: str | None,
        max_blocks: int,
        stats: _Stats | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.blocker = blocker
        self.stats = stats if stats is not None else _Stats()
        self.max_blocks = max_blocks
        # engine hash -> [router keys of the block, depth after it (index blocks),
        #                 copies held in GPU, CPU, DISK]
        self.blocks: dict[int | bytes, list[Any]] = {}
        # per tier: router key -> engine block copies mapped to it (two engine blocks can
        # share router keys: siblings alike in a first index block, salted copies)
        self.refs: tuple[dict[int, int], ...] = ({}, {}, {})
        self.model: str | None = None
        self._ns = 0
        self.problem: str | None = None
        self.engine_block_size: int | None = None
        self._stored_now: set[int | bytes] = set()  # engine hashes stored in this group
        self.set_model(model)

    def set_model(self, model: str | None) -> None:
        """Hash blocks under `model` from now on (None: unknown, nothing maps)."""
        if model == self.model and model is not None:
            return
        if self.model is not None and model != self.model:
            self.clear()  # keys of another namespace: useless now
        self.model = model
        if model is not None:
            self._ns = self.blocker.token_namespace(model)
        self._check()

    def note_block_size(self, size: int) -> None:
        """The engine's block size, as its events or its metrics say."""
        self.engine_block_size = size
        self._check()

    def _check(self) -> None:
        blocker, size = self.blocker, self.engine_block_size
        if blocker.mode is not HashMode.TOKEN:
            self.problem = "hashing.mode is text: engine blocks are tokens"
        elif blocker.isolate_tenants:  # requests hash under their tenant, events under none
            self.problem = "hashing.isolate_tenants: engine events do not say whose a block is"
        elif self.model is None:
            self.problem = "model unknown: set kv_events.model or the endpoint's models"
        elif size is not None and size % blocker.block_size:
            self.problem = (
                f"engine block size {size} is not a multiple of "
                f"hashing.block_size {blocker.block_size}"
            )
        else:
            self.problem = None

    def clear(self) -> None:
        """Forget every mapped block (the engine's cache is gone)."""
        self.blocks = {}
        self.refs = ({}, {}, {})

    def apply(self, raw_events: Iterable[Any]) -> list[IndexEvent]:
        """Map one batch's raw events; returns the `IndexEvent`s for the router.

        Within a message, removals and stores of one tier are gathered into
        one `BlockRemoved` and one `BlockStored`, applied in that order: the
        same end state as one at a time (a block removed and then stored
        again ends stored), except for a block stored and then removed in
        the same message, which closes the group first. A tier change or an
        `AllBlocksCleared` closes it too. A malformed event is counted and
        skipped; nothing raises. O(blocks) plus one `hash_tokens` per store.
        """
        out: list[IndexEvent] = []
        stats = self.stats
        eid = self.endpoint
        stores: list[int] = []
        store_tier: Tier | None = None
        removals: list[int] = []
        removal_tier: Tier | None = None
        stored_now: set[int | bytes] = self._stored_now
        stored_now.clear()

        def flush() -> None:
            nonlocal stores, removals
            if removals:
                out.append(BlockRemoved(eid, removals, removal_tier))
                removals = []
            if stores:
                assert store_tier is not None
                out.append(BlockStored(eid, stores, store_tier))
                stores = []
            stored_now.clear()

        for raw in raw_events:
            kind = type(raw)
            if kind is dict:
                tag = raw.get("type")
            elif kind is list and raw:
                tag = raw[0]
            else:
                stats.malformed += 1  # an event is a map or a tagged array
                continue
            if tag == "BlockStored":
                try:
                    event = _stored(raw)
                except Malformed:
                    stats.malformed += 1
                    continue
                stats.events += 1
                tier = _TIERS.get(event.medium)
                if tier is None:
                    tier = medium_tier(event.medium)
                if tier is not store_tier and stores:
                    flush()
                keys = self._store(event, tier)
                if keys:
                    store_tier = tier
                    stores += keys
                    stored_now.update(event.hashes)
                continue
            if tag == "AllBlocksCleared":
                stats.events += 1
                flush()
                stats.clears += 1
                self.clear()
                out.append(AllBlocksCleared(eid))
                continue
            if tag != "BlockRemoved" or (kind is list and len(raw) < 2):
                stats.malformed += 1  # an unknown type, or a removal without its hashes
                continue
            if kind is dict:
                hashes, medium = raw.get("block_hashes"), raw.get("medium")
            else:
                hashes, medium = raw[1], (raw[2] if len(raw) > 2 else None)
            if type(hashes) is not list or not _HASH_TYPES.issuperset(map(type, hashes)):
                stats.malformed += 1
                continue
            if medium is None:
                tier = Tier.GPU  # engines that omit it (older vLLM, SGLang) hold GPU blocks only
            elif type(medium) is not str:
                stats.malformed += 1
                continue
            else:
                tier = _TIERS.get(medium)
                if tier is None:
                    tier = medium_tier(medium)
                    if tier is None:
                        stats.events += 1
                        stats.unmapped += len(hashes)
                        continue
            stats.events += 1
            if (removals and tier is not removal_tier) or not stored_now.isdisjoint(hashes):
                flush()
            keys = self._remove(hashes, tier)
            if keys:
                removal_tier = tier
                removals += keys
        flush()
        return out

    def _store(self, event: Stored, tier: Tier | None) -> list[int]:
        stats = self.stats
        n = len(event.hashes)
        if tier is None:
            stats.unmapped += n
            return []
        if event.block_size != self.engine_block_size:
            self.note_block_size(event.block_size)
        if self.problem is not None:
            stats.unmapped += n
            return []
        ns = self._ns
        if event.lora_id is not None or event.lora_name is not None:
            if not event.lora_name:
                stats.unmapped += n
                return []
            ns = self.blocker.token_namespace(event.lora_name)
        blocks = self.blocks
        parent = event.parent
        if parent is None:
            pkey, depth = 0, 0
        else:
            entry = blocks.pop(parent, None)
            if entry is None:
                stats.unmapped += n
                return []
            blocks[parent] = entry  # the newest again: a prefix still extended stays mapped
            pkey, depth = entry[0][-1], entry[1]
        ibs = self.blocker.block_size
        try:
            tokens = np.array(event.tokens, dtype=np.uint32)
            keys: list[int] = self.blocker.hash_tokens(
                tokens, ns, ibs, parent=pkey, start=depth
            ).tolist()
        except (OverflowError, ValueError, TypeError):  # ids that are not 32-bit integers
            stats.events -= 1  # malformed after all
            stats.malformed += 1
            return []
        per = event.block_size // ibs
        slot = 2 + tier  # the entry's count of copies in this tier
        refs = self.refs[tier]
        count = refs.get
        if per == 1:
            for h, k in zip(event.hashes, keys, strict=True):
                depth += 1
                entry = blocks.pop(h, None)  # (re)inserted: the newest
                if entry is None:
                    entry = [(k,), depth, 0, 0, 0]
                blocks[h] = entry
                entry[slot] += 1
                key = entry[0][0]
                refs[key] = count(key, 0) + 1
        else:
            for i, h in enumerate(event.hashes):
                depth += per
                entry = blocks.pop(h, None)
                if entry is None:
                    entry = [tuple(keys[i * per : (i + 1) * per]), depth, 0, 0, 0]
                blocks[h] = entry
                entry[slot] += 1
                for k in entry[0]:
                    refs[k] = count(k, 0) + 1
        stats.blocks_stored += n
        if len(blocks) > self.max_blocks + max(64, self.max_blocks >> 3):
            self._trim()
        return keys

    def check_invariants(self) -> None:
        """Every entry holds a copy somewhere; `refs` counts exactly the entries' copies."""
        want: tuple[dict[int, int], ...] = ({}, {}, {})
        for entry in self.blocks.values():
            assert entry[2] >= 0 and entry[3] >= 0 and entry[4] >= 0, entry
            assert entry[2] or entry[3] or entry[4], entry
            for tier, counts in enumerate(want):
                for k in entry[0]:
                    if entry[2 + tier]:
                        counts[k] = counts.get(k, 0) + entry[2 + tier]
        assert want == self.refs, (want, self.refs)

    def _trim(self) -> None:
        """Keep the newest `max_blocks` entries (a C-level rebuild, amortised O(1) each).

        A forgotten block's keys stay in the index (the engine may still hold
        them) but no longer count as held by it here.
        """
        drop = len(self.blocks) - self.max_blocks
        self.stats.map_evicted += drop
        items = iter(self.blocks.items())
        for _, entry in islice(items, drop):
            for tier, refs in enumerate(self.refs):
                copies = entry[2 + tier]
                for k in entry[0] if copies else ():
                    n = refs[k] - copies
                    if n > 0:
                        refs[k] = n
                    else:
                        del refs[k]
        self.blocks = dict(items)

    def _remove(self, hashes: Sequence[int | bytes], tier: Tier) -> list[int]:
        """One copy of each block fewer in `tier`; the keys no mapped copy holds there any more.

        vLLM does not deduplicate: two blocks with one hash (a prompt's last
        block recomputed and cached again) are stored twice and removed one
        at a time, so an entry counts its copies per tier. Two engine blocks
        can also share router keys (with index blocks smaller than the
        engine's, siblings whose first index block is alike; a salted and an
        unsalted root), so a key leaves with the last copy that maps to it.
        """
        blocks = self.blocks
        stats = self.stats
        refs = self.refs[tier]
        keys: list[int] = []
        slot = 2 + tier
        for h in hashes:
            entry = blocks.get(h)
            if entry is None or not entry[slot]:
                stats.unmapped += 1
                continue
            entry[slot] -= 1
            for k in entry[0]:
                n = refs[k] - 1
                if n:
                    refs[k] = n
                else:
                    del refs[k]
                    keys.append(k)
            if not (entry[2] or entry[3] or entry[4]):
                del blocks[h]
        stats.blocks_removed += len(hashes)
        return keys


# -- one endpoint's stream ----------------------------------------------------------


@attrs.frozen
class StreamSnapshot:
    """What one endpoint's subscriber reports (for `/health` and metrics)."""

    endpoint: EndpointId
    precise: bool
    reason: str
    connected: bool
    messages: int
    events: int
    blocks_stored: int
    blocks_removed: int
    clears: int
    gaps: int
    missing: int
    replays: int
    replay_failures: int
    resets: int
    dropped: int
    malformed: int
    unmapped: int
    map_evicted: int
    mapped_blocks: int
    last_seq: int | None
    lag_sum: float
    lag_count: int
    lag_buckets: tuple[int, ...]


class _Stream:
    """One endpoint's subscriber: sockets, sequence tracking, mode (internal).

    The mode rule (docs/kv-events.md "Modes"): precise after a message has
    been applied on a live connection while the mapper can map; approximate
    on a disconnect, while the endpoint is unhealthy, when a busy endpoint
    has been silent for `silence_s`, or when the mapper cannot map.
    """

    def __init__(
        self,
        manager: KVEventsManager,
        endpoint: EndpointId,
        source: KVEventSource,
        model: str | None,
        max_blocks: int,
    ) -> None:
        self.manager = manager
        self.endpoint = endpoint
        self.source = source
        self.stats = _Stats()
        self.mapper = BlockMapper(
            endpoint, manager.router.blocker, model=model, max_blocks=max_blocks, stats=self.stats
        )
        self.precise = False
        self.reason = "no event received on this connection yet"
        self.connected = False
        self.healthy = True
        self.last_seq: int | None = None
        self.fresh_connection = True  # no message yet on the current connection
        self._broken = False  # the stream was down since the endpoint went unhealthy
        self.last_message_at: float | None = None
        self.busy_since: float | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()
        self._duplicates_until: int | None = None  # live seqs up to here were replayed
        self._replayed_last: int | None = None
        self._ran_since = 0.0  # perf_counter when this stream last yielded to the loop
        self.sub: Any = None
        self.monitor: Any = None

    # -- mode -------------------------------------------------------------------------

    def _set_mode(self, precise: bool, reason: str) -> None:
        self.reason = reason
        if precise != self.precise:
            self.precise = precise
            self.manager.router.observe(ModeChanged(self.endpoint, precise))
            log.info(
                "endpoint %s: %s (%s)",
                self.endpoint,
                "precise" if precise else "approximate",
                reason,
            )

    def reset(self, why: str) -> None:
        """Clear the endpoint in the index and the mapper (relearned from later events)."""
        self.stats.resets += 1
        self.mapper.clear()
        self.manager.router.observe(AllBlocksCleared(self.endpoint))
        log.info("endpoint %s: entries cleared (%s)", self.endpoint, why)

    # -- sockets ----------------------------------------------------------------------

    def start(self, ctx: Any) -> None:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, self.manager.config.receive_hwm)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.IPV6, 1)  # IPv6 addresses too (IPv4 ones work as before)
        sub.setsockopt(zmq.SUBSCRIBE, self.source.topic.encode())
        # ZMTP heartbeats: a SUB sends nothing, so without them a link whose far end vanished
        # (no FIN, no RST) would look connected, and silent, for good
        config = self.manager.config
        sub.setsockopt(zmq.HEARTBEAT_IVL, max(1, round(config.check_interval_s * 1000)))
        sub.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, round(config.silence_s * 1000)))
        self.monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sub.connect(self.source.endpoint)
        self.sub = sub
        self.tasks = [
            asyncio.create_task(self._receive_loop()),
            asyncio.create_task(self._monitor_loop()),
        ]

    def _start(self, job: Coroutine[Any, Any, None]) -> None:
        """Run `job` as one of this stream's tasks (cancelled by `stop`)."""
        task = asyncio.create_task(job)
        self.tasks.append(task)

        def forget(done: asyncio.Task[None]) -> None:
            if done in self.tasks:
                self.tasks.remove(done)
            if not done.cancelled() and done.exception() is not None:
                log.error("endpoint %s: %s failed", self.endpoint, job, exc_info=done.exception())

        task.add_done_callback(forget)

    def cancel(self) -> None:
        """Cancel every task of this stream (it applies nothing more); `stop` closes."""
        for task in self.tasks:
            task.cancel()

    async def stop(self) -> None:
        self.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
        if self.sub is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.sub.disable_monitor()
            self.monitor.close(linger=0)
            self.sub.close(linger=0)
            self.sub = self.monitor = None

    async def _monitor_loop(self) -> None:
        while True:
            frames = await self.monitor.recv_multipart()
            try:
                event = parse_monitor_message(frames)["event"]
            except (ValueError, KeyError, IndexError):  # pragma: no cover - libzmq's own frames
                continue
            if event == zmq.EVENT_CONNECTED:
                self.connected = True
                self.fresh_connection = True
                if self.last_seq is None and self.source.replay_endpoint is not None:
                    self._start(self.catch_up())
            elif event == zmq.EVENT_DISCONNECTED:
                self.connected = False
                self.fresh_connection = self._broken = True
                self._set_mode(False, "event stream disconnected")

    async def _pause(self) -> None:
        """Yield to the event loop once this stream has worked `_SLICE_S` without doing so."""
        if time.perf_counter() - self._ran_since >= _SLICE_S:
            await asyncio.sleep(0)
            self._ran_since = time.perf_counter()

    async def _receive_loop(self) -> None:
        """Await a message, then drain what is already queued without a round trip
        through the event loop per message, yielding every `_SLICE_S` of work."""
        sync: Any = zmq.Socket.shadow(self.sub.underlying)  # same socket, non-blocking reads
        while True:
            frames: list[bytes] | None = await self.sub.recv_multipart()
            self._ran_since = time.perf_counter()
            while frames is not None:
                try:
                    await self.handle(frames)
                except Exception:  # never let one message stop the subscriber
                    self.stats.malformed += 1
                    log.exception("endpoint %s: a KV event message failed", self.endpoint)
                await self._pause()
                try:
                    frames = sync.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    frames = None

    # -- messages ---------------------------------------------------------------------

    async def handle(self, frames: Sequence[bytes]) -> None:
        """One PUB message `[topic, seq, payload]`: sequence rules, then apply.

        Serialised with `catch_up` (a replay must not interleave with live
        messages).
        """
        async with self._lock:
            await self._handle(frames)

    async def _handle(self, frames: Sequence[bytes]) -> None:
        stats = self.stats
        if len(frames) != 3 or len(frames[1]) != 8:
            stats.dropped += 1
            return
        seq = int.from_bytes(frames[1], "big")
        payload = frames[2]
        if len(payload) > self.manager.config.max_message_bytes:
            stats.dropped += 1
            self.last_seq = seq  # the gap it leaves is ours: the content is lost
            self.reset("message too large")
            return
        last = self.last_seq
        if last is None:
            if seq == 0:  # a fresh engine: whatever the index guessed is gone
                self.reset("engine started")
            elif self.source.replay_endpoint is not None:
                # joining mid-stream: learn what the engine's replay buffer still holds
                await self._replay(0, seq, catch_up=True)
        elif seq <= last:
            if self._duplicates_until is not None and seq <= self._duplicates_until:
                return  # a live copy of a batch the catch-up replay applied
            self.reset(f"sequence went back from {last} to {seq}: engine restarted")
        elif seq > last + 1:
            stats.gaps += 1
            stats.missing += seq - last - 1
            if not await self._replay(last + 1, seq) and self.manager.config.on_gap == "clear":
                self.reset(f"gap of {seq - last - 1} messages")
        self.last_seq = seq
        self._duplicates_until = None
        self.fresh_connection = False
        self.connected = True  # a message proves it, whichever task the monitor's news is in
        await self.apply_payload(payload)

    async def catch_up(self) -> None:
        """On connecting to an engine not heard from yet: replay its buffer from 0.

        So a driver that starts (or an engine that comes back) while the
        engine holds blocks learns them before the next request, not after
        the engine's next event. Live messages the SUB socket queued
        meanwhile that the replay already applied are skipped. Without a
        replay socket, or once a message was seen, nothing to do.
        """
        async with self._lock:
            if self.last_seq is not None or self.source.replay_endpoint is None:
                return
            self._replayed_last = None
            ok = await self._replay(0, None, catch_up=True)
            if self._replayed_last is not None:
                self.last_seq = self._duplicates_until = self._replayed_last
            if ok:  # the engine answered: we know what it holds (nothing, if it sent nothing)
                self.fresh_connection = False
                if self.last_message_at is None:
                    self.last_message_at = self.manager.clock()
                self._update_mode()

    async def apply_payload(self, payload: bytes, *, replayed: bool = False) -> None:
        """Decode and map one batch, hand it to the router, update the mode.

        A large batch is mapped `_CHUNK` events at a time, yielding to the
        event loop between chunks every `_SLICE_S` (same end state: `apply`
        keeps the order of events). The lag histogram takes live batches
        only (a replayed one is old news).
        """
        stats = self.stats
        stats.messages += 1
        now = self.manager.clock()
        self.last_message_at = now
        self.busy_since = None
        try:
            ts, raw = decode_batch(payload)
        except Malformed:
            stats.malformed += 1
            return
        observe = self.manager.router.observe
        for i in range(0, len(raw), _CHUNK):
            if i:
                await self._pause()
            if self.manager.pool.address(self.endpoint) is None:
                return  # the endpoint left the pool: its events are ignored
            for event in self.mapper.apply(raw[i : i + _CHUNK] if len(raw) > _CHUNK else raw):
                observe(event)
        lag = self.manager.wall_clock() - ts
        if not replayed and math.isfinite(lag):
            lag = max(0.0, lag)
            stats.lag_sum += lag
            stats.lag_count += 1
            stats.lag_buckets[bisect.bisect_left(LAG_BUCKETS, lag)] += 1  # first bound >= lag
        self._update_mode()

    def _update_mode(self) -> None:
        problem = self.mapper.problem
        if self.manager.pool.address(self.endpoint) is None:
            self._set_mode(False, "endpoint removed")  # its subscriber closes at the next check
        elif problem is not None:
            self._set_mode(False, problem)
        elif not self.healthy:
            self._set_mode(False, "endpoint unhealthy")
        elif self.last_message_at is None or self.fresh_connection:
            self._set_mode(False, "no event received on this connection yet")
        elif self.sub is not None and not self.connected:
            self._set_mode(False, "event stream disconnected")
        else:
            self._set_mode(True, "events live")

    async def _replay(self, start: int, until: int | None, *, catch_up: bool = False) -> bool:
        """Ask the replay socket for batches `start .. until - 1` (None: all) and apply them.

        True when every one of them was applied; False without a replay
        socket, on a timeout, or when the engine's buffer no longer holds
        `start`. With `catch_up` (joining a stream mid-way) the buffer's
        oldest batch may come after `start`: what it holds from there on is
        applied (True when that reaches `until - 1` without a hole).

        vLLM's ROUTER sends its whole buffer at once and drops what its
        send queue cannot hold, so a reply can stop short (no end marker) or
        skip batches: the rest is asked for again from the first missing
        one, with a new socket, while each round brings at least one batch.
        A round ends when the socket is silent for `replay_timeout_s`; at
        most `max_replay_batches` batches are applied in all and at most that
        many replies read per round.
        """
        address = self.source.replay_endpoint
        if address is None or zmq is None:
            return False
        stats = self.stats
        stats.replays += 1
        config = self.manager.config
        expected = start
        applied = 0
        ok = False
        while not ok and applied < config.max_replay_batches:
            first = expected
            sock = self.manager.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.RCVHWM, config.max_replay_batches + 1)  # ZMQ's default: 1,000
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IPV6, 1)
            try:
                sock.connect(address)
                await sock.send_multipart([b"", expected.to_bytes(8, "big")])
                for _ in range(config.max_replay_batches + 1):
                    frames = await asyncio.wait_for(sock.recv_multipart(), config.replay_timeout_s)
                    if frames and frames[0] == b"":
                        frames = frames[1:]
                    if len(frames) == 3:
                        frames = frames[1:]  # vLLM 0.32 adds the topic
                    if len(frames) != 2 or len(frames[0]) != 8:
                        stats.dropped += 1
                        continue
                    seq = int.from_bytes(frames[0], "big", signed=True)
                    if seq == END_SEQ:
                        ok = until is None or expected >= until
                        break
                    if seq < expected or (until is not None and seq >= until):
                        continue  # already applied, or live messages will bring it
                    if seq != expected:
                        if not (catch_up and expected == start):
                            break  # a hole: lost on the way, or no longer in the buffer
                        expected = seq  # catching up: from the oldest batch it holds
                    if applied == config.max_replay_batches:
                        break
                    if catch_up and seq == 0:
                        self.reset("replaying the engine's history from its start")
                    catch_up = False
                    await self.apply_payload(frames[1], replayed=True)
                    self._replayed_last = seq
                    expected += 1
                    applied += 1
                    await self._pause()  # a long replay must not hold up the requests
                    if until is not None and expected >= until:
                        ok = True
                        break
            except (TimeoutError, zmq.ZMQError):
                pass
            finally:
                sock.close(linger=0)
            if expected == first:
                break  # no progress: the engine is gone or no longer holds `expected`
        if not ok:
            stats.replay_failures += 1
        return ok

    # -- periodic rules ---------------------------------------------------------------

    def check(self, now: float, busy: bool) -> None:
        """The silence rule: busy for `silence_s` without a message -> approximate."""
        if not self.precise:
            return
        if not busy:
            self.busy_since = None
            return
        since = self.busy_since
        if since is None or (self.last_message_at is not None and since < self.last_message_at):
            self.busy_since = since = now
        if now - since >= self.manager.config.silence_s:
            self._set_mode(False, f"busy and silent for {self.manager.config.silence_s:g} s")

    def on_health(self, healthy: bool) -> None:
        if healthy == self.healthy:
            return
        self.healthy = healthy
        if not healthy:
            self._broken = not self.connected
            self._set_mode(False, "endpoint unhealthy")
        elif not (self._broken and self.fresh_connection):
            # the stream stayed up (a new engine process means a new connection), or a
            # message since it came back let the sequence numbers tell: not a restart
            self._update_mode()
        else:  # back, and maybe restarted: it holds nothing of what the index knew
            self.reset("endpoint healthy again")
            self.last_seq = None
            self.fresh_connection = True
            self._update_mode()
            if self.source.replay_endpoint is not None and self.sub is not None:
                self._start(self.catch_up())  # learn what it holds now, idle or not

    def snapshot(self) -> StreamSnapshot:
        s = self.stats
        return StreamSnapshot(
            endpoint=self.endpoint,
            precise=self.precise,
            reason=self.reason,
            connected=self.connected,
            messages=s.messages,
            events=s.events,
            blocks_stored=s.blocks_stored,
            blocks_removed=s.blocks_removed,
            clears=s.clears,
            gaps=s.gaps,
            missing=s.missing,
            replays=s.replays,
            replay_failures=s.replay_failures,
            resets=s.resets,
            dropped=s.dropped,
            malformed=s.malformed,
            unmapped=s.unmapped,
            map_evicted=s.map_evicted,
            mapped_blocks=len(self.mapper.blocks),
            last_seq=self.last_seq,
            lag_sum=s.lag_sum,
            lag_count=s.lag_count,
            lag_buckets=tuple(s.lag_buckets),
        )


# -- every endpoint -----------------------------------------------------------------


class _Spec(Protocol):
    """What the manager reads of `prefixroute.drivers.pool.EndpointSpec`."""

    @property
    def id(self) -> EndpointId:
        """The endpoint's id."""

    @property
    def kv_events(self) -> KVEventSource | None:
        """Its event source, if any."""


class Pool(Protocol):
    """What the manager reads of `prefixroute.drivers.pool.EndpointPool`."""

    def specs(self) -> Sequence[_Spec]:
        """The configured endpoints."""

    def states(self) -> list[EndpointState]:
        """Their current states (models, capacity, health, load)."""

    def address(self, endpoint: EndpointId) -> str | None:
        """None once `endpoint` left the pool."""


class KVEventsManager:
    """The subscribers of every endpoint with `kv_events`, following the pool.

    Runs on the driver's event loop (the router is only called there).
    `start()` opens one subscriber per configured endpoint and a periodic
    check that follows the pool (endpoints added or removed by a file
    reload, their served model, their load for the silence rule);
    `on_health(endpoint, healthy)` is the pool's health callback;
    `snapshots()` feeds `/health` and the metrics. `clock` is the driver's
    monotonic clock; `wall_clock` is compared with the engines' batch
    timestamps (`time.time()` on the engine) for the lag.
    """

    def __init__(
        self,
        router: Router,
        pool: Pool,
        config: KVEventsConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.router = router
        self.pool = pool
        self.config = config if config is not None else KVEventsConfig()
        self.clock = clock
        self.wall_clock = wall_clock
        self.streams: dict[EndpointId, _Stream] = {}
        self.ctx: Any = None
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        """Open the subscribers and start the periodic check (no-op without any source)."""
        if zmq is None:
            return  # no source can be configured without it (`KVEventSource.from_document`)
        self.ctx = zmq.asyncio.Context()
        self.check_once()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Close every subscriber."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        streams, self.streams = list(self.streams.values()), {}
        for stream in streams:
            await stream.stop()
        await asyncio.gather(*self._closing, return_exceptions=True)
        self._closing.clear()
        if self.ctx is not None:
            self.ctx.destroy(linger=0)  # closes any socket a cancelled task left open
            self.ctx = None

    def sync(self) -> None:
        """Follow the pool: open subscribers for new sources, close those of removed ones."""
        if self.ctx is None:
            return
        wanted = {spec.id: spec.kv_events for spec in self.pool.specs() if spec.kv_events}
        for eid in [e for e, s in self.streams.items() if wanted.get(e) != s.source]:
            stream = self.streams.pop(eid)
            stream.cancel()  # now: not one more message of the old source is applied
            closing = asyncio.ensure_future(stream.stop())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            if self.pool.address(eid) is not None:  # still in the pool, another source
                stream._set_mode(False, "kv_events changed")
                stream.reset("kv_events changed")  # maybe another engine: start over
        for eid, source in wanted.items():
            if eid not in self.streams:  # its model and map bound: `check_once`
                stream = _Stream(self, eid, source, source.model, self.config.default_map_blocks)
                self.streams[eid] = stream
                stream.start(self.ctx)

    async def _loop(self) -> None:
        period = self.config.check_interval_s
        while True:
            await asyncio.sleep(period)
            try:
                self.check_once()
            except Exception:  # pragma: no cover - a bug must not end the checks
                log.exception("KV event check failed")

    def check_once(self) -> None:
        """One round of the periodic rules: pool membership, models, map bounds, silence."""
        self.sync()
        now = self.clock()
        states = {s.id: s for s in self.pool.states()}
        for eid, stream in self.streams.items():
            state = states.get(eid)
            if state is None:
                continue
            model = stream.source.model
            if model is None:
                model = next(iter(state.models)) if len(state.models) == 1 else None
            if model != stream.mapper.model:
                known = stream.mapper.model is not None
                stream.mapper.set_model(model)
                if known:  # the index holds keys of the other model's namespace
                    stream.reset("model changed")
                stream._update_mode()
            size = state.block_size
            if size is not None and stream.mapper.engine_block_size is None:
                stream.mapper.note_block_size(size)  # scraped before any event says it
            if state.kv_capacity_blocks:
                stream.mapper.max_blocks = max(
                    16, math.ceil(state.kv_capacity_blocks * self.config.map_slack)
                )
            stream.on_health(state.healthy)
            stream.check(now, state.running + state.waiting > 0)

    def on_health(self, endpoint: EndpointId, healthy: bool) -> None:
        """The pool's health callback: unhealthy demotes, healthy again clears (a restart)."""
        stream = self.streams.get(endpoint)
        if stream is not None:
            stream.on_health(healthy)

    def snapshots(self) -> list[StreamSnapshot]:
        """Every subscriber's state and counters, by endpoint id."""
        return [self.streams[e].snapshot() for e in sorted(self.streams)]

    def modes(self) -> dict[str, dict[str, str]]:
        """`{endpoint: {mode, reason}}` for `/health`."""
        return {
            s.endpoint: {"mode": "precise" if s.precise else "approximate", "reason": s.reason}
            for s in self.streams.values()
        }
