"""Shared state across router replicas, on Redis (or Valkey): `SharedState` (issue 15).

A gateway or picker runs as several replicas; alone, each would see a
fraction of the traffic: its in-flight counts, token buckets and fair-queue
counters would be its own, so a tenant limited to R req/s would get N x R.
This module puts what must be one across replicas on one Redis, with each
replica's own state as the fallback. What is shared (config `share`):

- `load`: each replica's in-flight requests and tokens per endpoint, as a
  contribution that expires (`contribution_ttl_ms`), so a crashed replica's
  counts vanish; every replica reads the sum of the others'.
- `rate_limits`: per-tenant token buckets, charged atomically by a Lua
  script with the math of `prefixroute.admission.TokenBucketAdmission.admit`.
- `fair_queue`: the VTC virtual-time charges, summed into global counters.
- `decisions`: compact records of routing decisions (endpoint + block keys)
  on a Redis Stream, so approximate-mode indexes learn peers' decisions.

Key layout (every key starts with `<key_prefix>:`):

- `<p>:bucket:<tenant>`, hash: `r`, `t` (request and token levels), `s`
  (Redis time of the last update), each as `%.17g`; expires at its
  full-refill time (a full bucket carries no information).
- `<p>:replicas`, sorted set: replica id -> last heartbeat (Redis time,
  ms); members older than `contribution_ttl_ms` are pruned by every sync.
- `<p>:inflight:<replica>`, string: that replica's in-flight requests and
  tokens per endpoint and requests per tenant, JSON
  `{"e:<endpoint>": [requests, tokens], "t:<tenant>": [requests, 0]}`
  (non-zero only; summed by the script with Redis' built-in `cjson`); expires
  `contribution_ttl_ms` after its replica's last sync.
- `<p>:vtc`, hash: tenant -> global VTC counter (every replica's charges
  summed); expires `10 x contribution_ttl_ms` after the last sync.
- `<p>:decisions`, stream: entries `r` (replica), `e` (endpoint), `k`
  (block keys, uint64 little-endian), `ttl` (0: a completion), and `t`,
  `s` (the request's tenant and session, when it has one); trimmed to
  about `decisions_maxlen` entries.

Round trips: `take` is one `EVALSHA` (a request's route path has at most
this one); `sync` is one `EVALSHA` (it must read the live replicas' names
before their contributions: a pipeline would need two round trips, or read
one sync late; the script does it atomically, O(replicas x endpoints) on the
server); `publish` one pipeline of `XADD`s; `read_decisions` one `XREAD`.

Time: both scripts read Redis' own clock (`TIME`), never a replica's, so
skewed replica clocks cannot mint tokens or keep a dead replica alive. A
script that calls `TIME` is replicated by its effects (the default since
Redis 5.0, "Replicating commands instead of scripts" in the Redis docs on
`EVAL`; the only mode since 7.0, redis/redis#9812), so Redis' own
replicas apply the same writes. A
`TIME` that steps back refills nothing (as the core, whose `now` may too).

Faults: every call is bounded by `timeout_ms` (socket timeouts and
`asyncio.wait_for` around the whole call, connection-pool wait included)
and never raises for Redis trouble (refused, reset, timed out, a
SIGSTOPped or restarted server, a wrong password, `NOSCRIPT` after a
restart: the script is loaded again and the call retried within the same
deadline). A failure marks the state down (`up` False, `down_since`, a
logged reason without any secret) and the call returns None: the caller
uses its local state. While down, calls return None at once (counted in
`fallbacks`) and one probe is let through at most every
`sync_interval_ms`; its success marks the state up again. A connection
error is retried once at once (a pooled connection a restarted Redis
closed); should the first attempt have reached Redis before the connection
broke, that `take` is charged twice (a crash at that instant: rare, and
only ever stricter). A timeout is never retried.

Not covered: Redis Cluster (the sync script reads keys it does not declare:
fine on one Redis, or a primary with replicas and Sentinel in front);
the decision stream is read from the time a replica starts (no replay).

Sources: Redis docs, `EVALSHA` / `SCRIPT LOAD` (the `NOSCRIPT` error and
reloading), "Scripting with Lua" (`TIME` and effects replication, keys
given in `KEYS`), Streams (`XADD ... MAXLEN ~`, `XREAD` from the last id),
`PEXPIRE`, `ZREMRANGEBYSCORE`; redis-py's asyncio client
(`redis.asyncio`). The bucket math is `prefixroute.admission`'s, after
Guava's `SmoothBursty` (see there).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from prefixroute.admission import SLACK_S
from prefixroute.config import ConfigError, ConfigFields

if TYPE_CHECKING:
    import redis.asyncio

__all__ = [
    "SHARE_CHOICES",
    "DecisionRecord",
    "SharedState",
    "SharedStateConfig",
    "SyncResult",
    "TlsConfig",
]

log = logging.getLogger(__name__)

SHARE_CHOICES = ("load", "rate_limits", "fair_queue", "decisions")
_NO_EXTRA = "needs the `shared` extra: pip install 'prefixroute[shared]' (redis)"
_MAX_CONNECTIONS = 64
_READ_COUNT = 1000  # stream entries per read_decisions call
_T = TypeVar("_T")


# -- configuration ------------------------------------------------------------------


@attrs.frozen
class TlsConfig:
    """`shared_state.tls`: the CA to trust, and a client certificate when Redis asks for one."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True


@attrs.frozen
class SharedStateConfig:
    """The `shared_state` section (see the module docstring); no secret is ever held here.

    Read with `from_document`; build directly in tests. The password is read
    by `SharedState.start` from `password_env` or `password_file`.
    """

    url: str
    host: str
    port: int
    db: int = 0
    tls_enabled: bool = False
    key_prefix: str = "prefixroute"
    timeout_ms: float = 50.0
    password_env: str | None = None
    password_file: Path | None = None
    username: str | None = None
    tls: TlsConfig | None = None
    replica_id: str = attrs.field(factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    sync_interval_ms: float = 100.0
    contribution_ttl_ms: float = 3000.0
    share: frozenset[str] = frozenset(SHARE_CHOICES)
    decisions_maxlen: int = 10_000

    @property
    def sync_interval_s(self) -> float:
        return self.sync_interval_ms / 1000.0

    @property
    def timeout_s(self) -> float:
        return self.timeout_ms / 1000.0

    @property
    def contribution_ttl_s(self) -> float:
        return self.contribution_ttl_ms / 1000.0

    def shares(self, part: str) -> bool:
        """Whether `part` (one of `SHARE_CHOICES`) is shared."""
        return part in self.share

    @classmethod
    def from_document(
        cls, doc: Mapping[str, Any], *, base_dir: str | os.PathLike[str] = "."
    ) -> SharedStateConfig | None:
        """Read the document's `shared_state` section (None when absent); ConfigError naming
        the field for anything invalid. Relative files are relative to `base_dir`."""
        if doc.get("shared_state") is None:
            return None
        f = ConfigFields(doc["shared_state"], "shared_state")
        f.allow(
            "url", "key_prefix", "timeout_ms", "password_env", "password_file", "username",
            "tls", "replica_id", "sync_interval_ms", "contribution_ttl_ms", "share",
            "decisions_maxlen",
        )  # fmt: skip
        if not f.has("url"):
            raise ConfigError(f.where("url"), "is required (e.g. redis://127.0.0.1:6379/0)")
        url = f.string("url", "")
        host, port, db, tls_enabled = _parse_url(url, f.where("url"))
        prefix = f.string("key_prefix", "prefixroute")
        if any(c.isspace() for c in prefix) or len(prefix) > 100:
            raise ConfigError(f.where("key_prefix"), "must be at most 100 characters, no spaces")
        timeout_ms = f.number("timeout_ms", 50.0, above=0, max=10_000)
        sync_ms = f.number("sync_interval_ms", 100.0, above=0, max=60_000)
        ttl_ms = f.number("contribution_ttl_ms", 3000.0, min=2 * sync_ms, max=3_600_000)
        password_env = f.typed("password_env", "str")
        if password_env is not None and not password_env:
            raise ConfigError(f.where("password_env"), "must name an environment variable")
        password_file = f.typed("password_file", "str")
        if password_env is not None and password_file is not None:
            raise ConfigError(
                f.where("password_file"), "give password_env or password_file, not both"
            )
        if password_file is not None and not password_file:
            raise ConfigError(f.where("password_file"), "must name a file")
        username = f.typed("username", "str")
        if username is not None and password_env is None and password_file is None:
            raise ConfigError(f.where("username"), "needs password_env or password_file")
        tls = _read_tls(f.sub("tls"), base_dir) if f.raw("tls") is not None else None
        if tls is not None and not tls_enabled:
            raise ConfigError(f.where("tls"), "needs a rediss:// url (redis:// is plain TCP)")
        replica_id = f.typed("replica_id", "str")
        if replica_id is not None and (
            not replica_id or len(replica_id) > 200 or any(c.isspace() for c in replica_id)
        ):
            raise ConfigError(f.where("replica_id"), "must be 1-200 characters, no spaces")
        share = f.items("share") if f.has("share") else list(SHARE_CHOICES)
        for i, part in enumerate(share):
            if part not in SHARE_CHOICES:
                raise ConfigError(
                    f"{f.where('share')}[{i}]",
                    f"must be one of {', '.join(SHARE_CHOICES)}, got {part!r}",
                )
        if len(set(share)) != len(share):
            raise ConfigError(f.where("share"), "lists a part twice")
        maxlen = f.integer("decisions_maxlen", 10_000, min=100)
        values: dict[str, Any] = {
            "url": url, "host": host, "port": port, "db": db, "tls_enabled": tls_enabled,
            "key_prefix": prefix, "timeout_ms": timeout_ms, "password_env": password_env,
            "password_file": None if password_file is None else Path(base_dir, password_file),
            "username": username, "tls": tls, "sync_interval_ms": sync_ms,
            "contribution_ttl_ms": ttl_ms, "share": frozenset(share), "decisions_maxlen": maxlen,
        }  # fmt: skip
        if replica_id is not None:
            values["replica_id"] = replica_id
        return cls(**values)

    @classmethod
    def for_url(cls, url: str, **options: Any) -> SharedStateConfig:
        """A config for `url` with `options` as in the section (tests, benchmarks)."""
        doc = {"shared_state": {"url": url, **options}}
        config = cls.from_document(doc)
        assert config is not None
        return config


def _parse_url(url: str, path: str) -> tuple[str, int, int, bool]:
    """(host, port, db, tls) of a `redis://` / `rediss://` URL without credentials."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(path, "must be a redis:// or rediss:// URL")
    if parts.username is not None or parts.password is not None:
        # never echo the URL: it may hold a password
        raise ConfigError(
            path,
            "must not carry credentials: give username and password_env or password_file instead",
        )
    if not parts.hostname:
        raise ConfigError(path, "must name a host (redis://HOST:PORT/DB)")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ConfigError(path, "has an invalid port") from None
    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit() or int(db_text) > 15:
        raise ConfigError(path, f"database must be a number 0-15, got {db_text!r}")
    if parts.query or parts.fragment:
        raise ConfigError(path, "takes no query or fragment (options are keys of shared_state)")
    return parts.hostname, port, int(db_text), parts.scheme == "rediss"


def _read_tls(f: ConfigFields, base_dir: str | os.PathLike[str]) -> TlsConfig:
    f.allow("ca_file", "cert_file", "key_file", "check_hostname")
    files: dict[str, Path | None] = {}
    for key in ("ca_file", "cert_file", "key_file"):
        value = f.typed(key, "str")
        files[key] = None if value is None else Path(base_dir, value)
        if value is not None and not files[key].is_file():  # type: ignore[union-attr]
            raise ConfigError(f.where(key), f"no such file: {files[key]}")
    if (files["cert_file"] is None) != (files["key_file"] is None):
        raise ConfigError(f.path, "cert_file and key_file go together")
    return TlsConfig(**files, check_hostname=f.boolean("check_hostname", True))


# -- values -------------------------------------------------------------------------


@attrs.frozen
class SyncResult:
    """What one `sync` learned: the other live replicas' in-flight counts summed per
    endpoint (this replica's own excluded), the global VTC counters, and the live
    replicas (this one included, so >= 1)."""

    peer_requests: Mapping[str, int]
    peer_tokens: Mapping[str, int]
    vtc_counters: Mapping[str, float]
    replicas: int
    peer_tenants: Mapping[str, int] = attrs.field(factory=dict)
    """The other replicas' in-flight requests per tenant (for concurrency caps)."""


@attrs.frozen
class DecisionRecord:
    """A routing decision a peer made: `endpoint` was sent the blocks `keys`
    (uint64 little-endian, in prefix order); entries live `ttl_s` as speculative
    (0: a served request's completion, its entries confirmed). `tenant` and
    `session` (both or neither) bind the request's session to `endpoint`."""

    replica: str
    endpoint: str
    keys: bytes
    ttl_s: float
    tenant: str | None = None
    session: str | None = None

    def key_array(self) -> Any:
        """`keys` as a numpy uint64 array (read-only, no copy)."""
        import numpy as np

        return np.frombuffer(self.keys, dtype="<u8")


# -- scripts --------------------------------------------------------------------------

_TAKE = """
-- KEYS[1]: the bucket hash. ARGV: rate_r burst_r cost_r rate_t burst_t cost_t slack_s
-- (a rate of 0: that bucket is unlimited; negative costs refund, up to the burst).
-- Returns {wait_r, wait_t, now} as strings.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate_r, burst_r, cost_r = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rate_t, burst_t, cost_t = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local slack = tonumber(ARGV[7])
local h = redis.call('HMGET', KEYS[1], 'r', 't', 's')
local lr, lt, stamp = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
if stamp == nil then
  lr, lt, stamp = burst_r, burst_t, now
else
  if lr == nil then lr = burst_r end
  if lt == nil then lt = burst_t end
  local elapsed = now - stamp
  if elapsed > 0 then
    if rate_r > 0 then lr = math.min(burst_r, lr + rate_r * elapsed) end
    if rate_t > 0 then lt = math.min(burst_t, lt + rate_t * elapsed) end
    stamp = now
  end
end
local function wait(level, cost, rate, burst)
  if rate <= 0 then return 0 end
  if cost > burst then return burst / rate end
  if level + rate * slack >= cost then return 0 end
  return (cost - level) / rate
end
local wr = wait(lr, cost_r, rate_r, burst_r)
local wt = wait(lt, cost_t, rate_t, burst_t)
if wr == 0 and wt == 0 then
  if rate_r > 0 then lr = math.min(burst_r, lr - cost_r) end
  if rate_t > 0 then lt = math.min(burst_t, lt - cost_t) end
end
local ahead = math.max(0, stamp - now)
if wr > 0 then wr = wr + ahead end
if wt > 0 then wt = wt + ahead end
local full = 0
if rate_r > 0 then full = math.max(full, (burst_r - lr) / rate_r) end
if rate_t > 0 then full = math.max(full, (burst_t - lt) / rate_t) end
local f = '%.17g'
redis.call('HSET', KEYS[1], 'r', string.format(f, lr), 't', string.format(f, lt),
           's', string.format(f, stamp))
redis.call('PEXPIRE', KEYS[1], math.ceil((full + ahead) * 1000) + 1)
return {string.format(f, wr), string.format(f, wt), string.format(f, now)}
"""

_SYNC = """
-- KEYS: replicas zset, this replica's contribution, vtc hash.
-- ARGV: contribution key prefix, replica id, ttl ms, share_load, share_vtc,
--       this replica's contribution (JSON {key: [a, b]}, '' for none: keys e:<endpoint>
--       with [requests, tokens], t:<tenant> with [requests, 0]),
--       m, m x (tenant, charge)
-- Returns {live replicas, the others' contributions summed (JSON), the vtc hash}
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, ttl = ARGV[2], tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now_ms, me)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now_ms - ttl))
redis.call('PEXPIRE', KEYS[1], ttl)
if ARGV[6] == '' then
  redis.call('DEL', KEYS[2])
else
  redis.call('SET', KEYS[2], ARGV[6], 'PX', ttl)
end
local m, i = tonumber(ARGV[7]), 8
for _ = 1, m do
  redis.call('HINCRBYFLOAT', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local sums, any = {}, false
if ARGV[4] == '1' then
  for _, member in ipairs(members) do
    if member ~= me then
      local blob = redis.call('GET', ARGV[1] .. member)
      if blob then
        local ok, c = pcall(cjson.decode, blob)
        if ok and type(c) == 'table' then
          for ep, v in pairs(c) do
            local s = sums[ep]
            if s == nil then
              sums[ep] = {v[1], v[2]}
              any = true
            else
              s[1] = s[1] + v[1]
              s[2] = s[2] + v[2]
            end
          end
        end
      end
    end
  end
end
local vtc = {}
if ARGV[5] == '1' then
  redis.call('PEXPIRE', KEYS[3], 10 * ttl)
  vtc = redis.call('HGETALL', KEYS[3])
end
return {#members, any and cjson.encode(sums) or '{}', vtc}
"""


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


def _num(value: float) -> str:
    return repr(float(value))


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


# -- the state --------------------------------------------------------------------------


class SharedState:
    """One replica's view of the shared state (see the module docstring).

    One per replica process, used from one event loop (its redis-py client
    belongs to the loop that started it): `start` once, then any of the
    calls, concurrently if need be (a pool of at most 64 connections), then
    `close`. Without redis-py (the `shared` extra) the constructor raises a
    ConfigError naming the extra.

    `up`: whether the last call (or probe) reached Redis. `down_since`: the
    wall-clock time (`time.time()`) it went down, None while up.
    `fallbacks`: calls answered None because Redis was down or slow (the
    caller used local state). `script_loads`: scripts loaded again after
    `NOSCRIPT` (a restarted or flushed Redis). `replicas`: live replicas at the last
    successful `sync` (this one included; kept while down, so local shares
    of global limits can be computed). `reason`: why it last went down
    (no secret in it). `vtc_dropped`: VTC charge batches dropped because
    the sync carrying them failed (Redis may have applied them: dropping
    never counts a charge twice); while down, charges are not sent but kept,
    and go with the next successful sync. `status()` sums this up for
    `/health`.
    """

    def __init__(
        self,
        config: SharedStateConfig,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if importlib.util.find_spec("redis") is None:
            raise ConfigError("shared_state", _NO_EXTRA)
        self.config = config
        self._environ = os.environ if environ is None else environ
        self._clock = clock
        self._timeout_s = config.timeout_ms / 1000.0
        self._retry_s = config.sync_interval_ms / 1000.0
        p = config.key_prefix
        self._replicas_key = f"{p}:replicas"
        self._inflight_prefix = f"{p}:inflight:"
        self._own_key = f"{p}:inflight:{config.replica_id}"
        self._vtc_key = f"{p}:vtc"
        self._stream_key = f"{p}:decisions"
        self._client: redis.asyncio.Redis | None = None
        self._secret: str | None = None
        self._errors: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError)
        self._noscript: type[BaseException] = Exception
        self.up = False
        self.down_since: float | None = time.time()
        self.fallbacks = 0
        self.failures = 0
        self.script_loads = 0
        self.vtc_dropped = 0
        self.replicas = 1
        self.reason: str | None = "not started"
        self._retry_at = 0.0
        self._failed_at = -math.inf
        self._probing = False
        self._pending_vtc: dict[str, float] = {}
        self._last_id: bytes | None = None

    def __repr__(self) -> str:
        state = "up" if self.up else "down"
        return f"SharedState({self.config.url!r}, replica={self.config.replica_id!r}, {state})"

    @property
    def replica_id(self) -> str:
        return self.config.replica_id

    def status(self) -> dict[str, object]:
        """What `/health` may show: state, since when, why, live replicas, fallbacks
        (no secret, no URL credentials: there are none)."""
        return {
            "state": "up" if self.up else "down",
            "down_since": self.down_since,
            "reason": self.reason,
            "replica": self.config.replica_id,
            "replicas": self.replicas,
            "fallbacks": self.fallbacks,
        }

    # -- lifecycle --

    def _password(self) -> str | None:
        """The password from `password_env` / `password_file`; ConfigError (no secret in it)."""
        c = self.config
        if c.password_env is not None:
            value = self._environ.get(c.password_env)
            if not value:
                raise ConfigError(
                    "shared_state.password_env",
                    f"the environment variable {c.password_env} is not set",
                )
            return value
        if c.password_file is not None:
            try:
                value = c.password_file.read_text().rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(
                    "shared_state.password_file", f"cannot read {c.password_file}: {exc.strerror}"
                ) from None
            if not value:
                raise ConfigError("shared_state.password_file", f"{c.password_file} is empty")
            return value
        return None

    def _make_client(self) -> redis.asyncio.Redis:
        try:
            import redis.asyncio as aioredis
            import redis.exceptions
            from redis.asyncio.connection import BlockingConnectionPool, Connection, SSLConnection
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.credentials import UsernamePasswordCredentialProvider
        except ImportError as exc:
            raise ConfigError("shared_state", _NO_EXTRA) from exc
        self._errors = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)
        self._noscript = redis.exceptions.NoScriptError
        c = self.config
        kwargs: dict[str, Any] = {
            "host": c.host,
            "port": c.port,
            "db": c.db,
            "socket_timeout": self._timeout_s,
            "socket_connect_timeout": self._timeout_s,
            # One immediate retry on a connection error only (a pooled connection that a
            # restarted Redis closed); none on a timeout: the caller has local state.
            "retry": Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
            "client_name": f"prefixroute-{c.replica_id}",
            "connection_class": SSLConnection if c.tls_enabled else Connection,
            "protocol": 2,  # RESP2: the replies parsed here, on Redis 6+ and Valkey alike
        }
        if self._secret is not None:
            # held by the provider, not in the pool's connection kwargs (nor any repr)
            kwargs["credential_provider"] = UsernamePasswordCredentialProvider(
                c.username, self._secret
            )
        if c.tls_enabled:
            tls = c.tls or TlsConfig()
            kwargs.update(
                ssl_ca_certs=None if tls.ca_file is None else str(tls.ca_file),
                ssl_certfile=None if tls.cert_file is None else str(tls.cert_file),
                ssl_keyfile=None if tls.key_file is None else str(tls.key_file),
                ssl_check_hostname=tls.check_hostname,
            )
        pool = BlockingConnectionPool(
            max_connections=_MAX_CONNECTIONS, timeout=self._timeout_s, **kwargs
        )
        return aioredis.Redis(connection_pool=pool)

    async def start(self) -> bool:
        """Read the password, connect, PING and load the scripts (one round trip, bounded
        by `timeout_ms`); whether Redis is up.

        ConfigError (naming the field, never the secret) when the password's
        variable or file is missing.
        An unreachable Redis is not an error: the state starts down and
        probes again on later calls.
        """
        self._secret = self._password()
        self._client = self._make_client()
        self._retry_at = 0.0

        async def hello(r: redis.asyncio.Redis) -> bool:
            pipe = r.pipeline(transaction=False)
            pipe.ping()
            pipe.script_load(_TAKE)  # so that no request's take meets NOSCRIPT first
            pipe.script_load(_SYNC)
            await pipe.execute()
            if self.config.shares("decisions") and self._last_id is None:
                await self._stream_position(r)
            return True

        return await self._call("start", hello) is not None

    async def close(self) -> None:
        """Withdraw this replica (its contribution and heartbeat, best effort) and disconnect."""
        client = self._client
        if client is None:
            return
        if self.up:

            async def withdraw(r: redis.asyncio.Redis) -> object:
                pipe = r.pipeline(transaction=False)
                pipe.zrem(self._replicas_key, self.config.replica_id)
                pipe.delete(self._own_key)
                return await pipe.execute()

            await self._call("close", withdraw)
        self._client = None
        with contextlib.suppress(Exception):  # a broken client may fail to close
            await asyncio.wait_for(client.aclose(), self._timeout_s)

    # -- the guarded call --

    async def _call(
        self, what: str, op: Callable[[redis.asyncio.Redis], Awaitable[_T]]
    ) -> _T | None:
        """`op(client)` within `timeout_ms`, or None (Redis down or slow: see the module)."""
        client = self._client
        if client is None:
            self.fallbacks += 1
            return None
        started = self._clock()
        if not self.up:
            if started < self._retry_at or self._probing:
                self.fallbacks += 1
                return None
            self._probing = True
        try:
            result = await asyncio.wait_for(op(client), self._timeout_s)
        except self._errors as exc:
            self._failed(what, exc, started)
            self.fallbacks += 1
            return None
        finally:
            self._probing = False
        if not self.up and started >= self._failed_at:
            again = "answers again" if self.failures else "connected"
            log.info("shared state: Redis at %s %s (%s)", self._where(), again, what)
            self.up = True
            self.down_since = None
            self.reason = None
        return result

    def _where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def _failed(self, what: str, exc: BaseException, started: float) -> None:
        self.failures += 1
        self._failed_at = max(self._failed_at, started)
        self._retry_at = self._clock() + self._retry_s
        reason = self._describe(exc)
        if self.up or self.reason != reason:
            log.warning(
                "shared state: Redis at %s unavailable (%s during %s); using local state",
                self._where(),
                reason,
                what,
            )
        if self.up or self.down_since is None:
            self.down_since = time.time()
        self.up = False
        self.reason = reason

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, asyncio.TimeoutError) or type(exc).__name__ == "TimeoutError":
            text = f"no answer within {self.config.timeout_ms:g} ms"
        else:
            text = f"{type(exc).__name__}: {exc}"
        if self._secret:
            text = text.replace(self._secret, "***")
        return text

    async def _script(
        self,
        r: redis.asyncio.Redis,
        script: str,
        sha: str,
        keys: Sequence[str],
        args: Sequence[str],
    ) -> Any:
        """EVALSHA; on NOSCRIPT (a restarted or flushed Redis) SCRIPT LOAD and again."""
        try:
            return await r.evalsha(sha, len(keys), *keys, *args)
        except self._noscript:
            await r.script_load(script)
            self.script_loads += 1
            return await r.evalsha(sha, len(keys), *keys, *args)

    # -- rate limits --

    async def take(
        self,
        tenant: str,
        cost_requests: float,
        cost_tokens: float,
        limits: tuple[float | None, float, float | None, float],
        now: float | None = None,
    ) -> tuple[float, float] | None:
        """Charge `tenant`'s global buckets if both hold the cost: (0, 0) when admitted
        and charged, else the seconds until each would (wait_r, wait_t); None when Redis
        is down or slow, or rate limits are not shared.

        `limits` is `TokenBucketAdmission.limits(tenant)`: (requests_per_s,
        request_burst, tokens_per_s, token_burst), None for unlimited. One
        EVALSHA of the token-bucket script on `<p>:bucket:<tenant>`, whose
        math is `TokenBucketAdmission.admit`'s with Redis' `TIME` as the
        clock: `now` is not used (it is accepted so that a caller's
        signature can stay the core's). O(1) on the server.
        """
        timed = await self.take_timed(tenant, cost_requests, cost_tokens, limits)
        return None if timed is None else (timed[0], timed[1])

    async def take_timed(
        self,
        tenant: str,
        cost_requests: float,
        cost_tokens: float,
        limits: tuple[float | None, float, float | None, float],
    ) -> tuple[float, float, float] | None:
        """`take`, plus the Redis time (s) the script used (NaN when no limit applies)."""
        if not self.config.shares("rate_limits"):
            return None
        rate_r, burst_r, rate_t, burst_t = limits
        if rate_r is None and rate_t is None:
            return 0.0, 0.0, math.nan
        args = (
            _num(rate_r or 0.0), _num(burst_r), _num(cost_requests),
            _num(rate_t or 0.0), _num(burst_t), _num(cost_tokens), _num(SLACK_S),
        )  # fmt: skip
        key = f"{self.config.key_prefix}:bucket:{tenant}"
        reply = await self._call("take", lambda r: self._script(r, _TAKE, _TAKE_SHA, (key,), args))
        if reply is None:
            return None
        return float(reply[0]), float(reply[1]), float(reply[2])

    async def refund(
        self,
        tenant: str,
        cost_requests: float,
        cost_tokens: float,
        limits: tuple[float | None, float, float | None, float],
    ) -> bool:
        """Give back a charge `take` made for a request that was then not admitted.

        (Another admission policy before the token bucket refused or
        deferred it: the core's local bucket would not have been charged.)
        The same script with negative costs, levels capped at the bursts.
        False when Redis did not answer (the charge then stands).
        """
        timed = await self.take_timed(tenant, -cost_requests, -cost_tokens, limits)
        return timed is not None

    # -- load and fair-queue counters --

    async def sync(
        self,
        local_requests: Mapping[str, int],
        local_tokens: Mapping[str, int],
        vtc_charges: Mapping[str, float],
        local_tenants: Mapping[str, int] | None = None,
    ) -> SyncResult | None:
        """Publish this replica's in-flight counts and VTC charges, read everyone's.

        `local_tenants` (shared with `load`): this replica's in-flight
        requests per tenant, summed over the others into `peer_tenants`.

        One EVALSHA: heartbeat into `<p>:replicas` (dead replicas pruned),
        replace `<p>:inflight:<replica>` (expiring after `contribution_ttl_ms`),
        add the charges into `<p>:vtc`, then sum the other live replicas'
        contributions and read the VTC counters. None when Redis is down or
        slow. `vtc_charges` are SharedState's once given (never pass them
        again): while down they are kept and go with the next successful
        sync; those of a sync that failed are dropped (`vtc_dropped`: Redis
        may have applied them, they must not count twice). Parts not in
        `share` are neither sent nor read (their maps come back empty).
        O(replicas x endpoints + tenants) on the server.
        """
        c = self.config
        share_load, share_vtc = c.shares("load"), c.shares("fair_queue")
        pending = self._pending_vtc
        if share_vtc:
            for tenant, charge in vtc_charges.items():
                if charge:
                    pending[tenant] = pending.get(tenant, 0.0) + charge
        args: list[str] = [self._inflight_prefix, c.replica_id, str(int(c.contribution_ttl_ms))]
        args += ["1" if share_load else "0", "1" if share_vtc else "0"]
        contribution = {}  # "e:" endpoints and "t:" tenants, in one namespace the script sums
        if share_load:
            for e in {*local_requests, *local_tokens}:
                r, t = int(local_requests.get(e, 0)), int(local_tokens.get(e, 0))
                if r or t:
                    contribution["e:" + e] = (r, t)
            for tenant, n in (local_tenants or {}).items():
                if n > 0:
                    contribution["t:" + tenant] = (int(n), 0)
        args.append(json.dumps(contribution, separators=(",", ":")) if contribution else "")
        batch = dict(pending) if share_vtc else {}
        args.append(str(len(batch)))
        for tenant, charge in batch.items():
            args += [tenant, _num(charge)]
        keys = (self._replicas_key, self._own_key, self._vtc_key)
        failures = self.failures
        reply = await self._call("sync", lambda r: self._script(r, _SYNC, _SYNC_SHA, keys, args))
        if reply is None:
            if batch and self.failures != failures:  # sent, outcome unknown: never apply twice
                self.vtc_dropped += 1
                pending.clear()
            return None
        pending.clear()
        count, summed, vtc = reply
        peers = json.loads(summed)
        peer_requests = {e[2:]: int(v[0]) for e, v in peers.items() if e.startswith("e:")}
        peer_tokens = {e[2:]: int(v[1]) for e, v in peers.items() if e.startswith("e:")}
        peer_tenants = {k[2:]: int(v[0]) for k, v in peers.items() if k.startswith("t:")}
        counters = {_text(vtc[j]): float(vtc[j + 1]) for j in range(0, len(vtc), 2)}
        self.replicas = max(1, int(count))
        return SyncResult(peer_requests, peer_tokens, counters, self.replicas, peer_tenants)

    # -- decisions --

    def record(
        self,
        endpoint: str,
        keys: bytes,
        ttl_s: float,
        *,
        tenant: str | None = None,
        session: str | None = None,
    ) -> DecisionRecord:
        """A `DecisionRecord` of this replica."""
        return DecisionRecord(self.config.replica_id, endpoint, keys, ttl_s, tenant, session)

    async def publish(self, records: Sequence[DecisionRecord]) -> int | None:
        """Append `records` to `<p>:decisions` (one pipeline of `XADD ... MAXLEN ~`), as this
        replica whatever their `replica` says; how many, or None (down, slow, not shared).
        O(records)."""
        if not self.config.shares("decisions"):
            return None
        if not records:
            return 0
        me = self.config.replica_id

        async def add(r: redis.asyncio.Redis) -> int:
            pipe = r.pipeline(transaction=False)
            for rec in records:
                fields: dict[Any, Any] = {
                    "r": me, "e": rec.endpoint, "k": rec.keys, "ttl": _num(rec.ttl_s)
                }  # fmt: skip
                if rec.tenant is not None and rec.session is not None:
                    fields["t"], fields["s"] = rec.tenant, rec.session
                pipe.xadd(
                    self._stream_key, fields, maxlen=self.config.decisions_maxlen, approximate=True
                )
            await pipe.execute()
            return len(records)

        return await self._call("publish", add)

    async def _stream_position(self, r: redis.asyncio.Redis) -> None:
        """Read from the stream's current end on: a replica learns what peers decide
        from the time it starts (or first reaches Redis)."""
        newest: Any = await r.xrevrange(self._stream_key, count=1)
        self._last_id = bytes(newest[0][0]) if newest else b"0-0"

    async def read_decisions(self) -> list[DecisionRecord] | None:
        """The peers' records appended since the last read (at most 1000 per call; this
        replica's own skipped), or None (down, slow, not shared). Reading starts at the
        stream's end when the replica started (or first reached Redis). One XREAD.
        O(records)."""
        if not self.config.shares("decisions"):
            return None
        me = self.config.replica_id

        async def read(r: redis.asyncio.Redis) -> list[DecisionRecord]:
            if self._last_id is None:
                await self._stream_position(r)
            since: bytes = self._last_id or b"0-0"
            reply: Any = await r.xread({self._stream_key: since}, count=_READ_COUNT)
            out: list[DecisionRecord] = []
            for _stream, entries in reply:
                for entry_id, fields in entries:
                    self._last_id = bytes(entry_id)
                    replica = _text(fields.get(b"r", b""))
                    if replica == me:
                        continue
                    try:
                        tenant, session = fields.get(b"t"), fields.get(b"s")
                        out.append(
                            DecisionRecord(
                                replica,
                                _text(fields[b"e"]),
                                bytes(fields[b"k"]),
                                float(fields[b"ttl"]),
                                None if tenant is None or session is None else _text(tenant),
                                None if tenant is None or session is None else _text(session),
                            )
                        )
                    except (KeyError, ValueError):
                        continue  # not ours: another writer on the stream
            return out

        return await self._call("read_decisions", read)


_TAKE_SHA = _sha(_TAKE)
_SYNC_SHA = _sha(_SYNC)
