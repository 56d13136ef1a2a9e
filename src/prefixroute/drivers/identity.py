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

Ids are trimmed and must be at most `MAX_ID_LENGTH` printable characters
(400 otherwise), as `prefixroute.openai` requires. Errors are
`RequestError`s whose `status` (400 or 401) and `field` the driver answers
with. API keys are kept only as SHA-256 digests, so a config dump or a
heap snapshot does not hold them in the clear and a lookup does not compare
secrets character by character.
"""

from __future__ import annotations

import hashlib
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
_KEYS = {
    "tenant_headers": "list",
    "api_keys": "mapping",
    "api_keys_file": "str",
    "require_api_key": "bool",
    "tenant_from_user": "bool",
    "session_header": "str",
    "priority_header": "str",
    "priorities": "mapping",
}


@attrs.frozen(slots=True)
class Identity:
    """The resolved identity of one request."""

    tenant: str = "default"
    session: str | None = None
    priority: int = 0


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
            for key in ("require_api_key", "tenant_from_user", "session_header", "priority_header")
            if key in section
        }
        if values.get("require_api_key") and not keys:
            raise ConfigError(f"{path}.require_api_key", "needs api_keys or api_keys_file")
        values.update(tenant_headers=tuple(headers), api_keys=keys, priorities=priorities)
        config: IdentityConfig = build(cls, values, path, error=ConfigError)
        return config

    def resolve(self, headers: Mapping[str, str], body: Mapping[str, object]) -> Identity:
        """The request's `Identity`; `RequestError` (400, or 401 for keys) otherwise.

        O(number of tenant headers) look-ups plus one SHA-256 when a key is sent.
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
            tenant=tenant or "default", session=session, priority=self._priority(headers)
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
