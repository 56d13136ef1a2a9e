"""Who sent a request: tenant, session and priority from headers and API keys.

`IdentityConfig.resolve(headers, body)` is the one place a driver decides
identity, so the gateway and an Envoy ext_proc server agree. It needs no web
framework: `headers` is any mapping of lowercase header names (ASGI and
HTTP/2 deliver them lowercase; starlette's `Headers` also looks up
case-insensitively), `body` the decoded JSON body.

Rules, in order:

- Tenant. A bearer key (`authorization: Bearer KEY`) found in `api_keys`
  names the tenant, and then tenant headers are ignored: a keyed client
  cannot claim another tenant by header. With `require_api_key`, a missing
  or unknown key is 401. Otherwise the first of `tenant_headers` present
  wins (by default the three of GIE and llm-d: `x-tenant-id`,
  `x-llm-d-inference-fairness-id`, `x-gateway-inference-fairness-id`), then
  the body's `user` only when `tenant_from_user` (the body is the client's
  word, so it is not trusted by default), else "default".
- Session: `session_header` (`x-session-id`), else the body's
  `prompt_cache_key`.
- Priority: `priority_header` (`x-priority`) holds an integer or a name that
  `priorities` maps to one (e.g. `{critical: 1, standard: 0, sheddable: -1}`);
  anything else is 400. Absent: 0.
- Latency objectives (issue 16), with llm-d's header names:
  `slo_ttft_header` (`x-slo-ttft-ms`) and `slo_tpot_header` (`x-slo-tpot-ms`)
  hold a decimal number of milliseconds (`500`, `12.5`, `1e3`), which becomes
  `Request.slo_ttft_s` / `slo_tpot_s` in seconds; `0` means no objective
  from the header (as llm-d reads an absent or zero SLO; a tenant default
  from the `objectives` config section still applies). `predictive_header`
  (`x-prediction-based-scheduling`) holds a boolean, case-insensitively:
  `true`/`t`/`1` or `false`/`f`/`0` (Go's `strconv.ParseBool`, which llm-d
  uses, after lowercasing), becoming `Request.predictive`. Absent or blank:
  None (the config decides). Anything else (a negative, `inf`, `nan`, a
  unit, `yes`) is 400 naming the header (GIE's predicted-latency plugin
  makes such a value a `BadRequest` error, "must be a float" / "must be a
  boolean"): a client that sent an objective learns it was not understood.
  A header name set to "" is not read. Sources: kubernetes-sigs/gateway-api-inference-extension
  `pkg/epp/scheduling/framework/plugins/multi/predicted_latency/headers.go`
  (`parseFloatHeader`, `parseBoolHeader`) and `.../profile/slo_aware_profile_handler.go`
  (`x-prediction-based-scheduling`); kaushikmitr/llm-d
  `guides/predicted-latency-based-scheduling/README.md` (enabled without
  objectives: SLO 0, the lowest predicted latency).

Ids are trimmed and must be at most `MAX_ID_LENGTH` printable characters
(400 otherwise), as `prefixroute.openai` requires. Errors are
`RequestError`s whose `status` (400 or 401) and `field` the driver answers
with. API keys are kept only as SHA-256 digests, so a config dump or a
heap snapshot does not hold them in the clear and a lookup does not compare
secrets character by character.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from prefixroute.config import ConfigError, read_section
from prefixroute.drivers.documents import read_document
from prefixroute.openai import identifier
from prefixroute.request import RequestError
from prefixroute.schema import build

__all__ = ["DEFAULT_TENANT_HEADERS", "Identity", "IdentityConfig"]

DEFAULT_TENANT_HEADERS = (
    "x-tenant-id",
    "x-llm-d-inference-fairness-id",
    "x-gateway-inference-fairness-id",
)
_INT32_MAX = 2**31 - 1
_INTEGER = re.compile(r"[+-]?[0-9]{1,10}")
# a plain decimal number, optionally with an exponent (Go's ParseFloat takes these too):
# no minus sign, no inf/nan, no hex, no digit separators
_MILLISECONDS = re.compile(r"\+?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_TRUE = frozenset({"true", "t", "1"})
_FALSE = frozenset({"false", "f", "0"})
_MAX_ECHO = 32  # characters of a bad header value quoted back in the 400
_KEYS = {
    "tenant_headers": "list",
    "api_keys": "mapping",
    "api_keys_file": "str",
    "require_api_key": "bool",
    "tenant_from_user": "bool",
    "session_header": "str",
    "priority_header": "str",
    "priorities": "mapping",
    "slo_ttft_header": "str",
    "slo_tpot_header": "str",
    "predictive_header": "str",
}
_HEADER_KEYS = (
    "session_header",
    "priority_header",
    "slo_ttft_header",
    "slo_tpot_header",
    "predictive_header",
)


@attrs.frozen(slots=True)
class Identity:
    """The resolved identity of one request: who sent it, and the latency it asks for.

    `slo_ttft_s` / `slo_tpot_s`: the objectives in seconds (None: none on
    that axis); `predictive`: the client's word on predicted-latency routing
    (None: the configured default). They go to the `Request` fields of the
    same names.
    """

    tenant: str = "default"
    session: str | None = None
    priority: int = 0
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    predictive: bool | None = None


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _digests(keys: Mapping[str, str]) -> dict[str, str]:
    return {_digest(k): t for k, t in keys.items()}


def _lower_names(value: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(v.lower() for v in value)


def _lower_name(value: str | None) -> str | None:
    return value.lower() if value else None


@attrs.frozen
class IdentityConfig:
    """How to tell tenants, sessions and priorities apart (see the module docstring).

    Build it from the config document's `identity` section with
    `from_document`, or directly: `api_keys` maps keys in the clear to
    tenants and is stored as digests (so build a new config rather than
    `attrs.evolve` one: that would digest the digests).
    """

    tenant_headers: tuple[str, ...] = attrs.field(
        default=DEFAULT_TENANT_HEADERS, converter=_lower_names
    )
    api_keys: Mapping[str, str] = attrs.field(
        factory=dict,
        converter=_digests,
        repr=False,
    )
    require_api_key: bool = False
    tenant_from_user: bool = False
    session_header: str | None = attrs.field(default="x-session-id", converter=_lower_name)
    priority_header: str | None = attrs.field(default="x-priority", converter=_lower_name)
    priorities: Mapping[str, int] = attrs.field(factory=dict)
    slo_ttft_header: str | None = attrs.field(default="x-slo-ttft-ms", converter=_lower_name)
    slo_tpot_header: str | None = attrs.field(default="x-slo-tpot-ms", converter=_lower_name)
    predictive_header: str | None = attrs.field(
        default="x-prediction-based-scheduling", converter=_lower_name
    )

    def __attrs_post_init__(self) -> None:
        if self.require_api_key and not self.api_keys:
            raise ValueError("require_api_key needs api_keys or api_keys_file")
        for name, value in self.priorities.items():
            if isinstance(value, bool) or not isinstance(value, int) or abs(value) > _INT32_MAX:
                raise ValueError(f"priorities.{name} must be a 32-bit integer, got {value!r}")

    @classmethod
    def from_document(
        cls, doc: Mapping[str, Any], *, base_dir: str | os.PathLike[str] = "."
    ) -> IdentityConfig:
        """Read the config document's `identity` section (absent: the defaults).

        `api_keys_file` (a YAML map of key -> tenant) is relative to
        `base_dir`, the config file's directory. Raises `ConfigError` naming
        the field for anything invalid.
        """
        path = "identity"
        section = read_section(doc, path, _KEYS)
        headers = section.get("tenant_headers", list(DEFAULT_TENANT_HEADERS))
        for i, h in enumerate(headers):
            if not isinstance(h, str) or not h:
                raise ConfigError(f"{path}.tenant_headers[{i}]", "must be a header name")
        keys = _key_map(section.get("api_keys", {}), f"{path}.api_keys")
        if "api_keys_file" in section:
            file = Path(base_dir, section["api_keys_file"])
            keys.update(_key_map(read_document(file), f"{path}.api_keys_file"))
        priorities = dict(section.get("priorities", {}))
        for name, value in priorities.items():
            if isinstance(value, bool) or not isinstance(value, int) or abs(value) > _INT32_MAX:
                raise ConfigError(
                    f"{path}.priorities.{name}", f"must be a 32-bit integer, got {value!r}"
                )
        values: dict[str, Any] = {
            key: section[key]
            for key in ("require_api_key", "tenant_from_user", *_HEADER_KEYS)
            if key in section
        }
        if values.get("require_api_key") and not keys:
            raise ConfigError(f"{path}.require_api_key", "needs api_keys or api_keys_file")
        values.update(tenant_headers=tuple(headers), api_keys=keys, priorities=priorities)
        config: IdentityConfig = build(cls, values, path, error=ConfigError)
        return config

    def resolve(self, headers: Mapping[str, str], body: Mapping[str, object]) -> Identity:
        """The request's `Identity`; `RequestError` (400, or 401 for keys) otherwise.

        O(number of tenant headers) look-ups plus one SHA-256 when a key is
        sent; each objective header is O(its length).
        """
        tenant = self._keyed_tenant(headers)
        if tenant is None:
            for name in self.tenant_headers:
                tenant = identifier(headers.get(name), name)
                if tenant is not None:
                    break
        if tenant is None and self.tenant_from_user:
            tenant = identifier(_body_str(body, "user"), "user")
        session = None
        if self.session_header:
            session = identifier(headers.get(self.session_header), self.session_header)
        if session is None:
            session = identifier(_body_str(body, "prompt_cache_key"), "prompt_cache_key")
        return Identity(
            tenant=tenant or "default",
            session=session,
            priority=self._priority(headers),
            slo_ttft_s=_objective(headers, self.slo_ttft_header),
            slo_tpot_s=_objective(headers, self.slo_tpot_header),
            predictive=_boolean(headers, self.predictive_header),
        )

    def _keyed_tenant(self, headers: Mapping[str, str]) -> str | None:
        if not self.api_keys:
            return None
        key = _bearer(headers.get("authorization"))
        tenant = self.api_keys.get(_digest(key)) if key else None
        if tenant is None and self.require_api_key:
            what = "an unknown API key" if key else "no API key"
            raise RequestError(
                f"the request carries {what}: send 'Authorization: Bearer <key>'",
                status=401,
                field="authorization",
            )
        return tenant

    def _priority(self, headers: Mapping[str, str]) -> int:
        name = self.priority_header
        raw = headers.get(name) if name else None
        if raw is None or not raw.strip():
            return 0
        value = raw.strip()
        if value in self.priorities:
            return self.priorities[value]
        if _INTEGER.fullmatch(value) is None or abs(int(value)) > _INT32_MAX:
            names = ", ".join(sorted(self.priorities)) or "none configured"
            raise RequestError(
                f"header {name} must be an integer or a priority name ({names}), "
                f"got {value[:32]!r}",
                field=name,
            )
        return int(value)


def _objective(headers: Mapping[str, str], name: str | None) -> float | None:
    """Header `name`'s milliseconds as seconds; None when absent, blank or 0.

    `RequestError` (400, naming the header) for anything but a plain
    non-negative decimal number, or one out of range in seconds.
    """
    raw = headers.get(name) if name else None
    if raw is None or not raw.strip():
        return None
    value = raw.strip()
    if _MILLISECONDS.fullmatch(value) is None:
        raise RequestError(
            f"header {name} must be a number of milliseconds >= 0, got {value[:_MAX_ECHO]!r}",
            field=name,
        )
    ms = float(value)
    if ms == 0.0:
        return None  # llm-d reads 0 as "no objective": the lowest predicted latency
    seconds = ms / 1000.0
    if not 0.0 < seconds < math.inf:  # 1e400 ms overflows to inf; 5e-324 ms / 1000 is 0
        raise RequestError(
            f"header {name} is out of range: {value[:_MAX_ECHO]!r} milliseconds",
            field=name,
        )
    return seconds


def _boolean(headers: Mapping[str, str], name: str | None) -> bool | None:
    """Header `name` as a boolean (true/t/1, false/f/0, any case); None when absent or blank."""
    raw = headers.get(name) if name else None
    if raw is None or not raw.strip():
        return None
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise RequestError(
        f"header {name} must be true or false, got {raw.strip()[:_MAX_ECHO]!r}", field=name
    )


def _key_map(value: object, path: str) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError(path, "must map API keys to tenant names")
    out: dict[str, str] = {}
    for key, tenant in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(path, "API keys must be non-empty strings (quote numbers in YAML)")
        if not isinstance(tenant, str) or not tenant:
            # never echo the key itself
            raise ConfigError(path, f"the tenant of a key must be a non-empty string: {tenant!r}")
        out[key] = tenant
    return out


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _body_str(body: Mapping[str, object], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise RequestError(f"{key} must be a string", field=key)
    return value
